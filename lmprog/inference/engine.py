"""The engine's building blocks: set a run up, walk the program's segments, assemble the result.

Strategies (:mod:`lmprog.inference.strategies`) are algorithms written on these blocks; the engine knows
none of them. Per run::

    setup:    shared prefix (leading static Text/Observe) -> prefilled once, batch 1 -> its KV stored once
              (Consts.prefix), attended to by all P particles, whose own caches hold only the slots after it;
              prompt text that is the same within each group -> prefilled once per distinct text (batch mode)
    walk:     for each later segment, the walker of its kind:
        Text / Observe -> kernels.feed (one batched LM call per <= 64 tokens)
        Hole           -> kernels.begin_hole, then kernels.hole_chunk until every particle is done
                          (the token loop is a lax.while_loop on the device; one host sync per chunk)
        Host           -> one Python call for all particles (HostView), kernels.add_log_weight
        if every particle is dead -> InferenceError naming the segment
    assemble: particles -> InferenceResult

A walk runs every particle through every segment unless a :class:`Control` says otherwise: MCMC moves
(:mod:`lmprog.inference.moves`) freeze particles before their cut, resume them inside a hole, stop at a hole
step, or replay recorded host work; the walkers only see the resulting :class:`Part` masks.

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

from lmprog.backends.base import Prefix
from lmprog.backends.jax_setup import round_pow2, to_device
from lmprog.inference import aot, enumeration, kernel, memory, sharding
from lmprog.inference.evidence import log_z_standard_error
from lmprog.inference.holes import Progress, budget, hole_params
from lmprog.inference.holes import slack as hole_slack
from lmprog.inference.holes import room as _room
from lmprog.inference.kernel import TRACE_COUNTS, Kernels, get_kernels
from lmprog.inference.segments import (
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
from lmprog.inference.samples import Genealogy, InferenceResult, logsumexp
from lmprog.inference.state import Consts, RunState, init_particles

__all__ = ["Control", "Part", "Progress", "Run", "Setup", "assemble", "run", "setup", "simulate", "walk"]

#: A run keeps the ancestors, log-weights and lengths of its last GENEALOGY_STEPS resampling steps
#: (``InferenceResult.genealogy``), and at most GENEALOGY_ENTRIES particle entries of them in all (12 bytes each).
GENEALOGY_STEPS = 256
GENEALOGY_ENTRIES = 1 << 22
FEED_CHUNK = 64  # forced tokens per batched LM call (bounds the [P, T, V] logits of observed text)
PREFILL_CHUNK = 256  # prompt tokens per prefill call (batch 1)
#: The shared prefix's KV is stored once (``Consts.prefix``) rather than broadcast into every particle's cache.
#: ``False`` restores the broadcast (for comparisons: tests, ``benchmarks/bench_prompt_memory.py``).
SHARE_PREFIX = True


def run(lm, program: SegmentProgram, strategy, *, seed: int = 0, key: jax.Array | None = None, groups: int = 1,
        chunk: int = 32, progress: Callable[[Progress], None] | None = None, memory_limit=None) -> InferenceResult:
    """Run ``program`` on ``lm`` with ``strategy`` (any :class:`~lmprog.inference.strategies.Strategy`).

    Args:
        lm: a :class:`~lmprog.backends.base.LanguageModel`.
        program: the segment program.
        strategy: runs itself (``strategy.run``) on the blocks of this module.
        seed / key: the PRNG seed, or an explicit JAX key (wins). Same key and options -> same result.
        groups: ``G`` independent copies of the strategy in one batch (``G x particles`` rows; resampling
            within a group); each group has its own log-evidence estimate. Batch mode runs a row per group.
        chunk: decode steps per device call (the host checks progress between chunks).
        progress: called with a :class:`Progress` after every chunk.
        memory_limit: bytes (or ``"4G"``) the run may allocate beyond the loaded model; default: what the
            device has free. The run is estimated first (:mod:`lmprog.inference.memory`); one that does not fit
            runs in waves of fewer particles (``stats["waves"]``) when the strategy allows it.

    Raises:
        InferenceError: every particle (of every group) died; names the segment's label. Raised by a walker, it
            carries the particles as they were then (``error.partial``, an :class:`InferenceResult`: their
            tokens, causes, ``died_in``, genealogy; the CLI's ``--report`` draws them).
        MemoryPlanError: the run cannot fit; says how many particles would.
    """
    t_start = time.perf_counter()
    strategy.validate()
    if groups != 1 and not strategy.groupable:
        raise ValueError(f"{strategy.name} runs a single group")
    key = key if key is not None else jax.random.key(seed)
    mem = memory.plan(lm, program, strategy, groups, layout(lm, program, strategy), FEED_CHUNK, memory_limit)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        if mem.waves == 1:
            result = strategy.run(lm, program, key=key, groups=groups, chunk=chunk, progress=progress)
        else:
            result = _run_waves(lm, program, strategy, mem, key, chunk, progress)
    result.stats["wall_s"] = time.perf_counter() - t_start
    result.stats["memory_estimate"] = mem.need
    return result


def _run_waves(lm, program, strategy, mem, key, chunk, progress) -> InferenceResult:
    """``strategy``'s particles in ``mem.waves`` independent runs of at most ``mem.wave_particles`` (keys folded
    from ``key``), side by side: :meth:`InferenceResult.concat` (an island particle filter, properly weighted)."""
    n, m = strategy.num_particles, mem.wave_particles
    sizes = [m] * (n // m) + ([n % m] if n % m else [])
    waves: list = []
    for w, k in enumerate(sizes):
        try:
            waves.append(strategy.with_particles(k).run(lm, program, key=jax.random.fold_in(key, w), groups=1,
                                                        chunk=chunk, progress=progress))
        except InferenceError as exc:  # this island's Z estimate is 0: its particles are dead, not dropped
            waves.append(exc)
    alive = [w for w in waves if isinstance(w, InferenceResult)]
    if not alive:
        raise waves[0]
    template = max(alive, key=lambda r: r.num_particles)
    dead = sum(1 for w in waves if not isinstance(w, InferenceResult))
    waves = [w if isinstance(w, InferenceResult) else template.dead_copy(k, w) for w, k in zip(waves, sizes)]
    result = InferenceResult.concat(waves).relabel(strategy)
    result.stats["dead_waves"] = dead
    return result


def simulate(lm, program: SegmentProgram, strategy, cfg, *, key, groups: int = 1, progress=None) -> InferenceResult:
    """One pass of weighted particles through the whole program with the kernels of ``cfg``."""
    t_start = time.perf_counter()
    r, state, s = setup(lm, program, strategy, cfg, groups, key, progress)
    state, s = prefill_group_text(r, state, s)
    state = walk(r, state, s)
    return assemble(r, state, s, t_start)


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def _round_own(n: int) -> int:
    """Own cache slots, rounded so that programs of nearby sizes share compilations: to 4 up to 32 slots (a
    short hole's few slots are what every particle pays for), then to 16."""
    return _round_up(n, 4 if n <= 32 else 16)


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run keeps on the host around the device state: the model, program, strategy and kernels, the
    per-particle host data (``let`` values, ``sample`` draws), the ESS history and the compile time."""

    lm: object
    program: SegmentProgram
    strategy: object
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
    host_pool: object = None  # the host matcher's states (lmprog.automata.host.HostPool) when holes use it
    # Holes generated by exact enumeration (lmprog.inference.enumeration): name -> what stats["enumerated"] says.
    enumerated: dict = field(default_factory=dict)
    # The resampling steps of the run (the last ones: genealogy_cap), each (decode step, segment, ancestors [P],
    # log-weights [P], lengths [P], resampled [G]) on the host (Kernels.hole_chunk's genealogy), and how many
    # earlier ones were dropped.
    genealogy: list = field(default_factory=list)
    genealogy_dropped: int = 0
    # [P] the segment each particle died in (-1: alive or not known), aligned like `data` (note_deaths).
    died: np.ndarray | None = None
    # segment -> [G] particles found newly dead at its end (those resampling replaced later included)
    killed: dict = field(default_factory=dict)
    placement: object = None  # particles over devices (lmprog.inference.sharding.Placement); None: one device
    # [P] bool: host views show only these particles alive (None: all). Rolling MCMC moves run a segment's host
    # callables for the chains that have reached it, while others are in the middle of other holes.
    only: np.ndarray | None = None

    @property
    def num(self) -> int:
        return self.groups * self.n

    def fork(self, kern: Kernels) -> "Run":
        """The same run with other kernels, its own ESS history and no progress reports (MCMC proposals);
        host data and snapshots are shared. :meth:`join` takes the fork's data and compile time back."""
        return replace(self, kern=kern, progress=None, ess=[], genealogy=[])

    def join(self, fork: "Run") -> None:
        self.data, self.compile_s = fork.data, fork.compile_s

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; its time counts as compile time if it traced a kernel or loaded one from disk."""
        before = sum(TRACE_COUNTS.values()) + sum(aot.LOADS.values())
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if sum(TRACE_COUNTS.values()) + sum(aot.LOADS.values()) != before:
            self.compile_s += time.perf_counter() - t
        return out

    # ---- host data -------------------------------------------------------------------------------

    def sync_data(self, state: RunState) -> RunState:
        """Align ``data`` with the particles (follow resampling since the last sync)."""
        return self.align_data(state, np.asarray(jax.device_get(state.particles.origin)))

    def align_data(self, state: RunState, origin) -> RunState:
        """``data[i]`` becomes a copy of the data of particle ``origin[i]``; origins restart from here."""
        if self.data is None:
            self.data = [{} for _ in range(self.num)]
        self.data = [dict(self.data[int(o)]) for o in origin]
        if self.died is not None:
            self.died = self.died[np.asarray(origin)]
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
        state = self.align_data(state, origin)
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
            alive=(causes == 0) if self.only is None else (causes == 0) & self.only,
            data=self.data,
            tokenizer=self.lm.tokenizer,
            holes={h.name: h for h in holes},
            prefix_text=self.prefix_text,
            hole_logprobs=np.asarray(hole_logp, np.float64),
        )
        return state, view

    # ---- genealogy ---------------------------------------------------------------------------------

    @property
    def genealogy_cap(self) -> int:
        """Resampling steps kept: the last :data:`GENEALOGY_STEPS`, fewer when ``P`` is so large that they would
        exceed :data:`GENEALOGY_ENTRIES` particle entries."""
        return max(1, min(GENEALOGY_STEPS, GENEALOGY_ENTRIES // max(1, self.num)))

    def note_genealogy(self, j: int, res_buf, steps: int, gen) -> None:
        """Keep the ancestors, log-weights and lengths of the steps of one hole chunk that resampled
        (``gen``: :meth:`Kernels.hole_chunk`'s, ``None`` for kernels that never resample). Call before the
        chunk's ESS rows are appended to :attr:`ess` (their index is the decode step)."""
        if gen is None or not steps:
            return
        did = np.asarray(res_buf)[:steps]
        rows = np.flatnonzero(did.any(axis=1))
        if not rows.size:
            return
        t0 = sum(k for _, _, k in self.ess)
        anc, lw, length = (np.asarray(a)[rows] for a in jax.device_get(gen))
        self.genealogy.extend((t0 + int(r), j, anc[k], lw[k], length[k], did[r]) for k, r in enumerate(rows))
        extra = len(self.genealogy) - self.genealogy_cap
        if extra > 0:
            del self.genealogy[:extra]
            self.genealogy_dropped += extra

    # ---- deaths ----------------------------------------------------------------------------------

    def note_deaths(self, state: RunState, seg_index: int, seg) -> RunState:
        """Record segment ``seg_index`` as where the particles that died in it died (:attr:`died`), then
        :meth:`check_alive`. Host data and ``died`` are aligned with the particles first (when resampling
        moved them since the last sync)."""
        causes, origin = (np.asarray(a) for a in jax.device_get((state.particles.cause, state.particles.origin)))
        if not np.array_equal(origin, np.arange(self.num)):
            state = self.align_data(state, origin)
        died = self.died if self.died is not None else np.full((self.num,), -1, np.int32)
        fresh = (causes != 0) & (causes != int(Cause.UNUSED)) & (died < 0)
        self.died = np.where(fresh, np.int32(seg_index), died).astype(np.int32)
        if fresh.any():
            self.killed[seg_index] = self.killed.get(seg_index, 0) + fresh.reshape(self.groups, self.n).sum(axis=1)
        try:
            self.check_alive(state, seg_index, seg, causes)
        except InferenceError as exc:
            exc.state = state  # walk() turns it into the run's particles: exc.partial
            raise
        return state

    def check_alive(self, state: RunState, seg_index: int, seg, causes=None) -> None:
        """Raise :class:`InferenceError` naming segment ``seg`` if no particle is alive after it."""
        if causes is None:
            causes = np.asarray(jax.device_get(state.particles.cause))
        if np.any(causes == 0):
            return
        counts = {Cause(int(c)): int(k) for c, k in zip(*np.unique(causes, return_counts=True)) if c != Cause.UNUSED}
        reasons = "; ".join(f"{k} x {CAUSE_TEXT.get(c, c.name)}" for c, k in sorted(counts.items()))
        where = f" at {seg.label}" if seg.label else ""
        raise InferenceError(
            f"every particle died in {_describe(seg)}{where} ({reasons})",
            label=seg.label,
            segment=seg_index,
            causes={c.name.lower(): k for c, k in counts.items()},
        )


def _describe(seg) -> str:
    return f"hole {seg.name!r}" if type(seg) is Hole else {Text: "text", Observe: "observe", Host: "host step"}[type(seg)]


@dataclass
class Setup:
    """What :func:`setup` computed once per run: the shared prefix (tokens, log-probability of its observed
    part, prefill calls), the first segment to walk, the end of the KV cache (positions ``< cache_len``: the
    shared prefix's ``len(prefix) - 1`` then the particles' own slots), the terminator slack of holes and the
    position bound at the first segment."""

    prefix: list[int]
    prefix_lp: float
    n_prefill: int
    first: int
    cache_len: int
    slack: int
    pos0: int


@dataclass(frozen=True)
class Layout:
    """Where a run's tokens go, from the program and strategy alone (no allocation): the shared prefix (its
    tokens, which are observed, the first segment after it), the terminator slack of holes, each particle's
    token buffer (``buf_len``), the end of the KV cache (``cache_len``: positions ``< cache_len``), the shared
    prefix's prefilled positions ``s0`` and its cache buffer (``prefix_buf``), and each particle's own cache
    slots (``own_len``). :func:`setup` allocates by it; the memory pre-flight estimates by it."""

    prefix: list
    observed: list
    first: int
    slack: int
    buf_len: int
    cache_len: int
    s0: int
    prefix_buf: int

    @property
    def own_len(self) -> int:
        return self.cache_len - self.s0 if SHARE_PREFIX else self.cache_len


def layout(lm, program: SegmentProgram, strategy) -> Layout:
    """The :class:`Layout` of ``program`` run with ``strategy`` on ``lm``. Raises ``ValueError`` when the program
    needs more context than the model has, or starts without text on a model without BOS."""
    tok = lm.tokenizer
    slack = hole_slack(program.table)
    segs = program.segments
    i0 = 0
    prefix: list[int] = []
    observed: list[bool] = []
    while i0 < len(segs) and type(segs[i0]) in (Text, Observe) and segs[i0].tokens is not None:
        prefix += list(segs[i0].tokens)
        observed += [type(segs[i0]) is Observe] * len(segs[i0].tokens)
        i0 += 1
    if not prefix or observed[0]:
        if tok.bos_id is None:
            raise ValueError("the program must start with prompt text: the model has no BOS token to condition on")
        prefix = [int(tok.bos_id)] + prefix
        observed = [False] + observed
    t0 = len(prefix)
    sizes = [_room(seg, strategy, slack) for seg in segs[i0:]]
    need = t0 + sum(sizes)
    max_ctx = int(getattr(lm, "max_context", need + 1))
    if need > max_ctx:
        raise ValueError(f"the program needs up to {need} tokens of context; {lm.name} supports {max_ctx}")
    buf_len = _round_up(max(1, sum(sizes)), 32)
    # The shared prefix is stored once: its KV (positions 0 .. s0 - 1, prefilled at batch 1) becomes
    # Consts.prefix, attended to by every particle, and the particles' own caches hold positions s0 ..
    # cache_len - 1 only. Attention cost grows with the cache length: no slack beyond what the program can use
    # (forced-text blocks are padded only up to the room left, see _feed); lengths are rounded (_round_own) so
    # that programs of nearby sizes share compilations.
    s0 = t0 - 1  # prefix[:-1] is prefilled; prefix[-1] is every particle's pending token, at position s0
    if SHARE_PREFIX:
        cache_len = s0 + min(max_ctx - s0, _round_own(need + 1 - s0))
        prefix_buf = _round_up(max(s0, 1), 16)
    else:  # the prefix broadcast into every particle's cache
        cache_len = prefix_buf = min(max_ctx, _round_up(need + 1, 16))
    return Layout(prefix, observed, i0, slack, buf_len, cache_len, s0, prefix_buf)


def setup(lm, program: SegmentProgram, strategy, cfg, groups: int, key, progress) -> tuple[Run, RunState, Setup]:
    """Kernels, constants, the shared prefix prefilled once (``Consts.prefix``), fresh particles."""
    if getattr(strategy, "lookahead", 0) and not cfg.lookahead:  # importance / smc(lookahead=k): lookahead.py
        cfg = replace(cfg, lookahead=int(strategy.lookahead))
    kern = get_kernels(lm, cfg)
    n = strategy.num_particles
    num = groups * n
    tok = lm.tokenizer

    v = program.vocab
    if v > int(lm.vocab_size):
        raise ValueError(f"the program's token table has {v} columns but the model has {lm.vocab_size} logits")
    table, pool = program.table, None
    if hasattr(table, "bind"):  # host-matcher holes: this run's pool of matcher states (lmprog.automata.host)
        table, pool = table.bind()
    consts = Consts(
        table=table,
        temperature=to_device(strategy.temperature, np.float32),
        ess_threshold=to_device(getattr(strategy, "ess", 0.0), np.float32),
    )
    placement = sharding.plan(num, groups)  # particles over local devices; None: one device, nothing placed
    r = Run(lm if placement is None else placement.model(lm), program, strategy, kern, consts, groups, n, progress,
            host_pool=pool, placement=placement)
    lay = layout(lm, program, strategy)
    prefix, observed, i0, slack = lay.prefix, lay.observed, lay.first, lay.slack
    t0, s0, buf_len, cache_len, prefix_buf = len(prefix), lay.s0, lay.buf_len, lay.cache_len, lay.prefix_buf
    prefix_labels = [seg.label for seg in program.segments[:i0] if type(seg) is Observe]
    r.prefix_text = tok.decode(prefix, skip_special=True)
    segs = program.segments

    prefix_lp, cache1, n_prefill = _prefill(r, r.call(kern.init_cache, batch=1, max_len=prefix_buf), prefix[:-1], prefix[1:], observed[1:], 0,
                                            prefix_buf)
    prefix_lp = float(prefix_lp)
    if not prefix_lp > -math.inf:
        raise InferenceError(
            f"the observed prompt text has probability 0 at {'; '.join(prefix_labels)}",
            label="; ".join(prefix_labels),
            segment=0,
            causes={"observe": num},
        )
    if SHARE_PREFIX:
        r.consts = consts = consts._replace(prefix=Prefix(cache1, to_device(s0, np.int32)))
        cache = (r.call(kern.init_cache, batch=num, max_len=cache_len - s0) if placement is None
                 else placement.zeros(lambda: lm.init_cache(num, cache_len - s0)))
    else:
        cache = lm.broadcast(cache1, num)
    del cache1

    parts = init_particles(num, buf_len, len(program.holes), prefix[-1], t0 - 1, num_segments=len(segs) + 1,
                           trace=cfg.trace)
    lw0 = prefix_lp if (cfg.weighted or cfg.select == "beam") else 0.0
    lw = np.full((num,), lw0, np.float32)
    sc = np.full((num,), prefix_lp, np.float32)
    cause = np.zeros((num,), np.int32)
    if cfg.select == "beam":  # identical copies: only each group's beam 0 is a real candidate at the start
        copies = np.arange(num) % (num // groups) != 0
        lw[copies] = sc[copies] = -np.inf
        cause[copies] = int(Cause.UNUSED)
    parts = parts._replace(log_weight=to_device(lw), score=to_device(sc), cause=to_device(cause),
                           lw_total=to_device(lw))
    state = RunState(
        particles=parts,
        cache=cache,
        log_z=to_device(np.zeros((groups,), np.float32)),
        key=key,
        n_tokens=to_device(0, np.int32),
        n_forward=to_device(0, np.int32),
        n_rows=to_device(0, np.int32),
    )
    if placement is not None:
        r.consts, state = placement.place(r.consts), placement.place(state)
    s = Setup(prefix=prefix, prefix_lp=prefix_lp, n_prefill=n_prefill, first=i0, cache_len=cache_len, slack=slack,
              pos0=t0 - 1)
    return r, state, s


def _prefill(run: Run, cache, feed: list[int], targets: list[int], observed: list[bool], position: int,
             cache_len: int):
    """Feed ``feed`` into a one-row ``cache`` from ``position`` on, in chunks of ``PREFILL_CHUNK``. Returns the
    summed log-probability of ``targets`` where ``observed`` (``targets[t]`` follows ``feed[t]``), the cache and
    the number of calls."""
    parts = []
    calls = 0
    for c0 in range(0, len(feed), PREFILL_CHUNK):
        width = min(PREFILL_CHUNK, len(feed) - c0)
        tpad = min(round_pow2(width, 16), cache_len - position - c0)
        a = np.zeros((1, tpad), np.int32)
        b = np.zeros((1, tpad), np.int32)
        m = np.zeros((1, tpad), bool)
        a[0, :width] = feed[c0 : c0 + width]
        b[0, :width] = targets[c0 : c0 + width]
        m[0, :width] = observed[c0 : c0 + width]
        part, cache = run.call(run.kern.prefill, run.lm.params, run.consts, cache, to_device(a),
                               to_device(position + c0, np.int32), to_device(b), to_device(m))
        parts.append(part)
        calls += 1
    return float(sum(np.asarray(jax.device_get(parts), np.float32))), cache, calls


def prefill_group_text(run: Run, state: RunState, s: Setup) -> tuple[RunState, Setup]:
    """Prefill prompt text that is the same for every particle of a group once per distinct text.

    The leading :class:`Text` segments after the shared prefix whose rows are the same for every particle of
    each group (batch mode: the rows of a batch differ only in their inputs, so each row's own prompt text is
    its group's) are prefilled at batch 1 into a one-row own cache (attending to the shared prefix), once per
    distinct text, and the caches are broadcast to the groups' particles, instead of being fed to every
    particle. The state is the same as after feeding them (the tokens go into the particles' buffers,
    positions advance): only the LM work is shared. Stops at the first segment whose rows differ within a
    group and at ``Observe`` (scored: fed as usual). Returns the state and the setup with ``first`` moved past
    the segments it consumed. Not for traced runs (MCMC moves resume at segment starts, so every segment is
    kept)."""
    segs = run.program.segments
    prefix, t0, num, n = s.prefix, len(s.prefix), run.num, run.n
    j = s.first
    if run.kern.cfg.trace:
        return state, s
    ext: list[list[int]] = [[] for _ in range(run.groups)]
    while j < len(segs) and type(segs[j]) is Text:
        state, rows = forced_rows(run, state, segs[j])
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
    if j == s.first:
        return state, s
    cache1 = jax.tree.map(lambda x: x[:1], state.cache)  # every row is the same: empty (or the shared prefix)
    calls = 0
    unique: dict[tuple, int] = {}
    caches = []
    for e in map(tuple, ext):
        if e in unique:
            continue
        unique[e] = len(caches)
        _, cache, k = _prefill(run, cache1, [prefix[-1]] + list(e[:-1]), list(e), [False] * len(e), t0 - 1,
                               s.cache_len)
        calls += k
        caches.append(cache)
    # The particles of groups with the same text share one row holding it (rows past the distinct texts: free).
    which = [unique[tuple(e)] for e in ext]
    state = state._replace(particles=state.particles._replace(row=jnp.asarray(np.repeat(which, n).astype(np.int32))))
    if len(caches) == 1:
        cache = run.lm.broadcast(caches[0], num)
    else:
        cat = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *caches)
        fill = np.zeros(num, np.int32)
        fill[: len(caches)] = np.arange(len(caches))
        cache = run.lm.reorder(cat, jnp.asarray(fill))
    s = replace(s, first=j, pos0=t0 - 1 + max(len(e) for e in ext), n_prefill=s.n_prefill + calls)
    state = state._replace(cache=cache)
    return (state if run.placement is None else run.placement.place(state)), s


# ------------------------------------------------------------------------------------------------------
# Walking the segments
# ------------------------------------------------------------------------------------------------------


@dataclass
class Part:
    """Which particles do what in one segment of a walk.

    ``running [P]``: run the segment from its start (the others keep their state, KV cache included).
    ``resume [P]`` (holes): continue inside this hole just before token ``resume_at[i]`` (an MCMC cut; the
    state there is in the particle's trace). ``pause``: particles idle once they have ``pause`` tokens of this
    hole (``None``: no pause). ``replay [P]``: these particles replay host data and host log-weights recorded
    in their trace (particle Gibbs' reference).
    """

    running: np.ndarray
    resume: np.ndarray | None = None
    resume_at: np.ndarray | None = None
    pause: int | None = None
    replay: np.ndarray | None = None

    @property
    def everyone(self) -> bool:
        return bool(self.running.all()) and self.resume is None and self.replay is None


class Control:
    """Who runs which segment of a :func:`walk`. This base class runs every particle through everything;
    MCMC moves subclass it (:mod:`lmprog.inference.moves`)."""

    def enter(self, run: Run, state: RunState, s: "Setup", j: int) -> tuple[RunState, Part]:
        """Before segment ``j``: the state (particles may be moved back to a cut) and the :class:`Part`."""
        return state, Part(running=np.ones((run.num,), bool))

    def after(self, j: int) -> bool:
        """Whether the walk ends after segment ``j``."""
        return False

    def at_end(self, run: Run) -> np.ndarray:
        """``[P]`` particles whose end of program is recorded in their trace."""
        return np.ones((run.num,), bool)


EVERYONE = Control()


def walk(run: Run, state: RunState, s: Setup, control: Control = EVERYONE, *, check: bool = True,
         on_resample: Callable | None = None) -> RunState:
    """Run the program's segments after the shared prefix, each with the walker of its kind.

    With ``check``, every particle dying in a segment raises :class:`InferenceError` naming it. With
    ``on_resample(state, segment index, steps) -> state``, it is called inside holes after every decode
    step that resampled (the kernels end their chunk there: ``KernelConfig.stop_on_resample``).
    """
    segs = run.program.segments
    tracing = run.kern.cfg.trace
    pos_bound = s.pos0
    for j in range(s.first, len(segs)):
        seg = segs[j]
        state, part = control.enter(run, state, s, j)
        if tracing and part.running.any():
            # A replaying particle's snapshots are those of the execution it replays (the next segment's
            # is read back at host steps), so they are not overwritten.
            state = snapshot(run, state, j, part.running if part.replay is None else part.running & ~part.replay)
        try:
            state, pos_bound = WALKERS[type(seg)](run, state, s, j, seg, part, pos_bound, check, on_resample)
        except InferenceError as exc:  # every particle died: the error carries them (the report shows them)
            if getattr(exc, "state", None) is not None:
                exc.partial = assemble(run, exc.state, s, time.perf_counter())
                exc.partial.stats["wall_s"] = None  # (not the run's: it ended here)
                exc.state = None
            raise
        if control.after(j):
            break
    else:
        if tracing:  # the end of the program: Trace slot len(segs)
            state = snapshot(run, state, len(segs), control.at_end(run))
    return state


def forced_rows(run: Run, state: RunState, seg) -> tuple[RunState, list[list[int]]]:
    """Each particle's tokens for a Text/Observe segment (static, or rendered from a host view)."""
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


def _walk_forced(run: Run, state: RunState, s: Setup, j: int, seg, part: Part, pos_bound: int, check: bool, _):
    """Text (conditioned on) and Observe (scored): feed each running particle its rows."""
    state, rows = forced_rows(run, state, seg)
    if not part.everyone:
        rows = [row if part.running[i] else [] for i, row in enumerate(rows)]
    observe = type(seg) is Observe
    state, pos_bound = _feed(run, state, rows, observe, pos_bound, s.cache_len)
    if observe and check:
        state = run.note_deaths(state, j, seg)
    return state, pos_bound


def _feed(run: Run, state: RunState, rows: list[list[int]], observe: bool, pos_bound: int, cache_len: int):
    """Feed per-particle forced tokens in chunks of FEED_CHUNK columns. Returns (state, new pos_bound)."""
    longest = max((len(r) for r in rows), default=0)
    for c0 in range(0, longest, FEED_CHUNK):
        width = min(FEED_CHUNK, longest - c0)
        tpad = min(round_pow2(width, 8), cache_len - pos_bound)
        toks = np.zeros((run.num, tpad), np.int32)
        lens = np.zeros((run.num,), np.int32)
        for i, r in enumerate(rows):
            chunk = r[c0 : c0 + width]
            toks[i, : len(chunk)] = chunk
            lens[i] = len(chunk)
        state = run.call(run.kern.feed, run.lm.params, run.consts, state, to_device(toks), to_device(lens),
                         observe=observe)
        pos_bound += width
    return state, pos_bound


def _walk_hole(run: Run, state: RunState, s: Setup, j: int, seg: Hole, part: Part, pos_bound: int, check: bool,
               on_resample):
    """Generate the hole for every running particle: the device token loop, one chunk per call (or, for a small
    finite hole, exact enumeration: :mod:`lmprog.inference.enumeration`)."""
    state, plan = enumeration.plan(run, state, s, j, seg, part)
    if plan is not None:
        return enumeration.walk_hole(run, state, s, j, seg, part, pos_bound, check, on_resample, plan,
                                     token_loop)
    num, kern = run.num, run.kern
    h = run.program.hole_index(seg.name)
    budget_ = budget(seg, run.strategy)
    state, hp = hole_params(run, state, h, seg, budget_, s.slack)
    if not part.everyone:
        hp = hp._replace(start=jnp.where(jnp.asarray(part.running), hp.start, -1))
    if part.pause is not None:
        hp = hp._replace(pause=to_device(part.pause, np.int32))
    state = run.call(kern.begin_hole, state, hp)
    if part.resume is not None and part.resume.any():
        state = run.call(kern.resume_hole, state, jnp.asarray(part.resume), jnp.asarray(part.resume_at, jnp.int32),
                         jnp.full((num,), h, jnp.int32), jnp.int32(s.prefix[-1]))
    state = token_loop(run, state, s, j, seg, hp, budget_, on_resample)
    pos_bound += _room(seg, run.strategy, s.slack)  # the slots setup reserved for the hole
    if np.any(np.asarray(jax.device_get(state.particles.cause)) == int(Cause.DEAD)):
        state = run.call(kern.refine_causes, run.consts, hp, state)
    if check:
        state = run.note_deaths(state, j, seg)
    return state, pos_bound


def token_loop(run: Run, state: RunState, s: Setup, j: int, seg: Hole, hp, budget_: int, on_resample,
               steps_done: int = 0) -> RunState:
    """The device token loop of hole ``seg`` for the particles still running in it (``begin_hole`` done), one
    chunk per call until none runs: host prefix checks, genealogy, ESS rows, progress and ``on_resample`` after
    each chunk. Enumeration continues here the particles it left inside the hole."""
    num, kern = run.num, run.kern
    # A predicate on every prefix (h.pred(X, prefix=true)) is a host call after every token.
    step_kern = kern if seg.prefix_check is None else get_kernels(run.lm, replace(kern.cfg, chunk=1))
    steps_done0 = steps_done
    while True:
        state, ess_buf, res_buf, steps, active, gen = run.call(step_kern.hole_chunk, run.lm.params, run.consts, hp,
                                                               state)
        if seg.prefix_check is not None and steps:
            state, view = run.view(state)
            ok = np.asarray(seg.prefix_check(view), bool).reshape(-1)
            if ok.shape != (num,):
                raise ValueError(f"hole {seg.name!r}: prefix_check returned {ok.shape[0]} values for {num} particles")
            if not ok.all():
                state = run.call(kern.add_log_weight, state, jnp.asarray(np.where(ok, 0.0, -np.inf), jnp.float32))
                active = int(jnp.sum(Kernels.running(state.particles, hp)))
        steps, active = int(steps), int(active)
        steps_done += steps
        run.note_genealogy(j, res_buf, steps, gen)
        run.ess.append((ess_buf, res_buf, steps))
        if run.progress is not None:
            run.progress(Progress(seg.name, steps_done, budget_, active))
        if active and on_resample is not None and steps and bool(np.asarray(res_buf[steps - 1]).any()):
            state = on_resample(state, j, steps_done)
        if active == 0:
            break
        if steps_done > steps_done0 + budget_ + s.slack + 1:  # pragma: no cover - the budget rule guarantees it
            raise RuntimeError(f"hole {seg.name!r} did not finish within its budget of {budget_} tokens")
    return state


def _walk_host(run: Run, state: RunState, s: Setup, j: int, seg: Host, part: Part, pos_bound: int, check: bool, _):
    """One batched Python call for all particles; its log-weight increments go to the running ones."""
    num = run.num
    state, view = run.view(state)
    key, view.key = jax.random.split(state.key)
    state = state._replace(key=key)
    keep = {} if part.everyone else {int(i): dict(run.data[i]) for i in np.flatnonzero(~part.running)}
    inc = seg.fn(view)
    for i, d in keep.items():
        run.data[i] = d
    if inc is not None:
        inc = np.asarray(inc, np.float32).reshape(-1)
        if inc.shape != (num,):
            raise ValueError(f"{seg.label or 'host step'}: returned {inc.shape[0]} values for {num} particles")
        if np.isnan(inc).any() or np.isposinf(inc).any():
            raise ValueError(f"{seg.label or 'host step'}: log-weight increments must be finite or -inf")
        if keep:
            inc = np.where(part.running, inc, np.float32(0.0))
    if part.replay is not None and part.replay.any():
        seg_lw, seg_data = jax.device_get((state.particles.trace.seg_log_weight[:, j : j + 2],
                                           state.particles.trace.seg_data[:, j + 1]))
        inc = np.zeros((num,), np.float32) if inc is None else inc
        for i in np.flatnonzero(part.replay):
            run.data[i] = dict(run.registry[int(seg_data[i])])
            inc[i] = seg_lw[i, 1] - seg_lw[i, 0]
    if inc is not None:
        state = run.call(run.kern.add_log_weight, state, to_device(inc))
        if check:
            state = run.note_deaths(state, j, seg)
    return state, pos_bound


#: The walker of each segment kind.
WALKERS = {Text: _walk_forced, Observe: _walk_forced, Hole: _walk_hole, Host: _walk_host}


def snapshot(run: Run, state: RunState, j: int, mask: np.ndarray) -> RunState:
    """Record segment ``j``'s start for the particles in ``mask`` (Trace.seg_*; host data in the registry)."""
    state = run.sync_data(state)
    ids = np.full((run.num,), -1, np.int32)
    for i in np.flatnonzero(mask):
        ids[i] = run.register(run.data[i])
    return run.call(run.kern.snapshot, state, to_device(j, np.int32), to_device(mask), to_device(ids))


# ------------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------------


def assemble(run: Run, state: RunState, s: Setup, t_start: float) -> InferenceResult:
    """The particles as an :class:`InferenceResult` (absolute log-weights: ``log_z`` folded in)."""
    g, n = run.groups, run.n
    p = jax.device_get(state.particles)
    log_z_acc, n_tokens, n_forward = jax.device_get((state.log_z, state.n_tokens, state.n_forward))
    shape = lambda a: np.asarray(a).reshape((g, n) + np.asarray(a).shape[1:])  # noqa: E731
    lw = shape(p.log_weight).astype(np.float64)
    cfg = run.kern.cfg
    if cfg.weighted:
        lw = lw + np.asarray(log_z_acc, np.float64)[:, None]
        log_z = logsumexp(lw) - math.log(n)
    else:
        log_z = None
    if run.data is not None:
        data = [dict(run.data[int(o)]) for o in p.origin]
    else:
        data = [{} for _ in range(g * n)]
    if run.ess:
        ess = np.concatenate([np.asarray(e)[:k] for e, _, k in run.ess]).reshape(-1, g)
        res = np.concatenate([np.asarray(d)[:k] for _, d, k in run.ess]).reshape(-1, g)
    else:
        ess, res = np.zeros((0, g)), np.zeros((0, g), bool)
    # Conditional SMC (particle Gibbs) keeps a reference particle: its weights estimate no evidence alone.
    log_z_se = (log_z_standard_error(lw, shape(p.eve), res.sum(axis=0))
                if log_z is not None and cfg.select == "sample" and not cfg.conditional else None)
    return InferenceResult(
        strategy=run.strategy.name,
        properly_weighted=run.strategy.properly_weighted,
        options=run.strategy.options(),
        holes=run.program.holes,
        tokenizer=run.lm.tokenizer,
        prefix_text=run.prefix_text,
        prefix_tokens=list(s.prefix),
        tokens=shape(p.tokens),
        lengths=shape(p.length),
        spans=shape(p.spans),
        log_weights=lw,
        scores=shape(p.score).astype(np.float64),
        causes=shape(p.cause),
        hole_logprobs=shape(p.hole_logp).astype(np.float64),
        log_z=log_z,
        log_z_se=log_z_se,
        ess=ess,
        resampled=res,
        stats=run_stats(run, state, s, particles=n, groups=g, wall_s=time.perf_counter() - t_start),
        data=[data[k * n : (k + 1) * n] for k in range(g)],
        genealogy=(Genealogy.of(run.genealogy, g, n, run.genealogy_dropped)
                   if cfg.resampler is not None and kernel.GENEALOGY else None),
        died_in=None if run.died is None else shape(run.died[np.asarray(p.origin)]),
        killed={j: np.asarray(k, np.int64) for j, k in run.killed.items()},
        segment_labels=tuple(seg.label or _describe(seg) for seg in run.program.segments),
    )


def run_stats(run: Run, state: RunState, s: Setup, **more) -> dict:
    """The counters every result reports: tokens processed, LM calls, prompt size, compile time."""
    n_tokens, n_forward, n_rows = jax.device_get((state.n_tokens, state.n_forward, state.n_rows))
    extra = {}
    if run.host_pool is not None:
        extra["host_matcher"] = dict(run.host_pool.stats, states=len(run.host_pool))
    if run.enumerated:
        extra["enumerated"] = {k: dict(v) for k, v in run.enumerated.items()}
    return {
        "constraint_paths": {h.name: h.path for h in run.program.holes},
        "tokens": int(n_tokens),
        "prefill_tokens": len(s.prefix) - 1,
        "forward_passes": int(n_forward) + s.n_prefill,
        "decode_rows": int(n_rows),
        "compile_s": run.compile_s,
        "prefix_logprob": s.prefix_lp,
        # where it ran: local devices holding the particles (x model devices each) and jax.distributed processes
        "devices": 1 if run.placement is None else run.placement.devices,
        "processes": jax.process_count(),
        **extra,
        **more,
    }
