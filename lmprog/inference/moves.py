"""Suffix moves over whole program executions, and what the MCMC strategies share.

The target is the engine's: ``gamma(x) = prod p_LM(generated and observed tokens) x factors`` on the
executions ``x`` the constraints allow. A *site* of ``x`` is a generated token (a token of some hole) or a
host step (where ``sample``/``let``/``factor`` run); ``n(x)`` is their number.

**Suffix move.** Pick a site uniformly, keep everything before it, regenerate the rest with the proposal SMC
uses (the masked LM, the program's forced text and host steps). Cutting at the same site of ``x'`` gives back
the same kept prefix, so with ``W(x) = gamma(x) / q(x | prefix)`` the importance weight of the regenerated
part (product of allowed masses, observed-text probabilities and factors, recorded in
``Particles.lw_total``) the Metropolis-Hastings ratio is::

    alpha = min(1, [gamma(x') q(x | x')] / [gamma(x) q(x' | x)]) = min(1, W(x') n(x) / (W(x) n(x')))

The chain keeps the KV cache of the kept prefix: the kernels move the particle back to the cut
(``Kernels.resume_hole`` / ``resume_segment`` from its :class:`~lmprog.inference.state.Trace`) and overwrite
cache slots from there on; the current state's cache is kept aside and restored row by row on rejection
(``Kernels.select``, or :func:`exchange`). A chain cut late idles (frozen) through the segments before its
cut (:class:`Cuts`, the walk's :class:`~lmprog.inference.engine.Control`).

**Lock step** (:func:`suffix_moves`, SMC rejuvenation): every chain makes one move per walk, and the walk
lasts as long as the longest regenerated suffix. ``mcmc`` rolls its chains instead
(:mod:`lmprog.inference.rolling`: every chain at its own place in the program, each making its own ``steps``
moves one after another, with the row copies :func:`exchange` and :func:`aside`).

Exactness of a move made by lock step or by rolling: the randomness of a run (the LM step's uniforms, host
keys, the host generator's cut and accept draws) is fresh and independent of the schedule, and the number of
moves of every chain is fixed in advance, so the recorded states are those of an exact MH chain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmprog.inference import engine, enumeration
from lmprog.inference.engine import Control, Part, Run, Setup
from lmprog.inference.kernel import SMALL_BLOCK_ROWS, TRACE_COUNTS, Kernels
from lmprog.inference.segments import Cause, Hole, Host, InferenceError
from lmprog.inference.samples import InferenceResult
from lmprog.inference.state import RunState

__all__ = ["Cuts", "MAX_INIT_TRIES", "MOVE_CHUNK", "ROLLING", "Recorder", "Replay", "Sites", "aside", "exchange",
           "host_rng", "set_replay", "start_chains", "suffix_moves"]

#: Fresh proposals tried for a chain whose first execution died before giving up.
MAX_INIT_TRIES = 50
#: How ``mcmc`` moves its chains: ``True``, rolling (:mod:`lmprog.inference.rolling`); ``False``: lock step (every
#: chain one move per walk, :func:`suffix_moves`), for comparisons (tests, ``benchmarks/bench_mcmc_lockstep.py``).
ROLLING: bool = True
#: Decode steps per device call of rolling moves: a chain whose hole ends inside a chunk idles until the chunk
#: ends, and the host moves it on (one sync of a few ``[P]`` arrays per chunk).
MOVE_CHUNK = 1


class Cuts(Control):
    """A walk where particle ``i`` is *frozen* (left exactly as it is, KV cache included) before segment
    ``seg[i]``; at ``seg[i]`` it resumes: at the segment's start (``tok[i] < 0``, state recorded by the last
    walk's snapshot) or, in a hole, just before token ``tok[i]`` (recorded in its trace); from there on it
    runs normally. ``seg[i]`` past the last segment freezes it throughout.

    ``stop = (j, k)`` ends the walk inside hole segment ``j`` once particles have ``k`` tokens of it (the SMC
    time at which a rejuvenation move targets the intermediate distribution)."""

    def __init__(self, seg: np.ndarray, tok: np.ndarray, stop: tuple[int, int] | None = None):
        self.seg, self.tok, self.stop = np.asarray(seg), np.asarray(tok), stop

    def enter(self, run: Run, state: RunState, s: Setup, j: int) -> tuple[RunState, Part]:
        segs = run.program.segments
        frozen = self.seg > j
        here = self.seg == j
        at_start = here & (self.tok < 0)
        in_hole = here & (self.tok >= 0)
        if at_start.any():
            first_hole = sum(type(s) is Hole for s in segs[:j])
            state = run.call(run.kern.resume_segment, state, jnp.asarray(at_start), jnp.int32(j),
                             jnp.int32(first_hole), jnp.int32(s.prefix[-1]))
            ids = np.asarray(jax.device_get(state.particles.trace.seg_data[:, j]))
            state = run.sync_data(state)
            for i in np.flatnonzero(at_start):
                run.data[i] = dict(run.registry[int(ids[i])])
        pause = self.stop[1] if self.stop is not None and self.stop[0] == j else None
        return state, Part(running=~frozen & ~in_hole, resume=in_hole, resume_at=self.tok, pause=pause)

    def after(self, j: int) -> bool:
        return self.stop is not None and j >= self.stop[0]

    def at_end(self, run: Run) -> np.ndarray:
        return self.seg <= len(run.program.segments)


class Replay(Control):
    """A walk where the particles in ``replay`` replay the execution recorded in their trace (tokens through
    ``force_len``, see :func:`set_replay`; host data and host log-weight increments from the segment
    snapshots): particle Gibbs' reference trajectory."""

    def __init__(self, replay: np.ndarray):
        self.replay = np.asarray(replay, bool)

    def enter(self, run: Run, state: RunState, s: Setup, j: int) -> tuple[RunState, Part]:
        return state, Part(running=np.ones((run.num,), bool), replay=self.replay)

    def at_end(self, run: Run) -> np.ndarray:
        return ~self.replay


