"""The jitted kernels: prefill, forced text, the hole step (decode -> mask -> sample -> weight -> resample).

One :class:`Kernels` object per (model, :class:`KernelConfig`) holds the compiled functions. Everything
that varies between holes and programs (automaton start states, budgets, end rules, counter bounds,
temperature, the token table) is a traced argument, so a run compiles each kernel once per set of array
shapes; :data:`TRACE_COUNTS` counts traces so tests can check that nothing retraces inside the loop.

The token loop runs on the device: :meth:`Kernels.hole_chunk` is a ``lax.while_loop`` over up to
``chunk`` decode steps that stops early when every particle has finished the hole. The host calls it
again until the hole is complete (one host sync per chunk, for progress reporting), never per token.
The run state (particles and KV cache) is donated to every kernel so it is updated in place.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from jax import lax

from lmprog.automata.table import TokenTable
from lmprog.inference import lookahead, resampling
from lmprog.inference.segments import Cause
from lmprog.inference.aot import DiskJit
from lmprog.inference.state import Consts, HoleParams, Particles, RunState

__all__ = ["KernelConfig", "Kernels", "TRACE_COUNTS", "get_kernels"]

#: Number of times each kernel body has been traced (incremented at trace time only).
TRACE_COUNTS: collections.Counter = collections.Counter()

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class KernelConfig:
    """Static (compile-time) choices of a strategy.

    Attributes:
        select: ``"sample"`` (from the masked, renormalized proposal), ``"argmax"`` (greedy) or ``"beam"``.
        weighted: add the allowed mass / observe log-probs / factors to the log-weight (proper weighting).
        resampler: a name in :data:`~lmprog.inference.resampling.RESAMPLERS`, or ``None`` (never resample).
        groups: independent copies of the algorithm in one batch (resampling stays within a group).
        chunk: decode steps per device call.
        trace: record every hole token's state and every segment start (:class:`~lmprog.inference.state.Trace`)
            so MCMC moves can cut a trajectory anywhere and regenerate the rest.
        stop_on_resample: end a chunk right after a step that resampled (SMC with rejuvenation moves).
        conditional: particle 0 of every group is its own ancestor at every resampling (conditional SMC,
            particle Gibbs' reference trajectory); the others are resampled from all particles.
        distinct: sample/argmax steps run the LM once per distinct history (:meth:`Kernels._distinct_step`),
            in blocks of bounded size; ``False``: every particle through the LM every step (the reference the
            distinct step is tested against). Beam search always runs every beam.
        lookahead: ``k > 0``: propose hole tokens from the one-step twisted proposal of
            :mod:`lmprog.inference.lookahead` (the next step's allowed mass folded in for ``k`` ending candidates,
            taken out of the weight at the next step: the target is unchanged); ``0``: the masked LM.
    """

    select: str = "sample"
    weighted: bool = True
    resampler: str | None = None
    groups: int = 1
    chunk: int = 32
    trace: bool = False
    stop_on_resample: bool = False
    conditional: bool = False
    distinct: bool = True
    lookahead: int = 0

    def __post_init__(self):
        if self.select not in ("sample", "argmax", "beam"):
            raise ValueError(f"unknown select rule {self.select!r}")
        if self.resampler is not None:
            resampling.get_resampler(self.resampler)
        if self.select == "beam" and self.resampler is not None:
            raise ValueError("beam search has no resampling")
        if self.lookahead and (self.select != "sample" or not self.weighted or self.trace or self.conditional):
            raise ValueError("lookahead needs properly weighted sampling without traced moves (importance, or smc "
                             "without rejuvenate)")


def per_row(hp: HoleParams, rows) -> HoleParams:
    """``hp``'s budgets for the particles ``rows`` (an index array): scalars stay, ``[P]`` budgets (particles in
    different holes, :mod:`lmprog.inference.rolling`) are gathered."""
    pick = lambda a: a if jnp.ndim(a) == 0 else a[rows]  # noqa: E731
    return hp._replace(max_tokens=pick(hp.max_tokens), max_steps=pick(hp.max_steps))


def _safe_max(x, axis=-1, keepdims=False):
    m = jnp.max(x, axis=axis, keepdims=keepdims)
    return jnp.where(jnp.isfinite(m), m, 0.0)

#: Bytes the ``[rows, V]`` arrays of one decode block may take (logits, mask, CDF and their temporaries):
#: bounds a step's working set however many particles run (the particles themselves cost ``[P]`` words).
DECODE_BLOCK_BYTES = 512 << 20
#: Forced-text blocks up to this many tokens keep history classes exactly (one sort key per token).
FEED_KEY_TOKENS = 16
#: Rows of the small block: a step with at most this many distinct histories runs one small forward.
SMALL_BLOCK_ROWS = 32
#: Float32 ``[V]`` rows one decode row keeps alive at once (logits, masked logits, exponentials, CDF, mask).
DECODE_ROW_WORDS = 6


def decode_block_rows(num: int, vocab: int) -> tuple[int, int]:
    """``(small, large)`` rows of the two decode blocks for ``num`` particles over ``vocab`` columns. ``large
    == num``: the large block is every particle in place (no gather); else a power of two fitting
    :data:`DECODE_BLOCK_BYTES`."""
    fit = max(SMALL_BLOCK_ROWS, DECODE_BLOCK_BYTES // max(1, vocab * 4 * DECODE_ROW_WORDS))
    large = num if num <= fit else 1 << (fit.bit_length() - 1)
    return min(num, SMALL_BLOCK_ROWS), large


def _classes(keys) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Equivalence classes of the rows of ``keys`` (a tuple of ``[P]`` int32 arrays): ``(cls, rep, first,
    lead)``. ``cls [P]``: the class of each row, numbered ``0 ..`` in lexicographic order of the key tuples;
    ``rep [P]``: ``rep[c]`` is a row of class ``c`` (entries past the last class: 0); ``first [P]`` (sorted
    order): a class starts there; ``lead [P]``: ``keys[0]`` in sorted order."""
    n = keys[0].shape[0]
    out = lax.sort(tuple(keys) + (jnp.arange(n, dtype=jnp.int32),), num_keys=len(keys))
    perm = out[-1]
    first = jnp.zeros((n,), bool).at[0].set(True)
    for k in out[:-1]:
        first = first | jnp.concatenate([jnp.ones((1,), bool), k[1:] != k[:-1]])
    cls_sorted = jnp.cumsum(first.astype(jnp.int32)) - 1
    cls = jnp.zeros((n,), jnp.int32).at[perm].set(cls_sorted)
    rep = jnp.zeros((n,), jnp.int32).at[jnp.where(first, cls_sorted, n)].set(perm, mode="drop")
    return cls, rep, first, out[0]


def _in_place(anc: jax.Array) -> jax.Array:
    """The same children as ancestors ``anc [n]`` (a multiset), placed so that each selected ancestor's first
    child sits at the ancestor's own index; the extra children fill, in order, the indices of ancestors left
    without a child. Particles within a group are exchangeable, so the order changes no estimate; it keeps
    most particles in their own cache row (only the extra children then need a copy: :meth:`Kernels._compact`).
    Index 0 stays its own child when it was (conditional SMC's reference)."""
    n = anc.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    children = jnp.zeros((n,), jnp.int32).at[anc].add(1)
    extras = jnp.repeat(idx, jnp.maximum(children - 1, 0), total_repeat_length=n)
    free = jnp.nonzero(children == 0, size=n, fill_value=n)[0]
    return jnp.where(children > 0, idx, 0).at[free].set(extras, mode="drop")


