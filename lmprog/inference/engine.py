"""The driver: walks a :class:`~lmprog.inference.program.SegmentProgram` on the host, running the jitted
kernels for each segment, and assembles an :class:`~lmprog.inference.result.InferenceResult`.

Per run::

    shared prefix (leading static Text/Observe) -> prefill once, batch 1 -> broadcast to P particles
    for each later segment:
        Text / Observe -> kernels.feed (one batched LM call per <= 64 tokens)
        Hole           -> kernels.begin_hole, then kernels.hole_chunk until every particle is done
                          (the token loop is a lax.while_loop on the device; one host sync per chunk)
        Host           -> one Python call for all particles (HostView), kernels.add_log_weight
        if every particle is dead -> InferenceError naming the segment

Host syncs happen only at segment boundaries and chunk ends, never per token.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.inference.kernel import TRACE_COUNTS, Kernels, get_kernels
from lmprog.inference.program import (
    CAUSE_TEXT,
    Cause,
    Hole,
    Host,
    HostView,
    InferenceError,
    Observe,
    SegmentProgram,
    Text,
)
from lmprog.inference.result import InferenceResult, _logsumexp
from lmprog.inference.state import Consts, HoleParams, RunState, init_particles
from lmprog.inference.strategies import MCMC, BestOf, ParticleGibbs, Strategy, Vote

__all__ = ["run", "Progress"]

FEED_CHUNK = 64  # forced tokens per batched LM call (bounds the [P, T, V] logits of observed text)
PREFILL_CHUNK = 256  # prompt tokens per prefill call (batch 1)
BIG = 1 << 30


@dataclass
class Progress:
    """Passed to the ``progress`` callback after every device chunk of a hole."""

    hole: str
    steps: int  # decode steps so far in this hole
    budget: int
    active: int  # particles still generating


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


@dataclass
class _Run:
    lm: object
    program: SegmentProgram
    strategy: Strategy
    kern: Kernels
    consts: Consts
    groups: int
    n: int
    progress: Callable | None
    compile_s: float = 0.0
    ess: list = field(default_factory=list)  # (device ess [k, G], device resampled [k, G], k)
    data: list | None = None  # host per-particle dicts (aligned with `origin` at the last sync)
    prefix_text: str = ""
    registry: dict = field(default_factory=dict)  # id -> snapshot of a particle's host data (Trace.seg_data)

    @property
    def num(self) -> int:
        return self.groups * self.n

    def call(self, fn, *args, **kwargs):
        before = sum(TRACE_COUNTS.values())
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if sum(TRACE_COUNTS.values()) != before:
            self.compile_s += time.perf_counter() - t
        return out

    # ---- host data -------------------------------------------------------------------------------

    def sync_data(self, state: RunState) -> RunState:
        """Align ``data`` with the particles (follow resampling since the last sync)."""
        return self._align_data(state, np.asarray(jax.device_get(state.particles.origin)))

    def _align_data(self, state: RunState, origin) -> RunState:
        """``data[i]`` becomes a copy of the data of particle ``origin[i]``; origins restart from here."""
        if self.data is None:
            self.data = [{} for _ in range(self.num)]
        self.data = [dict(self.data[int(o)]) for o in origin]
        return state._replace(particles=state.particles._replace(origin=jnp.arange(self.num, dtype=jnp.int32)))

    def register(self, data: dict) -> int:
        """Store a snapshot of one particle's host data; its id goes into ``Trace.seg_data``."""
        i = len(self.registry)
        self.registry[i] = dict(data)
        return i

    # ---- host views ------------------------------------------------------------------------------

    def view(self, state: RunState) -> tuple[RunState, HostView]:
        pp = state.particles
        tokens, lengths, spans, causes, origin, hole_logp = jax.device_get(
            (pp.tokens, pp.length, pp.spans, pp.cause, pp.origin, pp.hole_logp))
        state = self._align_data(state, origin)
        holes = self.program.holes
        view = HostView(
            tokens=[[int(t) for t in tokens[i, : lengths[i]]] for i in range(self.num)],
            spans=[
                {
                    hole.name: (int(spans[i, h, 0]), int(spans[i, h, 1]))
                    for h, hole in enumerate(holes)
                    if spans[i, h, 1] > spans[i, h, 0]
                }
                for i in range(self.num)
            ],
            alive=causes == 0,
            data=self.data,
            tokenizer=self.lm.tokenizer,
            holes={h.name: h for h in holes},
            prefix_text=self.prefix_text,
            hole_logprobs=np.asarray(hole_logp, np.float64),
        )
        return state, view

    # ---- deaths ----------------------------------------------------------------------------------

    def check_alive(self, state: RunState, seg_index: int, seg) -> None:
        causes = np.asarray(jax.device_get(state.particles.cause))
        if np.any(causes == 0):
            return
        counts = {Cause(int(c)): int(k) for c, k in zip(*np.unique(causes, return_counts=True)) if c != Cause.UNUSED}
        what = (
            f"hole {seg.name!r}" if isinstance(seg, Hole) else {Text: "text", Observe: "observe", Host: "host step"}[type(seg)]
        )
        reasons = "; ".join(f"{k} x {CAUSE_TEXT.get(c, c.name)}" for c, k in sorted(counts.items()))
        where = f" at {seg.label}" if seg.label else ""
        raise InferenceError(
            f"every particle died in {what}{where} ({reasons})",
            label=seg.label,
            segment=seg_index,
            causes={c.name.lower(): k for c, k in counts.items()},
        )


