"""One-step lookahead to a hole's end: a twisted proposal whose weight correction keeps the target exact.

**Why.** A hole ends inside its automaton: after the value the LM must produce the terminator (the literal
text after the hole, a ``stop_at`` string, EOS or the end-of-turn token; docs/constraints.md, "Where a hole
ends"), and only then is the hole ``done``. The plain proposal is the LM masked one step at a time,
``q_t(x) = p(x) 1[x in A_t] / p(A_t)`` with incremental weight ``p(A_t)``. It is myopic where a token can
*end the value*: in ``"A: [answer]\\n"`` the LM likes ``"The"`` as a first token, but after ``"The"`` it wants
``" capital"``, which the regex forbids, so the particle pays a tiny ``p(A_{t+1})`` one step later. At 16-64
particles whether a run keeps its ``"Paris"`` particles is then luck.

**The twist.** Let ``psi_t(x_1:t) > 0`` be any positive function of a particle's tokens and take the SMC
intermediate targets ``gamma~_t = gamma_t psi_t`` (``gamma_t``: the LM probability of the prefix times its
constraint indicator, docs/inference.md). Proposing ``x_t`` from

    q~_t(x) = p(x) psi_t(x_<t, x) 1[x in A_t] / Z_t,        Z_t = sum_{x in A_t} p(x) psi_t(x_<t, x)

gives the incremental weight ``gamma~_t / (gamma~_{t-1} q~_t) = Z_t / psi_{t-1}(x_<t)``: the twisted
normaliser, independent of the token drawn, divided by the twist of the previous token. The twist is taken out
again at the particle's next hole step (:attr:`~lmprog.inference.state.Particles.twist` carries
``log psi_{t-1}``), and ``psi = 1`` for a token that ends the hole, so when the hole ends the weights are those
of ``gamma`` itself: the final target, ``Z`` and ``Z_hat``'s unbiasedness are those of the plain proposal for
*any* positive ``psi``. Only the proposal and the intermediate targets (what resampling sees) change.

**Which psi.** The ideal one-step twist is the next step's allowed mass, ``psi_t(x) = p(A_{t+1} | x_1:t)``:
then the two steps' weight is ``Z_t`` whatever is drawn (fully adapted over two steps). It costs one LM forward
per candidate token, so it is computed exactly only for the ``k`` *ending candidates*: the ``k`` allowed tokens
of highest ``p(x)`` after which the hole is not done but its next token may end it or start its terminator (an
automaton successor that is final or holds pending terminator bytes; never a fixed-length hole), within the
hard cap. A token that *ends* the hole gets ``psi = 1``, which is exact (nothing of the hole is left). Every
other allowed token gets the *fill* ``psi_bar``, the candidates' ``p``-weighted mean ``psi`` floored at
:data:`FILL_FLOOR` (:func:`fill`): a token the lookahead did not look at is taken to be typical, and the floor
keeps every token with target mass in the proposal (exactness) and bounds its two-step weight,
``Z_t p(A_{t+1} | x) / psi_bar <= Z_t / FILL_FLOOR``; on the candidates the two-step weight is exactly ``Z_t``.
(A fill of ``psi_bar = 1`` bounds every weight by ``Z_t`` but over-proposes the tail beyond the candidates:
on ``capital.lmp``, where the top 12 first tokens hold 60 % of the allowed mass, it lowered the ESS;
docs/performance.md.) ``psi(x) = 0`` (a candidate whose next step allows nothing) removes ``x`` from the
proposal, which is exact: the target has no mass through it. The mask of the lookahead step is the mask the
next step will use (the successor's automaton state and counters, the budget, the hard cap), at the same
temperature.

**Cost.** The candidates of every distinct history of a decode step are run in blocks of
:data:`LOOK_ROWS` rows: each block gathers its histories' cache rows into a scratch cache (the step has
already written the pending token there), feeds each candidate at the next position and discards the scratch.
Steps without candidates run no forward; a step with ``n`` histories with candidates runs
``ceil(n k / LOOK_ROWS)`` extra forwards. Exactness never depends on which tokens are candidates: the
weight uses the ``psi`` the proposal used (measured in docs/performance.md, "Lookahead").

The lookahead is a static choice of the kernels (``KernelConfig.lookahead = k``), for the properly weighted
one-pass strategies ``importance`` and ``smc`` (``lookahead=k``; without ``rejuvenate``: MCMC moves cut
trajectories anywhere and would have to restore the carried twist).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["FILL_FLOOR", "LOOK_ROWS", "candidates", "fill", "lookahead", "twisted"]

#: Rows of one lookahead forward (candidate tokens of the step's histories, padded).
LOOK_ROWS = 16
#: The least twist :func:`fill` gives.
FILL_FLOOR = 0.01

NEG_INF = -jnp.inf


def candidates(table, auto, counts, n_hole, masked, k: int, max_steps):
    """The ending candidates of each row: ``(tok [R, k], use [R, k], nxt [R k], cnt [R k, 3])``.

    ``tok``: the ``k`` allowed tokens of highest masked logit (``masked [R, V]``, ``-inf`` = disallowed); ``use``:
    allowed, not ending the hole, its successor able to end the hole or begin its terminator at the next token
    (not a fixed-length hole), and within the hard cap; ``nxt`` / ``cnt``: the automaton state and raw counts
    after each candidate (flattened row-major)."""
    r = masked.shape[0]
    val, tok = lax.top_k(masked, k)
    tok = tok.astype(jnp.int32)
    rep = jnp.repeat(auto, k)
    nxt, cnt = table.step(rep, jnp.repeat(counts, k, axis=0), tok.reshape(-1))
    succ, _ = table.class_successors(nxt)
    s = jnp.maximum(succ, 0)
    may_end = jnp.any((succ >= 0) & (table.final[s] | (table.pending[s] > 0)), axis=1)
    open_hole = table.counters.fixed_len[jnp.maximum(nxt, 0)] < 0
    use = (val > NEG_INF).reshape(-1) & (nxt >= 0) & ~table.done(nxt, cnt) & may_end & open_hole
    use = use.reshape(r, k) & (n_hole + 1 < max_steps)[:, None]
    return tok, use, nxt, cnt


def lookahead(lm, params, consts, hp, cache, crow, live, position, auto, counts, n_hole, masked, k: int):
    """``(log_psi [R, V], calls, rows)``: the twist of every token of each row (``log psi``, to add to the masked
    logits: :func:`twisted`), and the LM forwards and rows computing it took.

    Row ``r`` is a history in cache row ``crow[r]`` whose pending token the step has just fed (its KV is in the
    cache), at ``position[r]``, in hole state ``auto``/``counts``/``n_hole``; rows not ``live`` get no
    candidates. ``masked``: the step's masked, tempered logits. The candidates run through the LM in blocks of
    :data:`LOOK_ROWS` (their rows gathered into a scratch cache), only as many blocks as there are candidates.
    The twist: ``log p(A_{t+1} | x)`` on the candidates, 0 on tokens that end the hole, the fill
    (:func:`fill`) on every other token; all 0 in a row without candidates."""
    table = consts.table
    v = table.vocab_size
    r = masked.shape[0]
    tok, use, nxt, cnt = candidates(table, auto, counts, n_hole, masked, k, hp.max_steps)
    use = use & live[:, None]
    flat = use.reshape(-1)
    total = r * k
    order = jnp.nonzero(flat, size=total, fill_value=total)[0].astype(jnp.int32)
    n_pairs = jnp.sum(flat.astype(jnp.int32))
    size = min(total, LOOK_ROWS)
    tok_f = tok.reshape(-1)

    def block(c):
        b0, out = c
        ids = b0 + jnp.arange(size, dtype=jnp.int32)
        f = jnp.minimum(order[jnp.minimum(ids, total - 1)], total - 1)
        row = f // k
        scratch = lm.reorder(cache, crow[row])
        logits, _ = lm.apply(params, scratch, tok_f[f][:, None], position[row] + 1, prefix=consts.prefix)
        z = logits[:, 0, :v].astype(jnp.float32) / consts.temperature
        max_tokens, max_steps = (a if jnp.ndim(a) == 0 else a[row] for a in (hp.max_tokens, hp.max_steps))
        ok = table.mask(nxt[f], cnt[f], max_tokens) & (n_hole[row] + 1 < max_steps)[:, None]
        lp = jax.nn.logsumexp(jnp.where(ok, z, NEG_INF), axis=-1) - jax.nn.logsumexp(z, axis=-1)
        return b0 + size, out.at[jnp.where(ids < n_pairs, f, total)].set(lp, mode="drop")

    _, cand_psi = lax.while_loop(lambda c: c[0] < n_pairs, block, (jnp.int32(0), jnp.zeros((total,), jnp.float32)))
    cand_psi = cand_psi.reshape(r, k)
    calls = (n_pairs + size - 1) // size
    rows = jnp.arange(r)[:, None]
    base = fill(masked[rows, tok], cand_psi, use)
    ends = table.is_final(table.next_states(auto))  # open holes: done = final (fixed-length rows have no candidates)
    log_psi = jnp.where(ends, 0.0, base[:, None])
    log_psi = log_psi.at[rows, tok].set(jnp.where(use, cand_psi, log_psi[rows, tok]))
    return log_psi, calls, calls * size


def fill(cand_logit, cand_psi, use):
    """``[R]`` log of the twist of the tokens that are neither candidates nor end the hole: the candidates'
    ``p``-weighted mean ``psi``, floored at :data:`FILL_FLOOR` so that no token with target mass leaves the
    proposal and a non-candidate's two-step weight is at most ``Z_t / FILL_FLOOR``. 0 in a row without
    candidates."""
    lw = jnp.where(use, cand_logit, NEG_INF)
    num = jax.nn.logsumexp(lw + jnp.where(use, cand_psi, 0.0), axis=1)
    den = jax.nn.logsumexp(lw, axis=1)
    mean = jnp.where(jnp.isfinite(den), num - jnp.where(jnp.isfinite(den), den, 0.0), 0.0)
    return jnp.where(jnp.any(use, axis=1), jnp.maximum(mean, math.log(FILL_FLOOR)), 0.0)


def twisted(masked, log_psi):
    """The twisted proposal's logits ``masked + log psi``."""
    return masked + log_psi