@dataclass(frozen=True)
class Sites:
    """The sites of a program's executions: its host steps after the shared prefix (segment indices) and its
    hole tokens (``hole_segments[h]``: the segment of hole ``h``)."""

    hosts: np.ndarray
    hole_segments: np.ndarray
    num_segments: int
    # [H] bool: holes generated by exact enumeration (lmprog.inference.enumeration) are one site each, at their
    # start (a cut inside one would resume the token loop in the middle of an enumerated draw).
    whole: np.ndarray | None = None

    @classmethod
    def of(cls, run: Run, s: Setup) -> "Sites":
        segs = run.program.segments
        whole = np.array([enumeration.traced_enumerates(run, h) for h in run.program.holes], bool)
        return cls(np.array([j for j in range(s.first, len(segs)) if type(segs[j]) is Host], np.int64),
                   np.array([j for j, seg in enumerate(segs) if type(seg) is Hole], np.int64), len(segs), whole)

    def _lengths(self, spans: np.ndarray) -> np.ndarray:
        """``[..., H]`` sites in each hole: its tokens, or one for an enumerated hole that ran."""
        ln = np.maximum(spans[..., 1] - spans[..., 0], 0)
        return ln if self.whole is None else np.where(self.whole, np.minimum(ln, 1), ln)

    def before(self, j: int) -> "Sites":
        """The sites of the program up to segment ``j`` (rejuvenation's intermediate target)."""
        return replace(self, hosts=self.hosts[self.hosts < j])

    def count(self, spans: np.ndarray) -> np.ndarray:
        """``n(x)`` per particle: tokens inside hole spans (``spans [P, H, 2]``; an enumerated hole: one) plus the
        host sites."""
        return np.sum(self._lengths(spans), axis=-1) + len(self.hosts)

    def choose(self, rng: np.random.Generator, spans: np.ndarray, n_sites: np.ndarray, movable: np.ndarray) -> Cuts:
        """A site per particle (``movable`` ones; the others stay frozen), uniform among its ``n_sites[i]``:
        the host sites, then the tokens of its holes."""
        num = spans.shape[0]
        seg = np.full((num,), self.num_segments + 1, np.int64)
        tok = np.full((num,), -1, np.int64)
        for i in np.flatnonzero(movable & (n_sites > 0)):
            u = int(rng.integers(n_sites[i]))
            if u < len(self.hosts):
                seg[i] = self.hosts[u]
                continue
            u -= len(self.hosts)
            for h, ln in enumerate(self._lengths(spans[i])):
                if u < ln:
                    seg[i], tok[i] = self.hole_segments[h], spans[i, h, 0] + u
                    break
                u -= ln
        return Cuts(seg, tok)