def _forced_rows(run: _Run, state: RunState, seg) -> tuple[RunState, list[list[int]]]:
    if seg.tokens is not None:
        return state, [list(seg.tokens)] * run.num
    state, view = run.view(state)
    rows = seg.render(view)
    rows = [[int(t) for t in r] for r in rows]
    if len(rows) != run.num:
        raise ValueError(f"{seg.label or type(seg).__name__}: render returned {len(rows)} rows for {run.num} particles")
    longest = max((len(r) for r in rows), default=0)
    if longest > seg.max_tokens:
        raise ValueError(f"{seg.label or type(seg).__name__}: rendered {longest} tokens, more than max_tokens={seg.max_tokens}")
    return state, rows


def _feed(run: _Run, state: RunState, rows: list[list[int]], observe: bool, pos_bound: int, cache_len: int):
    """Feed per-particle forced tokens in chunks of FEED_CHUNK columns. Returns (state, new pos_bound)."""
    longest = max((len(r) for r in rows), default=0)
    for c0 in range(0, longest, FEED_CHUNK):
        width = min(FEED_CHUNK, longest - c0)
        tpad = min(_pow2(width, 8), cache_len - pos_bound)
        toks = np.zeros((run.num, tpad), np.int32)
        lens = np.zeros((run.num,), np.int32)
        for i, r in enumerate(rows):
            part = r[c0 : c0 + width]
            toks[i, : len(part)] = part
            lens[i] = len(part)
        state = run.call(run.kern.feed, run.lm.params, run.consts, state, jnp.asarray(toks), jnp.asarray(lens), observe=observe)
        pos_bound += width
    return state, pos_bound


def _prefill(run: _Run, cache, feed: list[int], targets: list[int], observed: list[bool], position: int,
             cache_len: int):
    """Feed ``feed`` into a one-row ``cache`` from ``position`` on, in chunks of ``PREFILL_CHUNK``. Returns the
    summed log-probability of ``targets`` where ``observed`` (``targets[t]`` follows ``feed[t]``), the cache and
    the number of calls."""
    lp = jnp.float32(0.0)
    calls = 0
    for c0 in range(0, len(feed), PREFILL_CHUNK):
        width = min(PREFILL_CHUNK, len(feed) - c0)
        tpad = min(_pow2(width, 16), cache_len - position - c0)
        a = np.zeros((1, tpad), np.int32)
        b = np.zeros((1, tpad), np.int32)
        m = np.zeros((1, tpad), bool)
        a[0, :width] = feed[c0 : c0 + width]
        b[0, :width] = targets[c0 : c0 + width]
        m[0, :width] = observed[c0 : c0 + width]
        part, cache = run.call(run.kern.prefill, run.lm.params, run.consts, cache, jnp.asarray(a),
                               jnp.int32(position + c0), jnp.asarray(b), jnp.asarray(m))
        lp = lp + part
        calls += 1
    return lp, cache, calls