def run_if(pred, fn, carry):
    """``fn(carry)`` where ``pred`` holds, else ``carry``: a loop of at most one turn. XLA updates a loop's
    carry in place, where the branches of a conditional get copies of large operands such as the KV cache."""
    return lax.while_loop(lambda c: c[0], lambda c: (jnp.bool_(False), fn(c[1])), (jnp.asarray(pred), carry))[1]


def _upper_bound(cdf: jax.Array, row: jax.Array, q: jax.Array) -> jax.Array:
    """For each ``i``: the number of entries of ``cdf[row[i]]`` (a non-decreasing row) that are ``<= q[i]``, by
    binary search: ``[P]`` gathers per halving, never a ``[P, V]`` array."""
    v = cdf.shape[1]

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        le = cdf[row, jnp.minimum(mid, v - 1)] <= q
        open_ = lo < hi
        return jnp.where(open_ & le, mid + 1, lo), jnp.where(open_ & ~le, mid, hi)

    lo = jnp.zeros(q.shape, jnp.int32)
    lo, _ = lax.fori_loop(0, max(1, int(v).bit_length()), halve, (lo, jnp.full(q.shape, v, jnp.int32)))
    return lo


def sample_masked(key: jax.Array, masked_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per row from ``softmax(masked_logits)`` by inverse CDF with a single uniform per row, and
    ``logsumexp(masked_logits)`` per row (from the same pass).

    ``-inf`` entries (disallowed tokens) have probability exactly 0 and are never chosen (the query is
    clamped strictly below the row total and the lookup skips flat CDF steps, as in resampling). A row
    with no allowed token returns an arbitrary index and ``-inf``; callers mask it.
    """
    m = _safe_max(masked_logits, keepdims=True)
    probs = jnp.exp(masked_logits - m)
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[:, -1]
    u = jax.random.uniform(key, total.shape, dtype=cdf.dtype)
    q = jnp.clip(u * total, 0, jnp.nextafter(total, jnp.zeros_like(total)))
    tok = jnp.sum(cdf <= q[:, None], axis=-1)  # = searchsorted(cdf, q, side="right")
    log_total = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m[:, 0], NEG_INF)
    return jnp.minimum(tok, masked_logits.shape[-1] - 1).astype(jnp.int32), log_total


class Kernels:
    """Compiled kernels for one model and one :class:`KernelConfig`."""

    def __init__(self, lm, cfg: KernelConfig):
        self.lm = lm
        self.cfg = cfg
        # Executables kept on disk (lmprog.inference.aot) for models that name their architecture.
        aot_key = getattr(lm, "aot_key", None)
        key = None if aot_key is None else f"{aot_key}|{cfg!r}"

        def jit(fn, name, **kw):
            return DiskJit(fn, name, key, **kw)

        self.prefill = jit(self._prefill, "prefill")
        self.feed = jit(self._feed, "feed", static_argnames=("observe",), donate_argnames=("state",))
        self.feed_some = jit(self._feed_some, "feed_some", static_argnames=("observe",), donate_argnames=("state",))
        self.begin_hole = jit(self._begin_hole, "begin_hole", donate_argnames=("state",))
        self.hold = jit(self._hold, "hold", donate_argnames=("state",))
        self.release = jit(self._release, "release", donate_argnames=("state",))
        self.hole_chunk = jit(self._hole_chunk, "hole_chunk", donate_argnames=("state",))
        self.resample_check = jit(self._resample_check, "resample_check", donate_argnames=("state",))
        self.add_log_weight = jit(self._add_log_weight, "add_log_weight", donate_argnames=("state",))
        self.refine_causes = jit(self._refine_causes, "refine_causes", donate_argnames=("state",))
        self.snapshot = jit(self._snapshot, "snapshot", donate_argnames=("state",))
        self.resume_hole = jit(self._resume_hole, "resume_hole", donate_argnames=("state",))
        self.resume_segment = jit(self._resume_segment, "resume_segment", donate_argnames=("state",))
        self.select = jit(self._select, "select", donate_argnames=("current", "proposal"))
        self.copy = jit(lambda state: jax.tree.map(jnp.copy, state), "copy")
        # Zeros made by an executable: eager ``jnp.zeros`` compiles one program per shape in every process.
        self.init_cache = jit(lambda batch, max_len: lm.init_cache(batch, max_len), "init_cache",
                              static_argnames=("batch", "max_len"))

    # ------------------------------------------------------------------------------------------------
    # Prefill of the shared prefix (batch 1)
    # ------------------------------------------------------------------------------------------------

    def _prefill(self, params, consts: Consts, cache, tokens, position, targets, observed):
        """Feed ``tokens [1, T]`` at ``position`` into a one-row cache; return the summed log-probability of
        ``targets [1, T]`` where ``observed`` (``targets[t]`` is the prefix token after ``tokens[t]``).
        Without observed tokens the logits are unused and XLA drops the LM head. With ``consts.prefix`` the
        cache is a one-row own cache after the shared prefix (a batch row's prompt text), else the shared
        prefix's own."""
        TRACE_COUNTS["prefill"] += 1
        v = consts.table.vocab_size
        logits, cache = self.lm.apply(params, cache, tokens, jnp.reshape(position, (1,)).astype(jnp.int32),
                                      prefix=consts.prefix)
        logp = jax.nn.log_softmax(logits[..., :v].astype(jnp.float32) / consts.temperature, axis=-1)
        lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(observed, lp, 0.0)), cache

    # ------------------------------------------------------------------------------------------------
    # Forced tokens (Text / Observe)
    # ------------------------------------------------------------------------------------------------

    def _feed(self, params, consts: Consts, state: RunState, tokens, lengths, observe: bool):
        """Append ``tokens[i, :lengths[i]]`` to particle ``i`` (padded ``[P, T]``); with ``observe`` add their
        log-probability to the weight. Padded slots write junk cache entries past each row's end: they are
        overwritten before any query can attend to them."""
        TRACE_COUNTS["feed"] += 1
        p = state.particles
        num, t = tokens.shape
        valid = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]
        # Sharers of a row that write different tokens (or at different positions) get rows of their own first;
        # the others write the same entries into the row they share. Short blocks are told apart token by
        # token; a longer block only when every particle is fed the same tokens.
        if t <= FEED_KEY_TOKENS:
            fed = tuple(jnp.where(valid[:, j], tokens[:, j], -1) for j in range(t))
        else:
            same = jnp.all((tokens == tokens[:1]) | ~valid, axis=1) & (lengths == lengths[0])
            fed = (jnp.where(jnp.all(same), 0, jnp.arange(num, dtype=jnp.int32)),)
        state, p = self._unshare(state, (p.position, p.last, lengths) + fed)
        p, cache, n_fed = self._feed_rows_of(params, consts, p, state.cache, tokens, lengths, observe, p.row)
        return state._replace(particles=p, cache=cache, n_tokens=state.n_tokens + n_fed,
                              n_forward=state.n_forward + 1)

    def _feed_some(self, params, consts: Consts, state: RunState, idx, tokens, lengths, observe: bool):
        """:meth:`_feed` for the particles ``idx [K]`` only (``tokens [K, T]``, ``lengths [K]``; ``idx >= P``
        pads): the LM runs ``K`` rows, not ``P``. Rolling MCMC moves feed the few chains that reach a text
        segment while the others are elsewhere in the program (:mod:`lmprog.inference.rolling`)."""
        TRACE_COUNTS["feed_some"] += 1
        state = self._compact(state)
        p = state.particles
        num = p.last.shape[0]
        real = idx < num
        sub = jax.tree.map(lambda a: a[jnp.minimum(idx, num - 1)], p)
        sub, cache, n_fed = self._feed_rows_of(params, consts, sub, state.cache, tokens, jnp.where(real, lengths, 0),
                                               observe, jnp.where(real, idx, num))
        p = jax.tree.map(lambda a, b: a.at[idx].set(b, mode="drop"), p, sub)
        return state._replace(particles=p, cache=cache, n_tokens=state.n_tokens + n_fed,
                              n_forward=state.n_forward + 1)

    def _feed_rows_of(self, params, consts: Consts, p: Particles, cache, tokens, lengths, observe: bool, rows):
        """The feed itself: particles ``p`` (``[B]``, their histories in cache rows ``rows``; ``>=`` the cache's
        batch: padding) take ``tokens[b, :lengths[b]]``. Returns ``(p, cache, tokens fed to live particles)``."""
        cfg = self.cfg
        num, t = tokens.shape
        v = consts.table.vocab_size
        x = jnp.concatenate([p.last[:, None], tokens[:, :-1]], axis=1)
        valid = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]
        logits, cache = self.lm.apply(params, cache, x, p.position, prefix=consts.prefix, rows=rows)
        alive = p.cause == 0
        if observe:
            logp = jax.nn.log_softmax(logits[..., :v] / consts.temperature, axis=-1)
            lp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
            obs = jnp.sum(jnp.where(valid, lp, 0.0), axis=1)
            died = alive & ~(obs > NEG_INF)
            inc = jnp.where(alive, obs, 0.0)
            score = p.score + inc
            log_weight = p.log_weight + inc if (cfg.weighted or cfg.select == "beam") else p.log_weight
            log_weight = jnp.where(died, NEG_INF, log_weight)
            lw_total = jnp.where(died, NEG_INF, p.lw_total + inc if cfg.weighted else p.lw_total)
            cause = jnp.where(died, int(Cause.OBSERVE), p.cause)
        else:
            score, log_weight, lw_total, cause = p.score, p.log_weight, p.lw_total, p.cause
        at = jnp.arange(num)[:, None]
        slots = jnp.where(valid, p.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], p.tokens.shape[1])
        buf = p.tokens.at[at, slots].set(tokens, mode="drop")
        last_idx = jnp.maximum(lengths - 1, 0)
        last = jnp.where(lengths > 0, jnp.take_along_axis(tokens, last_idx[:, None], axis=1)[:, 0], p.last)
        p = p._replace(
            last=last,
            position=p.position + lengths,
            length=p.length + lengths,
            tokens=buf,
            score=score,
            log_weight=log_weight,
            lw_total=lw_total,
            cause=cause,
        )
        return p, cache, jnp.sum(jnp.where(alive, lengths, 0))

    # ------------------------------------------------------------------------------------------------
    # Host log-weight increments (condition / factor)
    # ------------------------------------------------------------------------------------------------

    def _add_log_weight(self, state: RunState, inc):
        TRACE_COUNTS["add_log_weight"] += 1
        p = state.particles
        alive = p.cause == 0
        inc = jnp.where(alive, inc.astype(jnp.float32), 0.0)
        died = alive & ~(inc > NEG_INF)
        log_weight = p.log_weight + inc if (self.cfg.weighted or self.cfg.select == "beam") else p.log_weight
        lw_total = p.lw_total + inc if self.cfg.weighted else p.lw_total
        p = p._replace(
            score=p.score + inc,
            log_weight=jnp.where(died, NEG_INF, log_weight),
            lw_total=jnp.where(died, NEG_INF, lw_total),
            cause=jnp.where(died, int(Cause.HOST), p.cause),
            done=p.done | died,  # inside a hole (prefix predicates) a killed particle stops generating
        )
        return state._replace(particles=p)

    # ------------------------------------------------------------------------------------------------
    # Holes
    # ------------------------------------------------------------------------------------------------

    def _begin_hole(self, state: RunState, hp: HoleParams, rows=None):
        """Particles with a start state (``hp.start >= 0``) and alive enter the hole; the others are done with it.
        ``rows [P] bool``: only those particles begin (either way); the others are left exactly as they are."""
        TRACE_COUNTS["begin_hole"] += 1
        p = state.particles
        num, h = p.spans.shape[:2]
        enter = (hp.start >= 0) & (p.cause == 0)
        mine = jnp.ones((num,), bool) if rows is None else rows
        enter = enter & mine
        hole_idx = jnp.where(enter, hp.hole, h)  # h: out of range, dropped
        span = jnp.stack([p.length, p.length], axis=-1)
        q = p._replace(
            auto=jnp.where(enter, hp.start, -1),
            counts=jnp.zeros_like(p.counts),
            hole=jnp.where(enter, hp.hole, -1),
            n_hole=jnp.zeros_like(p.n_hole),
            done=~enter,
            spans=p.spans.at[jnp.arange(num), hole_idx].set(span, mode="drop"),
        )
        if rows is not None:
            q = q._replace(**{f: jnp.where(jnp.reshape(rows, (-1,) + (1,) * (getattr(p, f).ndim - 1)),
                                           getattr(q, f), getattr(p, f))
                              for f in ("auto", "counts", "hole", "n_hole", "done")})
        return state._replace(particles=q)

    @staticmethod
    def _hold(state: RunState, rows):
        """Particles ``rows`` stop generating (``done``) while another hole runs for other particles; returns
        ``(state, held)``, their hole state, for :meth:`_release`."""
        TRACE_COUNTS["hold"] += 1
        p = state.particles
        held = (p.auto, p.counts, p.hole, p.n_hole, p.done)
        return state._replace(particles=p._replace(done=p.done | rows)), held

    @staticmethod
    def _release(state: RunState, held, rows):
        """Particles ``rows`` get back the hole state :meth:`_hold` took."""
        TRACE_COUNTS["release"] += 1
        p = state.particles
        auto, counts, hole, n_hole, done = held
        return state._replace(particles=p._replace(
            auto=jnp.where(rows, auto, p.auto), counts=jnp.where(rows[:, None], counts, p.counts),
            hole=jnp.where(rows, hole, p.hole), n_hole=jnp.where(rows, n_hole, p.n_hole),
            done=jnp.where(rows, done, p.done)))

    @staticmethod
    def _mask(consts: Consts, hp: HoleParams, p: Particles):
        """``[P, V]`` allowed tokens: exactly those after which the hole can still be completed within its
        budget (``TokenTable.mask``: automaton, terminator, counters, ``max_tokens``), under the hard cap."""
        ok = consts.table.mask(p.auto, p.counts, hp.max_tokens)
        return ok & (p.n_hole < hp.max_steps)[:, None]  # (max_tokens, max_steps: scalars or [P])

    def _refine_causes(self, consts: Consts, hp: HoleParams, state: RunState):
        """Why the particles that died in the hole just run died. The token loop only marks them ``DEAD``
        (keeping the step lean); their automaton state, counts and token count stay as they were at death
        until the next hole, so this runs once after the loop, only when someone died:

        * ``CONSTRAINT``: the automaton allows no token, or the LM gives every allowed token probability 0;
        * ``BUDGET``: tokens would be allowed without the ``max_tokens`` budget (or the hard cap was hit);
        * ``COUNTER``: the hole's own ``tokens``/``len``/``words`` bounds leave no way to finish.
        """
        TRACE_COUNTS["refine_causes"] += 1
        p = state.particles
        table: TokenTable = consts.table
        auto_any = jnp.any(table.next_states(p.auto) >= 0, axis=-1)
        budgeted = jnp.any(self._mask(consts, hp, p), axis=-1)
        unbudgeted = jnp.any(table.mask(p.auto, p.counts), axis=-1)
        cause = jnp.where(
            ~auto_any | budgeted,
            int(Cause.CONSTRAINT),
            jnp.where(unbudgeted | (p.n_hole >= hp.max_steps), int(Cause.BUDGET), int(Cause.COUNTER)),
        )
        return state._replace(particles=p._replace(cause=jnp.where(p.cause == int(Cause.DEAD), cause, p.cause)))

    def _logits(self, params, consts: Consts, state: RunState):
        """Tempered next-token logits ``[P, V]`` (``V``: the token table's width) and the updated cache, for
        particles each in its own row ``i`` (:meth:`_compact`)."""
        p = state.particles
        v = consts.table.vocab_size
        logits, cache = self.lm.apply(params, state.cache, p.last[:, None], p.position, prefix=consts.prefix)
        return logits[:, 0, :v].astype(jnp.float32) / consts.temperature, cache

    @staticmethod
    def _advance(consts: Consts, p: Particles, alive, tok, lp_tok, inc_w, died, cause_new):
        """Apply the chosen tokens (rows where ``alive``); record deaths."""
        num = p.last.shape[0]
        rows = jnp.arange(num)
        h = p.spans.shape[1]
        new_len = p.length + alive
        hole_idx = jnp.where(alive, p.hole, h)
        new_auto, new_counts = consts.table.step(p.auto, p.counts, tok)
        ends = consts.table.done(new_auto, new_counts)
        auto = jnp.where(alive, new_auto, p.auto)
        tr = p.trace
        at = (rows, jnp.where(alive, p.length, tr.auto.shape[1]))  # out of range (dropped) unless alive
        cur_hlp = jnp.take_along_axis(p.hole_logp, jnp.clip(p.hole, 0, h - 1)[:, None], axis=1)[:, 0] if h else p.score * 0
        tr = tr._replace(
            auto=tr.auto.at[at].set(p.auto, mode="drop"),
            counts=tr.counts.at[at].set(p.counts, mode="drop"),
            log_weight=tr.log_weight.at[at].set(p.lw_total, mode="drop"),
            score=tr.score.at[at].set(p.score, mode="drop"),
            hole_logp=tr.hole_logp.at[at].set(cur_hlp, mode="drop"),
        )
        return p._replace(
            trace=tr,
            lw_total=jnp.where(died, NEG_INF, p.lw_total + jnp.where(alive, inc_w, 0.0)),
            last=jnp.where(alive, tok, p.last),
            position=p.position + alive,
            length=new_len,
            tokens=p.tokens.at[rows, jnp.where(alive, p.length, p.tokens.shape[1])].set(tok, mode="drop"),
            auto=auto,
            counts=jnp.where(alive[:, None], new_counts, p.counts),
            n_hole=p.n_hole + alive,
            done=p.done | (alive & ends) | died,
            log_weight=jnp.where(died, NEG_INF, p.log_weight + jnp.where(alive, inc_w, 0.0)),
            score=jnp.where(died, NEG_INF, p.score + jnp.where(alive, lp_tok, 0.0)),
            cause=jnp.where(died, cause_new, p.cause),
            spans=p.spans.at[rows, hole_idx, 1].set(new_len, mode="drop"),
            hole_logp=p.hole_logp.at[rows, hole_idx].add(lp_tok, mode="drop"),
        )

    @staticmethod
    def running(p: Particles, hp: HoleParams):
        """``[P]`` particles still generating the hole: not done and not paused (``HoleParams.pause``)."""
        return ~p.done & (p.n_hole < hp.pause)

    def _sample_step(self, params, consts: Consts, hp: HoleParams, state: RunState, key):
        """One decode step for every particle: sample (or argmax) from the masked, renormalized proposal."""
        state = self._compact(state)
        p = state.particles
        z, cache = self._logits(params, consts, state)
        ok = self._mask(consts, hp, p)
        active = self.running(p, hp)
        lse_all = jax.nn.logsumexp(z, axis=-1)
        masked = jnp.where(ok, z, NEG_INF)
        num = p.last.shape[0]
        rows_all = jnp.arange(num, dtype=jnp.int32)
        if self.cfg.lookahead:  # q ~ p psi over the allowed set: lse_masked becomes log Z_t (lookahead.py)
            la_psi, la_calls, la_rows = lookahead.lookahead(
                self.lm, params, consts, hp, cache, rows_all, active, p.position, p.auto, p.counts, p.n_hole, masked,
                self.cfg.lookahead)
            masked = lookahead.twisted(masked, la_psi)
            state = state._replace(n_forward=state.n_forward + la_calls, n_rows=state.n_rows + la_rows)
        if self.cfg.select == "argmax":
            tok = jnp.argmax(masked, axis=-1).astype(jnp.int32)
            lse_masked = jax.nn.logsumexp(masked, axis=-1)
        else:
            tok, lse_masked = sample_masked(key, masked)
        # Replay (conditional SMC's reference, chains started from given sequences): take the recorded token,
        # weighted exactly as if it had been sampled; a replayed token the mask forbids kills the particle.
        forced = p.length < p.force_len
        f_tok = p.tokens[jnp.arange(num), jnp.minimum(p.length, p.tokens.shape[1] - 1)]
        tok = jnp.where(forced, f_tok, tok)
        tok_ok = ok[jnp.arange(num), tok]
        log_mass = lse_masked - lse_all  # log of the allowed probability mass
        alive = active & (log_mass > NEG_INF) & tok_ok
        died = active & ~alive
        tok = jnp.where(alive, tok, 0)
        lp_tok = jnp.take_along_axis(z, tok[:, None], axis=1)[:, 0] - lse_all
        cause = jnp.full_like(p.cause, int(Cause.DEAD))  # told apart after the hole: _refine_causes
        # Proper weighting: w *= p(x) / q(x) = allowed mass, since q = p restricted to the allowed set.
        inc_w = log_mass if self.cfg.weighted else jnp.zeros_like(log_mass)
        if self.cfg.lookahead:  # w *= Z_t / psi(previous token); the drawn token's psi is carried
            inc_w = inc_w - p.twist
            psi_tok = la_psi[rows_all, tok]
        p = self._advance(consts, p, alive, tok, lp_tok, inc_w, died, cause)
        if self.cfg.lookahead:
            p = p._replace(twist=jnp.where(alive, psi_tok, p.twist))
        return state._replace(
            particles=p,
            cache=cache,
            n_tokens=state.n_tokens + jnp.sum(alive),
            n_forward=state.n_forward + 1,
            n_rows=state.n_rows + num,
        )

    def _distinct_step(self, params, consts: Consts, hp: HoleParams, state: RunState, key):
        """One decode step, the LM run once per distinct history: the same step as :meth:`_sample_step`.

        Particles still generating the hole are put in classes of equal ``(row, last)`` (the same cache
        history and pending token, hence the same logits) and equal hole state (automaton, counters, tokens in
        the hole: the same mask). With few classes (at most :data:`SMALL_BLOCK_ROWS`), or more particles than
        one block holds (:func:`decode_block_rows`), sharers that will write different tokens first get rows of
        their own (:meth:`_unshare`) and one representative row per class goes through the LM, in blocks (one
        small block when the classes fit it, else large ones): each block's mask, normalizer and CDF are
        computed per class, every particle of the class draws its own token from them with its own uniform
        (inverse CDF, as :func:`sample_masked`), and the representative writes the pending token's KV entry
        into the row its class shares. Otherwise every particle goes through the LM in place, each in its own
        row (:meth:`_compact`). Idle particles (done, paused) take no LM row in blocks. Weights, scores and the
        proposal are exactly those of the per-particle step; only the LM work and the ``[rows, V]`` working set
        shrink.
        """
        cfg = self.cfg
        num = state.particles.last.shape[0]
        v = consts.table.vocab_size
        i32 = jnp.int32
        active = self.running(state.particles, hp)
        rows_all = jnp.arange(num, dtype=i32)
        u = jax.random.uniform(key, (num,), dtype=jnp.float32)
        small, large = decode_block_rows(num, v)

        def classes(p):
            cls, rep, first, lead = _classes((
                (~active).astype(i32), p.row, p.last, p.auto, p.counts[:, 0], p.counts[:, 1], p.counts[:, 2],
                p.n_hole,
            ))
            return cls, rep, jnp.sum((first & (lead == 0)).astype(i32))  # running classes: 0 .. n_cls - 1

        def block(p, cls, rep, n_cls, size: int, in_place: bool):
            forced = p.length < p.force_len
            f_tok = p.tokens[rows_all, jnp.minimum(p.length, p.tokens.shape[1] - 1)]

            def run(carry):
                b0, cache, out, n_fwd, n_rows = carry
                if in_place:  # every particle through the LM, row i = particle i
                    rows, read, local, mine = None, rows_all, rows_all, active
                else:
                    ids = b0 + jnp.arange(size, dtype=i32)
                    read = rep[jnp.minimum(ids, num - 1)]
                    rows = jnp.where(ids < n_cls, p.row[read], num)  # padding rows write nothing
                    local = jnp.clip(cls - b0, 0, size - 1)
                    mine = active & (cls >= b0) & (cls < b0 + size)
                logits, cache = self.lm.apply(params, cache, p.last[read][:, None], p.position[read],
                                              prefix=consts.prefix, rows=rows)
                z = logits[:, 0, :v].astype(jnp.float32) / consts.temperature
                hp_r = per_row(hp, read)
                ok = consts.table.mask(p.auto[read], p.counts[read], hp_r.max_tokens)
                ok = ok & (p.n_hole[read] < hp_r.max_steps)[:, None]
                lse_all = jax.nn.logsumexp(z, axis=-1)
                masked = jnp.where(ok, z, NEG_INF)
                if cfg.lookahead:  # q ~ p psi over the allowed set: lse_masked becomes log Z_t (lookahead.py)
                    crow, live = (rows_all, active) if in_place else (p.row[read], ids < n_cls)
                    la_psi, la_calls, la_rows = lookahead.lookahead(
                        self.lm, params, consts, hp_r, cache, crow, live, p.position[read], p.auto[read],
                        p.counts[read], p.n_hole[read], masked, cfg.lookahead)
                    masked = lookahead.twisted(masked, la_psi)
                    n_fwd, n_rows = n_fwd + la_calls, n_rows + la_rows
                if cfg.select == "argmax":
                    tok = jnp.argmax(masked, axis=-1).astype(i32)[local]
                    lse_masked = jax.nn.logsumexp(masked, axis=-1)
                else:
                    m = _safe_max(masked, keepdims=True)
                    cdf = jnp.cumsum(jnp.exp(masked - m), axis=-1)
                    total = cdf[:, -1]
                    tot = total[local]
                    q = jnp.clip(u * tot, 0, jnp.nextafter(tot, jnp.zeros_like(tot)))
                    tok = jnp.minimum(_upper_bound(cdf, local, q), v - 1)
                    lse_masked = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m[:, 0], NEG_INF)
                tok = jnp.where(forced, f_tok, tok)
                psi_tok = la_psi[local, tok] if cfg.lookahead else out[4]
                new = (tok, ok[local, tok], lse_masked[local] - lse_all[local], z[local, tok] - lse_all[local], psi_tok)
                out = tuple(jnp.where(mine, a, b) for a, b in zip(new, out))
                width = num if in_place else size
                return b0 + width, cache, out, n_fwd + 1, n_rows + width

            return run

        out0 = (jnp.zeros((num,), i32), jnp.zeros((num,), bool), jnp.full((num,), NEG_INF), jnp.zeros((num,)),
                jnp.zeros((num,)))

        def by_class(st: RunState):
            st, p = self._unshare(st, (active, st.particles.position, st.particles.last))
            cls, rep, n_cls = classes(p)
            carry = (i32(0), st.cache, out0, st.n_forward, st.n_rows)
            one = block(p, cls, rep, n_cls, small, False)
            if large == num:  # only taken with at most `small` classes: one small block
                carry = one(carry)
            else:  # large blocks while more than a small one is left, then at most one small block
                carry = lax.while_loop(lambda c: n_cls - c[0] > small, block(p, cls, rep, n_cls, large, False), carry)
                carry = run_if(carry[0] < n_cls, one, carry)
            return p, carry

        def in_place(st: RunState):
            st = self._compact(st)
            p = st.particles
            carry = block(p, rows_all, rows_all, i32(num), num, True)((i32(0), st.cache, out0, st.n_forward, st.n_rows))
            return p, carry

        if num <= small:
            p, carry = in_place(state)
        elif large == num:
            few = classes(state.particles)[2] <= small

            def into(path):  # state -> the carry of `path`, with the state's particles in it
                def go(c):
                    st = state._replace(particles=c[0], cache=c[1][1])
                    return path(st)
                return go

            init = (state.particles, (i32(0), state.cache, out0, state.n_forward, state.n_rows))
            p, carry = run_if(~few, into(in_place), run_if(few, into(by_class), init))
        else:
            p, carry = by_class(state)
        _, cache, (tok, tok_ok, log_mass, lp_tok, psi_tok), n_forward, n_rows = carry
        alive = active & (log_mass > NEG_INF) & tok_ok
        died = active & ~alive
        tok = jnp.where(alive, tok, 0)
        lp_tok = jnp.where(alive, lp_tok, 0.0)
        cause = jnp.full_like(p.cause, int(Cause.DEAD))
        inc_w = log_mass if cfg.weighted else jnp.zeros_like(log_mass)
        if cfg.lookahead:  # w *= Z_t / psi(previous token); the drawn token's psi is carried
            inc_w = inc_w - p.twist
        p = self._advance(consts, p, alive, tok, lp_tok, inc_w, died, cause)
        if cfg.lookahead:
            p = p._replace(twist=jnp.where(alive, psi_tok, p.twist))
        return state._replace(
            particles=p,
            cache=cache,
            n_tokens=state.n_tokens + jnp.sum(alive),
            n_forward=n_forward,
            n_rows=n_rows,
        )

    # ------------------------------------------------------------------------------------------------
    # Rows of the cache (Particles.row)
    # ------------------------------------------------------------------------------------------------

    def _compact(self, state: RunState) -> RunState:
        """Every particle in its own row, row ``i`` for particle ``i``: for kernels that run every particle
        through the LM in place. When the rows of the particles out of place are used by nobody else (after an
        in-place resampling: the extra children of an ancestor sit where unselected particles were), only those
        rows are copied, in blocks of :data:`SMALL_BLOCK_ROWS`; otherwise the cache is gathered whole."""
        p = state.particles
        num = p.row.shape[0]
        ident = jnp.arange(num, dtype=jnp.int32)
        away = p.row != ident
        used = jnp.zeros((num,), bool).at[p.row].set(True)
        by_rows = ~jnp.any(away & used)  # no particle's target row is another particle's source
        n_away = jnp.sum(away.astype(jnp.int32))
        order = jnp.nonzero(away, size=num, fill_value=num)[0].astype(jnp.int32)  # particles to move, in order
        size = min(num, SMALL_BLOCK_ROWS)

        def copy(c):
            b0, cache = c
            ids = b0 + jnp.arange(size, dtype=jnp.int32)
            dst = order[jnp.minimum(ids, num - 1)]
            src = p.row[jnp.minimum(dst, num - 1)]
            return b0 + size, self.lm.copy_rows(cache, src, jnp.where(ids < n_away, dst, num))

        cache = run_if(by_rows, lambda c: lax.while_loop(lambda k: k[0] < n_away, copy, (jnp.int32(0), c))[1],
                       state.cache)
        cache = run_if(~by_rows, lambda c: self.lm.reorder(c, p.row), cache)
        return state._replace(cache=cache, particles=p._replace(row=ident))

    def _unshare(self, state: RunState, keys) -> tuple[RunState, Particles]:
        """Particles that share a row but differ in ``keys`` (what they will write there and where) stop
        sharing it: in each row the first class of equal keys keeps the row and every other class moves, all its
        particles together, to a free row (one no particle uses) holding a copy of it. Copies run in blocks of
        :data:`SMALL_BLOCK_ROWS` rows, as many as there are classes to move (none when nobody shares). There is
        always a free row for each: classes <= P, and each used row keeps one."""
        p = state.particles
        num = p.row.shape[0]
        i32 = jnp.int32
        cls, _, first, lead = _classes((p.row,) + tuple(jnp.asarray(k, i32) for k in keys))
        row_start = jnp.concatenate([jnp.ones((1,), bool), lead[1:] != lead[:-1]])  # sorted order
        moves = first & ~row_start
        k = jnp.cumsum(moves.astype(i32)) - 1
        used = jnp.zeros((num,), bool).at[p.row].set(True, mode="drop")
        free = jnp.nonzero(~used, size=num, fill_value=num)[0].astype(i32)
        cls_sorted = jnp.cumsum(first.astype(i32)) - 1
        start_row = jnp.where(moves, free[jnp.clip(k, 0, num - 1)], lead)
        class_row = jnp.zeros((num,), i32).at[jnp.where(first, cls_sorted, num)].set(start_row, mode="drop")
        n_moves = jnp.sum(moves.astype(i32))
        src = jnp.zeros((num,), i32).at[jnp.where(moves, k, num)].set(lead, mode="drop")
        size = min(num, SMALL_BLOCK_ROWS)

        def copy(c):
            b0, cache = c
            ids = b0 + jnp.arange(size, dtype=i32)
            at = jnp.minimum(ids, num - 1)
            return b0 + size, self.lm.copy_rows(cache, src[at], jnp.where(ids < n_moves, free[at], num))

        _, cache = lax.while_loop(lambda c: c[0] < n_moves, copy, (i32(0), state.cache))
        p = p._replace(row=class_row[cls])
        return state._replace(particles=p, cache=cache), p

    def _beam_step(self, params, consts: Consts, hp: HoleParams, state: RunState, key):
        """One beam step, in every group (``G`` independent searches of ``B = P / G`` beams, rows ``g B ..
        (g + 1) B - 1``): the ``B`` best of the group's live beams' allowed extensions and finished beams, by
        score (log target density). Beams are reordered (and the cache with them) every step."""
        state = self._compact(state)
        p = state.particles
        num = p.last.shape[0]
        groups = self.cfg.groups
        width = num // groups
        z, cache = self._logits(params, consts, state)
        logp = jax.nn.log_softmax(z, axis=-1)
        ok = self._mask(consts, hp, p)
        v = logp.shape[1]
        active = ~p.done & (p.cause == 0)
        masked = jnp.where(ok, logp, NEG_INF)
        had_token = jnp.any(masked > NEG_INF, axis=-1)
        cand = jnp.where(active[:, None], p.score[:, None] + masked, NEG_INF)
        stay = jnp.where(~active & (p.cause == 0), p.score, NEG_INF)
        # per group: its beams' extensions (beam-major), then its beams staying as they are
        pool = jnp.concatenate([cand.reshape(groups, width * v), stay.reshape(groups, width)], axis=1)
        top, idx = lax.top_k(pool, width)  # [G, B], indices within the group's pool
        is_stay = idx >= width * v
        base = (jnp.arange(groups, dtype=jnp.int32) * width)[:, None]
        anc = (base + jnp.where(is_stay, idx - width * v, idx // v)).astype(jnp.int32).reshape(num)
        tok = jnp.where(is_stay, 0, idx % v).astype(jnp.int32).reshape(num)
        top, is_stay = top.reshape(num), is_stay.reshape(num)
        expand = ~is_stay & (top > NEG_INF)
        dead = ~(top > NEG_INF)
        # Why a pick with score -inf is dead: its ancestor was already dead, or had no allowed token (DEAD,
        # refined after the hole; the pick carries the ancestor's state); otherwise it is a filler (fewer
        # finite candidates than beams).
        row_cause = jnp.where(
            p.cause[anc] != 0,
            p.cause[anc],
            jnp.where(active[anc] & ~had_token[anc], int(Cause.DEAD), int(Cause.UNUSED)),
        )
        q = jax.tree.map(lambda x: jnp.take(x, anc, axis=0), p)
        q = q._replace(done=q.done | ~expand)  # a stay beam stays done; a dead pick is done
        cache = self.lm.reorder(cache, anc)  # beam i's history is now row i
        q = q._replace(row=jnp.arange(num, dtype=jnp.int32))
        q = self._advance(
            consts, q, expand, tok, logp[anc, tok], jnp.zeros((num,), jnp.float32), dead & (q.cause == 0), row_cause
        )
        q = q._replace(log_weight=q.score)
        return state._replace(
            particles=q,
            cache=cache,
            n_tokens=state.n_tokens + jnp.sum(expand),
            n_forward=state.n_forward + 1,
            n_rows=state.n_rows + num,
        )

    # ------------------------------------------------------------------------------------------------
    # Cutting and restoring trajectories (MCMC suffix moves, see lmprog.inference.mcmc)
    # ------------------------------------------------------------------------------------------------

    def _snapshot(self, state: RunState, slot, mask, data_ids):
        """Record the start of segment ``slot`` for the particles in ``mask`` (with their host data ids)."""
        TRACE_COUNTS["snapshot"] += 1
        p = state.particles
        tr = p.trace
        put = lambda a, v: a.at[:, slot].set(jnp.where(mask, v, a[:, slot]))  # noqa: E731
        tr = tr._replace(
            seg_length=put(tr.seg_length, p.length),
            seg_log_weight=put(tr.seg_log_weight, p.lw_total),
            seg_score=put(tr.seg_score, p.score),
            seg_data=put(tr.seg_data, data_ids),
        )
        return state._replace(particles=p._replace(trace=tr))

    @staticmethod
    def _cut(p: Particles, mask, t, prefix_last, first_cleared_hole):
        """Particles in ``mask`` go back to ``t`` tokens after the prefix: the KV cache of the kept tokens is
        left as it is (slots past the new position are overwritten as the particle goes on); holes from
        ``first_cleared_hole`` on are forgotten."""
        num, h = p.spans.shape[:2]
        rows = jnp.arange(num)
        last = jnp.where(t > 0, p.tokens[rows, jnp.maximum(t - 1, 0)], prefix_last)
        clear = mask[:, None] & (jnp.arange(h)[None, :] >= first_cleared_hole[:, None])
        return p._replace(
            last=jnp.where(mask, last, p.last),
            position=jnp.where(mask, p.position - p.length + t, p.position),
            length=jnp.where(mask, t, p.length),
            spans=jnp.where(clear[..., None], 0, p.spans),
            hole_logp=jnp.where(clear, 0.0, p.hole_logp),
            cause=jnp.where(mask, 0, p.cause),
            force_len=jnp.where(mask, 0, p.force_len),
        )

    def _resume_hole(self, state: RunState, mask, t, hole, prefix_last):
        """Particles in ``mask`` go back to just before token ``t[i]`` (a token of hole ``hole[i]``), in the
        middle of that hole, with the automaton state, counters, weight and score recorded there; the
        next hole step regenerates token ``t[i]``."""
        TRACE_COUNTS["resume_hole"] += 1
        state, p = self._unshare(state, (mask, jnp.where(mask, t, -1)))  # a cut particle will write from t on
        num = p.last.shape[0]
        rows = jnp.arange(num)
        tr = p.trace
        ti = jnp.clip(t, 0, tr.auto.shape[1] - 1)
        hole = jnp.clip(hole, 0, p.spans.shape[1] - 1)
        start = p.spans[rows, hole, 0]
        p = self._cut(p, mask, t, prefix_last, hole + 1)
        m1 = mask[:, None]
        p = p._replace(
            auto=jnp.where(mask, tr.auto[rows, ti], p.auto),
            counts=jnp.where(m1, tr.counts[rows, ti], p.counts),
            hole=jnp.where(mask, hole, p.hole),
            n_hole=jnp.where(mask, t - start, p.n_hole),
            done=jnp.where(mask, False, p.done),
            lw_total=jnp.where(mask, tr.log_weight[rows, ti], p.lw_total),
            log_weight=jnp.where(mask, tr.log_weight[rows, ti], p.log_weight),
            score=jnp.where(mask, tr.score[rows, ti], p.score),
            spans=p.spans.at[rows, hole, 1].set(jnp.where(mask, t, p.spans[rows, hole, 1])),
            hole_logp=p.hole_logp.at[rows, hole].set(jnp.where(mask, tr.hole_logp[rows, ti], p.hole_logp[rows, hole])),
        )
        return state._replace(particles=p)

    def _resume_segment(self, state: RunState, mask, slot, first_hole, prefix_last):
        """Particles in ``mask`` go back to the start of segment ``slot`` (recorded by :meth:`_snapshot`);
        holes from ``first_hole`` on (those of this segment and after) are forgotten."""
        TRACE_COUNTS["resume_segment"] += 1
        t = state.particles.trace.seg_length[:, slot]
        state, p = self._unshare(state, (mask, jnp.where(mask, t, -1)))
        tr = p.trace
        p = self._cut(p, mask, t, prefix_last, jnp.full_like(t, first_hole))
        p = p._replace(
            auto=jnp.where(mask, -1, p.auto),
            counts=jnp.where(mask[:, None], 0, p.counts),
            hole=jnp.where(mask, -1, p.hole),
            n_hole=jnp.where(mask, 0, p.n_hole),
            done=jnp.where(mask, True, p.done),
            lw_total=jnp.where(mask, tr.seg_log_weight[:, slot], p.lw_total),
            log_weight=jnp.where(mask, tr.seg_log_weight[:, slot], p.log_weight),
            score=jnp.where(mask, tr.seg_score[:, slot], p.score),
        )
        return state._replace(particles=p)

    def _select(self, current: RunState, proposal: RunState, accept):
        """Particle ``i`` from ``proposal`` where ``accept[i]``, else from ``current``, with its KV history."""
        TRACE_COUNTS["select"] += 1

        def pick(a, b):
            return jnp.where(jnp.reshape(accept, (-1,) + (1,) * (a.ndim - 1)), b, a)

        # Row i of the result: particle i's history, from the proposal's cache where accepted (rows are gathered:
        # the two states' row numbers are unrelated).
        cache = jax.tree.map(pick, self.lm.reorder(current.cache, current.particles.row),
                             self.lm.reorder(proposal.cache, proposal.particles.row))
        parts = jax.tree.map(pick, current.particles, proposal.particles)
        num = parts.row.shape[0]
        return proposal._replace(particles=parts._replace(row=jnp.arange(num, dtype=jnp.int32)), cache=cache)

    # ------------------------------------------------------------------------------------------------
    # Resampling
    # ------------------------------------------------------------------------------------------------

    def _maybe_resample(self, consts: Consts, hp: HoleParams, state: RunState, key, uneven_only: bool = False):
        """ESS per group; resample the groups whose ESS fell below the threshold (``uneven_only``: and whose
        weights are not all equal, so ``ess=1`` does not resample where nothing has weighed the particles).

        Resampling sets a group's log-weights to 0 and adds ``logsumexp(w) - log N`` to its ``log_z``, so
        ``log_z + logsumexp(log_weight) - log N`` (the log-evidence estimate) is unchanged by it: the
        estimate is correct whether or not a step resampled.
        """
        cfg = self.cfg
        p = state.particles
        num = p.last.shape[0]
        g = cfg.groups
        n = num // g
        lw = p.log_weight.reshape(g, n)
        ess = resampling.ess(lw)
        if cfg.resampler is None:
            return state, ess, jnp.zeros((g,), bool)
        lse = jax.nn.logsumexp(lw, axis=1)
        thr = consts.ess_threshold
        # A group whose particles all died has nothing to resample from; ess >= 1 means every step.
        do = (lse > NEG_INF) & ((thr >= 1.0) | (ess < thr * n))
        # No point resampling a group where every particle has finished the hole. Weight changes between
        # holes (observed text, host factors) are taken into account at the next check, after the next token.
        do = do & jnp.any(self.running(p, hp).reshape(g, n), axis=1)
        if uneven_only:
            do = do & (ess < n * (1.0 - 1e-5))
        resampler = resampling.get_resampler(cfg.resampler)

        def go(parts: Particles, log_z):
            w = resampling.normalized_weights(lw)
            keys = jax.random.split(key, g)
            anc = jax.vmap(resampler, in_axes=(0, 0, None))(keys, w, n)
            if cfg.conditional:
                anc = anc.at[:, 0].set(0)
            anc = jax.vmap(_in_place)(anc)
            anc = jnp.where(do[:, None], anc, jnp.arange(n, dtype=jnp.int32)[None, :])
            anc = (anc + (jnp.arange(g, dtype=jnp.int32) * n)[:, None]).reshape(num)
            q = jax.tree.map(lambda x: jnp.take(x, anc, axis=0), parts)
            q = q._replace(log_weight=jnp.where(do[:, None], 0.0, lw).reshape(num))
            if cfg.conditional:  # descendants of the reference do not replay it
                q = q._replace(force_len=jnp.where(jnp.arange(num) % n == 0, q.force_len, 0))
            return q, log_z + jnp.where(do, lse - math.log(n), 0.0)

        # Children share their ancestor's cache row (Particles.row): the cache stays out of the branch, so
        # nothing of it is copied.
        parts, log_z = lax.cond(jnp.any(do), go, lambda q, z: (q, z), state.particles, state.log_z)
        state = state._replace(particles=parts, log_z=log_z)
        return state, ess, do

    def _resample_check(self, consts: Consts, hp: HoleParams, state: RunState):
        """The token loop's resampling check, once, at the start of a hole that takes no decode step (an
        enumerated hole: the weight changes since the last hole, observed text and host factors, are otherwise
        seen only at the next token-loop step); groups whose weights are all equal do not resample. Returns ``(state, ess [1, G], resampled [1, G], genealogy)``
        as one step of :meth:`_hole_chunk`."""
        TRACE_COUNTS["resample_check"] += 1
        key, k_res = jax.random.split(state.key)
        state = state._replace(key=key)
        record = GENEALOGY and self.cfg.resampler is not None
        p = state.particles
        origin, lw, length = p.origin, p.log_weight, p.length
        if record:
            state = state._replace(particles=p._replace(origin=jnp.arange(p.last.shape[0], dtype=jnp.int32)))
        state, ess, did = self._maybe_resample(consts, hp, state, k_res, uneven_only=True)
        gen = None
        if record:
            anc = state.particles.origin
            state = state._replace(particles=state.particles._replace(origin=origin[anc]))
            gen = (anc[None], lw[None], length[None])
        return state, ess[None], did[None], gen

    # ------------------------------------------------------------------------------------------------
    # The token loop
    # ------------------------------------------------------------------------------------------------

    def _hole_chunk(self, params, consts: Consts, hp: HoleParams, state: RunState):
        """Up to ``chunk`` decode steps, stopping early once every particle has finished the hole.

        Returns ``(state, ess [chunk, G], resampled [chunk, G], steps, still_active, genealogy)``; rows of the
        ESS history past ``steps`` are NaN. ``genealogy`` (kernels that resample; ``None`` otherwise) is
        ``(ancestors [chunk, P] int32, log_weights [chunk, P] f32, lengths [chunk, P] int32)``: at step ``t``,
        particle ``c`` after the step's resampling is a copy of particle ``ancestors[t, c]`` before it (the
        identity where the group did not resample), whose log-weight (since the previous resampling) and token
        count were ``log_weights[t, a]`` and ``lengths[t, a]``. Rows past ``steps`` are junk; the host keeps
        only the rows of steps that resampled (:mod:`lmprog.inference.engine`, ``Run.genealogy``).
        """
        TRACE_COUNTS["hole_chunk"] += 1
        cfg = self.cfg
        g = cfg.groups
        step = self._beam_step if cfg.select == "beam" else self._distinct_step if cfg.distinct else self._sample_step
        record = GENEALOGY and cfg.resampler is not None
        num = state.particles.last.shape[0]
        ident = jnp.arange(num, dtype=jnp.int32)

        def cond(c):
            i, st, _, res_buf, _ = c
            go = (i < cfg.chunk) & jnp.any(self.running(st.particles, hp))
            if cfg.stop_on_resample:
                go = go & ~((i > 0) & jnp.any(res_buf[jnp.maximum(i - 1, 0)]))
            return go

        def body(c):
            i, st, ess_buf, res_buf, gen = c
            key, k_step, k_res = jax.random.split(st.key, 3)
            st = step(params, consts, hp, st._replace(key=key), k_step)
            if record:
                # Resampling gathers every particle field by the ancestor indices, so an identity ``origin``
                # comes out of it as the ancestor vector itself; the real origins are then gathered the same way.
                p = st.particles
                origin, lw, length = p.origin, p.log_weight, p.length
                st = st._replace(particles=p._replace(origin=ident))
            st, ess, did = self._maybe_resample(consts, hp, st, k_res)
            if record:
                anc = st.particles.origin
                st = st._replace(particles=st.particles._replace(origin=origin[anc]))
                gen = (gen[0].at[i].set(anc), gen[1].at[i].set(lw), gen[2].at[i].set(length))
            return i + 1, st, ess_buf.at[i].set(ess), res_buf.at[i].set(did), gen

        rows = cfg.chunk if record else 0
        init = (
            jnp.int32(0),
            state,
            jnp.full((cfg.chunk, g), jnp.nan, jnp.float32),
            jnp.zeros((cfg.chunk, g), bool),
            (jnp.zeros((rows, num), jnp.int32), jnp.zeros((rows, num), jnp.float32), jnp.zeros((rows, num), jnp.int32)),
        )
        steps, state, ess_buf, res_buf, gen = lax.while_loop(cond, body, init)
        return state, ess_buf, res_buf, steps, jnp.sum(self.running(state.particles, hp)), gen if record else None


_KERNELS: dict = {}


#: ``False``: every kernel runs every particle through the LM at every step (``KernelConfig.distinct`` off):
#: the reference the tests compare distinct decoding with.
DISTINCT = True
#: ``False``: the hole chunk records no genealogy (its cost: ``benchmarks/bench_genealogy.py``).
GENEALOGY = True


def get_kernels(lm, cfg: KernelConfig) -> Kernels:
    """The (cached) kernels for ``lm`` and ``cfg``: one compilation per model, config and shapes."""
    if not DISTINCT and cfg.distinct:
        cfg = replace(cfg, distinct=False)
    key = (id(lm), cfg)
    hit = _KERNELS.get(key)
    if hit is not None and hit.lm is lm:
        return hit
    k = Kernels(lm, cfg)
    _KERNELS[key] = k
    return k