def suffix_moves(run: Run, state: RunState, s: Setup, rng: np.random.Generator, movable: np.ndarray, sites: Sites,
                 stop: tuple[int, int] | None = None, kern=None) -> tuple[RunState, np.ndarray]:
    """One suffix MH move for every particle in ``movable``. Returns ``(state, accepted [P] bool)``.
    ``stop = (j, k)``: the target is the program up to step ``k`` of hole segment ``j`` (rejuvenation), whose
    host sites are those before ``j``. ``kern``: the kernels that regenerate (default ``run.kern``; they must
    not resample)."""
    kern = kern or run.kern
    spans, lw = (np.asarray(a) for a in jax.device_get((state.particles.spans, state.particles.lw_total)))
    here = sites if stop is None else sites.before(stop[0])
    n_x = here.count(spans)
    cuts = here.choose(rng, spans, n_x, movable)
    cuts.stop = stop
    moving = cuts.seg <= len(run.program.segments)
    state = run.sync_data(state)
    kept_data = [dict(d) for d in run.data]
    current = run.call(kern.copy, state)
    fork = run.fork(kern)
    proposal = engine.walk(fork, state, s, cuts, check=False)
    run.join(fork)
    p_spans, p_lw, p_cause = (np.asarray(a) for a in jax.device_get(
        (proposal.particles.spans, proposal.particles.lw_total, proposal.particles.cause)))
    n_y = here.count(p_spans)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_alpha = (p_lw.astype(np.float64) - lw.astype(np.float64)) + np.log(n_x) - np.log(np.maximum(n_y, 1))
    log_alpha = np.where((p_cause == 0) & np.isfinite(p_lw), log_alpha, -np.inf)
    u = rng.random(run.num)
    accept = moving & (np.log(np.maximum(u, 1e-300)) < log_alpha)
    state = run.call(kern.select, current, proposal, jnp.asarray(accept))
    proposal_data = run.data
    run.data = [dict(proposal_data[i]) if accept[i] else kept_data[i] for i in range(run.num)]
    return state, accept


# ------------------------------------------------------------------------------------------------------
# Rolling moves: every chain its own sequence of moves
# ------------------------------------------------------------------------------------------------------

_EXCHANGE: dict = {}


def _copy_rows_from(dst, src, mask):
    """``dst`` (a cache whose row ``i`` is particle ``i``) with row ``i`` copied from row ``i`` of ``src`` where
    ``mask[i]``, in blocks of :data:`~lmprog.inference.kernel.SMALL_BLOCK_ROWS` rows (as many as are copied).
    Cache leaves have the row axis first (as ``LanguageModel.reorder`` / ``copy_rows`` take them)."""
    num = mask.shape[0]
    size = min(num, SMALL_BLOCK_ROWS)
    order = jnp.concatenate([jnp.nonzero(mask, size=num, fill_value=num)[0].astype(jnp.int32),
                             jnp.full((size,), num, jnp.int32)])
    count = jnp.sum(mask.astype(jnp.int32))

    def body(c):
        b0, d = c
        ids = lax.dynamic_slice(order, (b0,), (size,))
        take = jnp.clip(ids, 0, num - 1)
        return b0 + size, jax.tree.map(lambda a, b: a.at[ids].set(b[take], mode="drop"), d, src)

    return lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), dst))[1]