def _group_prefix(run: _Run, state: RunState, setup: _Setup) -> tuple[RunState, _Setup]:
    """Prefill prompt text that is the same for every particle of a group once per distinct text.

    The leading :class:`Text` segments after the shared prefix whose rows are the same for every particle of
    each group (batch mode: the rows of a batch differ only in their inputs, so each row's own prompt text is
    its group's) are prefilled at batch 1, continuing the shared prefix's cache, once per distinct text, and
    the caches are broadcast to the groups' particles, instead of being fed to every particle. The state is
    the same as after feeding them (the tokens go into the particles' buffers, positions advance): only the
    LM work is shared, and the prefill kernel already compiled for the shared prefix is reused. Stops at the
    first segment whose rows differ within a group and at ``Observe`` (scored: fed as usual). Returns the
    state and the setup with ``first`` moved past the segments it consumed.
    """
    segs = run.program.segments
    prefix, t0, num, n = setup.prefix, len(setup.prefix), run.num, run.n
    j = setup.first
    if run.kern.cfg.trace:  # MCMC moves resume at segment starts: keep every segment
        return state, setup
    ext: list[list[int]] = [[] for _ in range(run.groups)]
    while j < len(segs) and type(segs[j]) is Text:
        state, rows = _forced_rows(run, state, segs[j])
        if any(rows[i] != rows[i - i % n] for i in range(num)):
            break
        for g in range(run.groups):
            ext[g] += rows[g * n]
        j += 1
        p = state.particles
        lens = np.repeat([len(e) for e in ext], n).astype(np.int32)
        toks = np.zeros(p.tokens.shape, np.int32)
        for g, e in enumerate(ext):
            toks[g * n : (g + 1) * n, : len(e)] = e
        last = np.array([e[-1] if e else prefix[-1] for e in ext], np.int32).repeat(n)
        p = p._replace(tokens=jnp.asarray(toks), length=jnp.asarray(lens), last=jnp.asarray(last),
                       position=jnp.asarray(lens + np.int32(t0 - 1)))
        state = state._replace(particles=p)
    if j == setup.first:
        return state, setup
    cache1 = jax.tree.map(lambda x: x[:1], state.cache)  # every row holds the shared prefix
    calls = 0
    unique: dict[tuple, int] = {}
    caches = []
    for e in map(tuple, ext):
        if e in unique:
            continue
        unique[e] = len(caches)
        _, cache, k = _prefill(run, cache1, [prefix[-1]] + list(e[:-1]), list(e), [False] * len(e), t0 - 1,
                               setup.cache_len)
        calls += k
        caches.append(cache)
    if len(caches) == 1:
        cache = run.lm.broadcast(caches[0], num)
    else:
        cat = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *caches)
        cache = run.lm.reorder(cat, jnp.asarray(np.repeat([unique[tuple(e)] for e in ext], n).astype(np.int32)))
    setup = replace(setup, first=j, pos0=t0 - 1 + max(len(e) for e in ext), n_prefill=setup.n_prefill + calls)
    return state._replace(cache=cache), setup


def _hole_params(run: _Run, state: RunState, h: int, hole: Hole, budget: int, slack: int) -> tuple[RunState, HoleParams]:
    num = run.num
    s_total = run.program.num_states
    if callable(hole.start):
        state, view = run.view(state)
        start = np.asarray(hole.start(view), np.int64).reshape(-1)
        if start.shape != (num,):
            raise ValueError(f"hole {hole.name!r}: start callable returned shape {start.shape}, expected ({num},)")
    else:
        start = np.full((num,), int(hole.start))
    if np.any(start >= s_total) or np.any(start < -1):
        raise ValueError(f"hole {hole.name!r}: start state out of range [0, {s_total})")
    i32 = lambda x: jnp.full((num,), x, jnp.int32)  # noqa: E731
    hp = HoleParams(
        start=jnp.asarray(start, jnp.int32),
        hole=i32(h),
        max_tokens=jnp.int32(budget),
        max_steps=jnp.int32(budget + slack),
        pause=jnp.int32(BIG),
    )
    return state, hp


def _budget(hole: Hole, strategy: Strategy) -> int:
    return int(hole.max_tokens if hole.max_tokens is not None else strategy.max_tokens)


@dataclass
class Plan:
    """Which part of the program each particle runs in a :func:`walk` (MCMC moves; ``None``: everything).

    Particle ``i`` is *frozen* (left exactly as it is, KV cache included) before segment ``seg[i]``; at
    ``seg[i]`` it resumes: at the segment's start (``tok[i] < 0``, state recorded by the last walk's
    snapshot) or, in a hole, just before token ``tok[i]`` (recorded in its trace); from there on it runs
    normally. ``seg[i]`` past the last segment freezes it throughout.

    ``stop = (j, k)`` ends the walk inside hole segment ``j`` once particles have ``k`` tokens of it (the
    SMC time at which a rejuvenation move targets the intermediate distribution).
    """

    seg: np.ndarray
    tok: np.ndarray
    stop: tuple[int, int] | None = None


@dataclass
class _Setup:
    prefix: list[int]
    prefix_lp: float
    n_prefill: int
    first: int  # index of the first segment after the shared prefix
    cache_len: int
    slack: int
    pos0: int  # pos_bound at the first segment