def exchange(kern: Kernels):
    """``fn(state, saved, restore [P], save [P]) -> (state, saved)``, jitted (both states donated): particle
    ``i`` of ``state`` (with its KV history) becomes that of ``saved`` where ``restore[i]`` (a rejected
    proposal goes back to the chain's state), then particle ``i`` of ``saved`` becomes that of the new state
    where ``save[i]`` (the state a new move starts from). Only the rows named are copied. ``saved`` has row
    ``i`` for particle ``i`` (:func:`aside`) and keeps it; so does the returned state. The run-level fields
    (key, counters) are ``state``'s."""
    hit = _EXCHANGE.get(("exchange", id(kern)))
    if hit is not None and hit[0] is kern:
        return hit[1]

    def fn(state: RunState, saved: RunState, restore, save):
        TRACE_COUNTS["exchange"] += 1
        state = kern._compact(state)
        num = restore.shape[0]
        ident = jnp.arange(num, dtype=jnp.int32)

        def pick(m):
            return lambda a, b: jnp.where(jnp.reshape(m, (-1,) + (1,) * (a.ndim - 1)), b, a)

        parts = jax.tree.map(pick(restore), state.particles, saved.particles)._replace(row=ident)
        cache = _copy_rows_from(state.cache, saved.cache, restore)
        kept = jax.tree.map(pick(save), saved.particles, parts)._replace(row=ident)
        kept_cache = _copy_rows_from(saved.cache, cache, save)
        return (state._replace(particles=parts, cache=cache), saved._replace(particles=kept, cache=kept_cache))

    out = jax.jit(fn, donate_argnums=(0, 1))
    _EXCHANGE[("exchange", id(kern))] = (kern, out)
    return out


def aside(kern: Kernels):
    """``fn(state) -> (state, copy)``, jitted: every particle in its own row ``i`` (``Kernels._compact``) and a
    copy of that state (the chains' states kept aside while they move)."""
    hit = _EXCHANGE.get(("aside", id(kern)))
    if hit is not None and hit[0] is kern:
        return hit[1]

    def fn(state: RunState):
        TRACE_COUNTS["aside"] += 1
        state = kern._compact(state)
        return state, jax.tree.map(jnp.copy, state)

    out = jax.jit(fn, donate_argnums=(0,))
    _EXCHANGE[("aside", id(kern))] = (kern, out)
    return out


def host_rng(key) -> np.random.Generator:
    """Host randomness (site choices, accept draws) derived from the run's JAX key: same seed, same run."""
    bits = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    return np.random.default_rng([int(b) for b in bits])


def start_chains(run: Run, state: RunState, s: Setup) -> RunState:
    """A first execution for every chain (the SMC proposal); chains whose execution died get fresh
    proposals (from the first segment) until they live. Every chain dying names the constraint."""
    state = engine.walk(run, state, s)
    for _ in range(MAX_INIT_TRIES):
        cause = np.asarray(jax.device_get(state.particles.cause))
        dead = cause != 0
        if not dead.any():
            return state
        cuts = Cuts(np.where(dead, s.first, len(run.program.segments) + 1), np.full(run.num, -1))
        state = engine.walk(run, state, s, cuts, check=False)
    cause = np.asarray(jax.device_get(state.particles.cause))
    deaths = {Cause(int(c)).name.lower(): int(k) for c, k in zip(*np.unique(cause[cause != 0], return_counts=True))}
    raise InferenceError(
        f"mcmc: {int(np.sum(cause != 0))} of {run.num} chains found no execution the constraints allow in "
        f"{MAX_INIT_TRIES + 1} tries (deaths: " + ", ".join(f"{c} x {k}" for c, k in deaths.items())
        + "); use smc to see which constraint kills them",
        causes=deaths,
    )


def set_replay(state: RunState, sequences) -> RunState:
    """Particle ``i`` will replay ``sequences[i]`` (tokens after the shared prefix)."""
    p = state.particles
    tokens = np.array(jax.device_get(p.tokens))
    force = np.zeros((tokens.shape[0],), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq) > tokens.shape[1]:
            raise ValueError(f"init sequence {i} has {len(seq)} tokens; the program has room for {tokens.shape[1]}")
        tokens[i, : len(seq)] = seq
        force[i] = len(seq)
    return state._replace(particles=p._replace(tokens=jnp.asarray(tokens), force_len=jnp.asarray(force)))