def _setup(lm, program: SegmentProgram, base: Strategy, cfg, groups: int, key, progress) -> tuple[_Run, RunState, _Setup]:
    """Kernels, constants, the shared prefix prefilled once and broadcast, fresh particles."""
    kern = get_kernels(lm, cfg)
    n = base.num_particles
    num = groups * n
    tok = lm.tokenizer

    v = program.vocab
    if v > int(lm.vocab_size):
        raise ValueError(f"the program's token table has {v} columns but the model has {lm.vocab_size} logits")
    consts = Consts(
        table=program.table,
        temperature=jnp.float32(base.temperature),
        ess_threshold=jnp.float32(getattr(base, "ess", 0.0)),
    )
    pending = np.asarray(jax.device_get(program.table.pending))
    # Tokens a hole may take beyond its tokens(X) budget: its terminator (>= 1 byte per token) or an EOS.
    slack = int(pending.max(initial=0)) + 1
    r = _Run(lm, program, base, kern, consts, groups, n, progress)

    # ---- the shared prefix --------------------------------------------------------------------------
    segs = program.segments
    i0 = 0
    prefix: list[int] = []
    observed: list[bool] = []
    prefix_labels: list[str] = []
    while i0 < len(segs) and isinstance(segs[i0], (Text, Observe)) and segs[i0].tokens is not None:
        prefix += list(segs[i0].tokens)
        observed += [isinstance(segs[i0], Observe)] * len(segs[i0].tokens)
        if isinstance(segs[i0], Observe):
            prefix_labels.append(segs[i0].label)
        i0 += 1
    if not prefix or observed[0]:
        if tok.bos_id is None:
            raise ValueError("the program must start with prompt text: the model has no BOS token to condition on")
        prefix = [int(tok.bos_id)] + prefix
        observed = [False] + observed
    t0 = len(prefix)
    r.prefix_text = tok.decode(prefix, skip_special=True)

    rest = segs[i0:]
    sizes = []
    for seg in rest:
        if isinstance(seg, (Text, Observe)):
            sizes.append(len(seg.tokens) if seg.tokens is not None else int(seg.max_tokens))
        elif isinstance(seg, Hole):
            sizes.append(_budget(seg, base) + slack)
        else:
            sizes.append(0)
    need = t0 + sum(sizes)
    max_ctx = int(getattr(lm, "max_context", need + 1))
    if need > max_ctx:
        raise ValueError(f"the program needs up to {need} tokens of context; {lm.name} supports {max_ctx}")
    buf_len = _round_up(max(1, sum(sizes)), 32)
    # Attention cost grows with the cache length: no slack beyond what the program can use (forced-text
    # blocks are padded only up to the room left, see _feed).
    cache_len = min(max_ctx, _round_up(need + 1, 16))
    holes = program.holes

    prefix_lp, cache1, n_prefill = _prefill(r, lm.init_cache(1, cache_len), prefix[:-1], prefix[1:], observed[1:], 0,
                                            cache_len)
    prefix_lp = float(prefix_lp)
    if not prefix_lp > -math.inf:
        raise InferenceError(
            f"the observed prompt text has probability 0 at {'; '.join(prefix_labels)}",
            label="; ".join(prefix_labels),
            segment=0,
            causes={"observe": num},
        )
    cache = lm.broadcast(cache1, num)
    del cache1

    parts = init_particles(num, buf_len, len(holes), prefix[-1], t0 - 1, num_segments=len(segs) + 1, trace=cfg.trace)
    lw0 = prefix_lp if (cfg.weighted or cfg.select == "beam") else 0.0
    lw = np.full((num,), lw0, np.float32)
    sc = np.full((num,), prefix_lp, np.float32)
    cause = np.zeros((num,), np.int32)
    if cfg.select == "beam":  # identical copies: only beam 0 is a real candidate at the start
        lw[1:] = sc[1:] = -np.inf
        cause[1:] = int(Cause.UNUSED)
    parts = parts._replace(log_weight=jnp.asarray(lw), score=jnp.asarray(sc), cause=jnp.asarray(cause),
                           lw_total=jnp.asarray(lw))
    state = RunState(
        particles=parts,
        cache=cache,
        log_z=jnp.zeros((groups,), jnp.float32),
        key=key,
        n_tokens=jnp.int32(0),
        n_forward=jnp.int32(0),
    )
    setup = _Setup(prefix=prefix, prefix_lp=prefix_lp, n_prefill=n_prefill, first=i0, cache_len=cache_len,
                   slack=slack, pos0=t0 - 1)
    return r, state, setup


def walk(r: _Run, state: RunState, setup: _Setup, plan: Plan | None = None, *, check: bool = True,
         rejuvenate: Callable | None = None, replay: np.ndarray | None = None) -> RunState:
    """Run the program's segments after the shared prefix for every particle (or as ``plan`` says).

    With ``check``, every particle dying in a segment raises :class:`InferenceError` naming it. With
    ``rejuvenate(state, segment index, steps) -> state``, it is called inside holes after every decode
    step that resampled (the kernels end their chunk there: ``KernelConfig.stop_on_resample``).
    ``replay [P] bool``: these particles replay the execution recorded in their trace (tokens through
    ``force_len``; host data and host log-weight increments from the segment snapshots).
    """
    base, kern, params, consts = r.strategy, r.kern, r.lm.params, r.consts
    num = r.num
    segs = r.program.segments
    hole_index = {id(h): k for k, h in enumerate(r.program.holes)}
    tracing = kern.cfg.trace
    prefix_last = jnp.int32(setup.prefix[-1])
    pos_bound = setup.pos0
    for j in range(setup.first, len(segs)):
        seg = segs[j]
        if plan is not None:
            if plan.stop is not None and j > plan.stop[0]:
                break
            frozen = plan.seg > j
            here = plan.seg == j
            at_start = here & (plan.tok < 0)
            in_hole = here & (plan.tok >= 0)
            if at_start.any():
                first_hole = sum(isinstance(s, Hole) for s in segs[:j])
                state = r.call(kern.resume_segment, state, jnp.asarray(at_start), jnp.int32(j), jnp.int32(first_hole),
                               prefix_last)
                ids = np.asarray(jax.device_get(state.particles.trace.seg_data[:, j]))
                state = r.sync_data(state)
                for i in np.flatnonzero(at_start):
                    r.data[i] = dict(r.registry[int(ids[i])])
            running = ~frozen & ~in_hole
        else:
            frozen = in_hole = None
            running = np.ones((num,), bool)
        if tracing and running.any():
            # A replaying particle's snapshots are those of the execution it replays (the next segment's
            # is read back at host steps), so they are not overwritten.
            state = _snapshot(r, state, j, running if replay is None else running & ~replay)

        if isinstance(seg, (Text, Observe)):
            state, rows = _forced_rows(r, state, seg)
            if frozen is not None:
                rows = [[] if frozen[i] or in_hole[i] else row for i, row in enumerate(rows)]
            state, pos_bound = _feed(r, state, rows, isinstance(seg, Observe), pos_bound, setup.cache_len)
            if isinstance(seg, Observe) and check:
                r.check_alive(state, j, seg)
        elif isinstance(seg, Hole):
            budget = _budget(seg, base)
            state, hp = _hole_params(r, state, hole_index[id(seg)], seg, budget, setup.slack)
            stop_here = plan is not None and plan.stop is not None and plan.stop[0] == j
            if plan is not None:
                hp = hp._replace(start=jnp.where(jnp.asarray(running), hp.start, -1))
            if stop_here:
                hp = hp._replace(pause=jnp.int32(plan.stop[1]))
            state = r.call(kern.begin_hole, state, hp)
            if in_hole is not None and in_hole.any():
                state = r.call(kern.resume_hole, state, jnp.asarray(in_hole), jnp.asarray(plan.tok, jnp.int32),
                               jnp.full((num,), hole_index[id(seg)], jnp.int32), prefix_last)
            steps_done = 0
            # A predicate on every prefix (h.pred(X, prefix=true)) is a host call after every token.
            step_kern = kern if seg.prefix_check is None else get_kernels(r.lm, replace(kern.cfg, chunk=1))
            while True:
                state, ess_buf, res_buf, steps, active = r.call(step_kern.hole_chunk, params, consts, hp, state)
                if seg.prefix_check is not None and steps:
                    state, view = r.view(state)
                    ok = np.asarray(seg.prefix_check(view), bool).reshape(-1)
                    if ok.shape != (num,):
                        raise ValueError(f"hole {seg.name!r}: prefix_check returned {ok.shape[0]} values for {num} particles")
                    if not ok.all():
                        state = r.call(kern.add_log_weight, state, jnp.asarray(np.where(ok, 0.0, -np.inf), jnp.float32))
                        active = int(jnp.sum(Kernels.running(state.particles, hp)))
                steps, active = int(steps), int(active)
                steps_done += steps
                r.ess.append((ess_buf, res_buf, steps))
                if r.progress is not None:
                    r.progress(Progress(seg.name, steps_done, budget, active))
                if active and rejuvenate is not None and steps and bool(np.asarray(res_buf[steps - 1]).any()):
                    state = rejuvenate(state, j, steps_done)
                if active == 0:
                    break
                if steps_done > budget + setup.slack + 1:  # pragma: no cover - the budget rule guarantees termination
                    raise RuntimeError(f"hole {seg.name!r} did not finish within its budget of {budget} tokens")
            pos_bound += budget + setup.slack
            if np.any(np.asarray(jax.device_get(state.particles.cause)) == int(Cause.DEAD)):
                state = r.call(kern.refine_causes, consts, hp, state)
            if check:
                r.check_alive(state, j, seg)
            if stop_here:
                break
        elif isinstance(seg, Host):
            state, view = r.view(state)
            key, view.key = jax.random.split(state.key)
            state = state._replace(key=key)
            keep = {int(i): dict(r.data[i]) for i in np.flatnonzero(~running)} if plan is not None else {}
            inc = seg.fn(view)
            for i, d in keep.items():
                r.data[i] = d
            if inc is not None:
                inc = np.asarray(inc, np.float32).reshape(-1)
                if inc.shape != (num,):
                    raise ValueError(f"{seg.label or 'host step'}: returned {inc.shape[0]} values for {num} particles")
                if np.isnan(inc).any() or np.isposinf(inc).any():
                    raise ValueError(f"{seg.label or 'host step'}: log-weight increments must be finite or -inf")
                if keep:
                    inc = np.where(running, inc, np.float32(0.0))
            if replay is not None and replay.any():
                seg_lw, seg_data = jax.device_get((state.particles.trace.seg_log_weight[:, j : j + 2],
                                                   state.particles.trace.seg_data[:, j + 1]))
                inc = np.zeros((num,), np.float32) if inc is None else inc
                for i in np.flatnonzero(replay):
                    r.data[i] = dict(r.registry[int(seg_data[i])])
                    inc[i] = seg_lw[i, 1] - seg_lw[i, 0]
            if inc is not None:
                state = r.call(kern.add_log_weight, state, jnp.asarray(inc))
                if check:
                    r.check_alive(state, j, seg)
    else:
        if tracing:  # the end of the program: Trace slot len(segs)
            running = np.ones((num,), bool) if plan is None else plan.seg <= len(segs)
            if replay is not None:
                running = running & ~replay
            state = _snapshot(r, state, len(segs), running)
    return state