class Recorder:
    """Collects the states of all chains at every kept step (host arrays) and makes them a result."""

    def __init__(self):
        self.rows: list = []
        self.per_chain: dict[int, list] = {}  # rolling moves: chain -> its kept states, in order

    def add(self, run: Run, state: RunState, rows=None) -> RunState:
        """Record every particle, or those in ``rows`` (indices)."""
        p = state.particles
        fields = jax.device_get((p.tokens, p.length, p.spans, p.score, p.hole_logp, p.cause))
        state = run.sync_data(state)
        rows = np.arange(run.num) if rows is None else np.asarray(rows)
        self.rows.append(tuple(np.asarray(a)[rows] for a in fields) + ([dict(run.data[i]) for i in rows],))
        return state

    def add_chains(self, run: Run, state: RunState, rows) -> RunState:
        """Record particle ``i`` of ``rows`` (indices) as the next kept state of chain ``i`` alone (rolling
        moves: chains finish their moves at different times). Every chain must end with as many as the others."""
        p = state.particles
        fields = [np.asarray(a) for a in jax.device_get((p.tokens, p.length, p.spans, p.score, p.hole_logp, p.cause))]
        state = run.sync_data(state)
        for i in np.asarray(rows):
            self.per_chain.setdefault(int(i), []).append(tuple(a[i] for a in fields) + (dict(run.data[i]),))
        return state

    def _gather_chains(self, num: int) -> None:
        """Per-chain records (:meth:`add_chains`) as rows of all chains, one per kept step."""
        if not self.per_chain:
            return
        kept = {len(self.per_chain.get(i, [])) for i in range(num)}
        if len(kept) != 1:  # pragma: no cover - every chain makes the same number of moves
            raise RuntimeError(f"mcmc: chains recorded different numbers of states: {sorted(kept)}")
        for k in range(kept.pop()):
            recs = [self.per_chain[i][k] for i in range(num)]
            self.rows.append(tuple(np.stack([r[f] for r in recs]) for f in range(6)) + ([r[6] for r in recs],))
        self.per_chain = {}

    def engine_result(self, run: Run, s: Setup, state: RunState, strategy, groups: int, chains: int,
                      extra: dict) -> InferenceResult:
        """:meth:`result` for chains run by walks of ``run``."""
        return self.result(strategy, groups, chains, extra, holes=run.program.holes, tokenizer=run.lm.tokenizer,
                           prefix_text=run.prefix_text, prefix_tokens=s.prefix,
                           stats=engine.run_stats(run, state, s))

    def result(self, strategy, groups: int, chains: int, extra: dict, *, holes, tokenizer, prefix_text,
               prefix_tokens, stats: dict, log_z=None) -> InferenceResult:
        """Samples ordered per group, then per chain, then per kept step (chain ``c``'s ``k``-th kept state
        is particle ``c * kept + k`` of its group); every sample has the same weight."""
        self._gather_chains(groups * chains)
        kept = len(self.rows)
        stack = lambda i: np.stack([row[i] for row in self.rows], axis=1)  # noqa: E731  [P, kept, ...]
        tokens, lengths, spans, scores, hlp, causes = (stack(i) for i in range(6))
        num = tokens.shape[0]
        per = num // groups
        shape = lambda a: a.reshape((groups, per * kept) + a.shape[2:])  # noqa: E731
        causes = shape(causes)
        data = [[self.rows[k][6][g * per + c] for c in range(per) for k in range(kept)] for g in range(groups)]
        lw = np.where(causes == 0, 0.0, -np.inf)
        return InferenceResult(
            strategy=strategy.name,
            properly_weighted=strategy.properly_weighted,
            options=strategy.options(),
            holes=holes,
            tokenizer=tokenizer,
            prefix_text=prefix_text,
            prefix_tokens=list(prefix_tokens),
            tokens=shape(tokens),
            lengths=shape(lengths),
            spans=shape(spans),
            log_weights=lw,
            scores=shape(scores).astype(np.float64),
            causes=causes,
            hole_logprobs=shape(hlp).astype(np.float64),
            log_z=log_z,
            ess=np.zeros((0, groups)),
            resampled=np.zeros((0, groups), bool),
            stats={**stats, "particles": per * kept, "groups": groups},
            data=data,
            extra={"chains": chains, "kept": kept, **extra},
        )