def _snapshot(r: _Run, state: RunState, j: int, mask: np.ndarray) -> RunState:
    """Record segment ``j``'s start for the particles in ``mask`` (Trace.seg_*; host data in the registry)."""
    state = r.sync_data(state)
    ids = np.full((r.num,), -1, np.int32)
    for i in np.flatnonzero(mask):
        ids[i] = r.register(r.data[i])
    return r.call(r.kern.snapshot, state, jnp.int32(j), jnp.asarray(mask), jnp.asarray(ids))


def run(
    lm,
    program: SegmentProgram,
    strategy: Strategy,
    *,
    seed: int = 0,
    key: jax.Array | None = None,
    groups: int = 1,
    chunk: int = 32,
    progress: Callable[[Progress], None] | None = None,
) -> InferenceResult:
    """Run ``program`` on ``lm`` with ``strategy``.

    Args:
        lm: a :class:`~lmprog.backends.base.LanguageModel`.
        program: the segment program.
        strategy: see :mod:`lmprog.inference.strategies`.
        seed / key: the PRNG seed, or an explicit JAX key (wins). Same key and options -> same result.
        groups: ``G`` independent copies of the strategy in one batch (``G x particles`` rows; resampling
            within a group); each group has its own log-evidence estimate. For replicated experiments.
        chunk: decode steps per device call (the host checks progress between chunks).
        progress: called with a :class:`Progress` after every chunk.

    Raises:
        InferenceError: every particle (of every group) died; names the segment's label.
    """
    t_start = time.perf_counter()
    strategy.validate()
    if isinstance(strategy, (MCMC, ParticleGibbs)) or getattr(strategy, "rejuvenate", 0):
        from lmprog.inference import mcmc

        return mcmc.run(lm, program, strategy, key=key if key is not None else jax.random.key(seed), groups=groups,
                        chunk=chunk, progress=progress)
    post = strategy if isinstance(strategy, (BestOf, Vote)) else None
    base = strategy.base_strategy() if post is not None else strategy
    if post is not None and groups != 1:
        raise ValueError(f"{strategy.name} runs a single group")
    cfg = base.kernel_config(groups=groups, chunk=chunk)
    k = key if key is not None else jax.random.key(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        r, state, setup = _setup(lm, program, base, cfg, groups, k, progress)
        state, setup = _group_prefix(r, state, setup)
        state = walk(r, state, setup)
        result = _assemble(r, state, setup.prefix, setup.prefix_lp, setup.n_prefill, t_start)
    if post is not None:
        result = _postprocess(post, result)
    result.stats["wall_s"] = time.perf_counter() - t_start
    return result


def _assemble(r: _Run, state: RunState, prefix, prefix_lp, n_prefill, t_start) -> InferenceResult:
    g, n = r.groups, r.n
    p = jax.device_get(state.particles)
    log_z_acc, n_tokens, n_forward = jax.device_get((state.log_z, state.n_tokens, state.n_forward))
    shape = lambda a: np.asarray(a).reshape((g, n) + np.asarray(a).shape[1:])  # noqa: E731
    lw = shape(p.log_weight).astype(np.float64)
    cfg = r.kern.cfg
    if cfg.weighted:
        lw = lw + np.asarray(log_z_acc, np.float64)[:, None]
        log_z = _logsumexp(lw) - math.log(n)
    else:
        log_z = None
    if r.data is not None:
        data = [dict(r.data[int(o)]) for o in p.origin]
    else:
        data = [{} for _ in range(g * n)]
    if r.ess:
        ess = np.concatenate([np.asarray(e)[:k] for e, _, k in r.ess]).reshape(-1, g)
        res = np.concatenate([np.asarray(d)[:k] for _, d, k in r.ess]).reshape(-1, g)
    else:
        ess, res = np.zeros((0, g)), np.zeros((0, g), bool)
    return InferenceResult(
        strategy=r.strategy.name,
        properly_weighted=r.strategy.properly_weighted,
        options=r.strategy.options(),
        holes=r.program.holes,
        tokenizer=r.lm.tokenizer,
        prefix_text=r.prefix_text,
        prefix_tokens=list(prefix),
        tokens=shape(p.tokens),
        lengths=shape(p.length),
        spans=shape(p.spans),
        log_weights=lw,
        scores=shape(p.score).astype(np.float64),
        causes=shape(p.cause),
        hole_logprobs=shape(p.hole_logp).astype(np.float64),
        log_z=log_z,
        ess=ess,
        resampled=res,
        stats={
            "tokens": int(n_tokens),
            "prefill_tokens": len(prefix) - 1,
            "forward_passes": int(n_forward) + n_prefill,
            "wall_s": time.perf_counter() - t_start,
            "compile_s": r.compile_s,
            "particles": n,
            "groups": g,
            "prefix_logprob": prefix_lp,
        },
        data=[data[k * n : (k + 1) * n] for k in range(g)],
    )


def _postprocess(strategy: Strategy, result: InferenceResult) -> InferenceResult:
    samples = result.samples
    if isinstance(strategy, BestOf):
        scores = np.array([float(strategy.score(s)) if s.alive else -np.inf for s in samples])
        best = scores == np.max(scores)
        weights = (best / best.sum())[None, :]
        result.extra["best_of_scores"] = scores
        result.extra["weights"] = weights
        result.scores = scores[None, :]
        result.log_weights = np.where(best, 0.0, -np.inf)[None, :]
        result.log_z = None
    else:
        assert isinstance(strategy, Vote)
        tally: dict = {}
        for s in samples:
            if s.alive and s.weight > 0:
                kk = strategy.key(s)
                tally[kk] = tally.get(kk, 0.0) + s.weight
        total = sum(tally.values())
        table = sorted(((kk, w / total) for kk, w in tally.items()), key=lambda kv: (-kv[1], repr(kv[0])))
        result.extra["vote"] = table
        result.extra["winner"] = table[0][0] if table else None
        result.extra["key"] = strategy.key
        if not strategy.properly_weighted:
            result.log_z = None
    result.strategy = strategy.name
    result.properly_weighted = strategy.properly_weighted
    result.options = strategy.options()
    result._samples.clear()  # decoded samples and weights are recomputed from the new scores/weights
    return result

