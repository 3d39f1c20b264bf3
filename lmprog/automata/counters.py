"""Counters at run time: the jittable half of ``tokens(X)``, ``len(X)`` and ``words(X)`` bounds.

A particle in a hole carries ``counts: [3] int32`` — *raw* counts since the hole started, in the order of
:data:`COUNTERS`: tokens generated, characters generated, words generated. "Generated" includes the bytes of
the terminator produced so far; the counts of the hole's *value* are ``raw - pend[state]``, where ``pend`` is
a per-state array (the characters / word starts of terminator bytes the automaton holds as "pending" in that
state; see docs/constraints.md). The raw updates depend only on the token (and, for words, on a small
per-state word-tracker id), so the jitted step is a few gathers:

* tokens: ``+1`` per token;
* characters: ``+inc_chars[token]`` (UTF-8 lead bytes of the token);
* words: ``+inc_words[tracker[state], token]`` (word starts, as ``len(str.split())`` counts words).

:func:`counter_mask` is the exact completability test: a token class is allowed only if, after it, some
completion of the hole puts every value count in one of its allowed intervals (per-state least / greatest
growth ``rmin``/``rmax``, reachability tables for two-sided intervals, fewest-token tables for lower bounds on
characters / words within the token budget).

The arrays are built on the host by :mod:`lmprog.compiler.counters` (the analysis) and
:mod:`lmprog.compiler.automaton` (stacking); this module only reads them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "CHARS", "COUNTERS", "INF", "TOKENS", "WORDS", "CounterArrays", "counter_mask", "hole_done", "increments",
    "init_counts", "update_counts", "value_counts",
]

COUNTERS = ("tokens", "len", "words")
TOKENS, CHARS, WORDS = 0, 1, 2
INF = 1 << 30  # "no bound" / "unbounded growth"; INF + INF still fits in int32


class CounterArrays(NamedTuple):
    """Counter data of every hole in a :class:`~lmprog.automata.table.TokenTable` (global state ids).

    ``lo``/``hi``/``fixed_len`` are per state (copied from the state's hole). ``tab_off[s, k]`` is the offset
    of state ``s``'s row in ``tab_cum`` (``-1``: no table), ``tab_cap[s, k]`` its ``cap``."""

    inc_chars: jax.Array  # [V] int32
    inc_words: jax.Array  # [T, V] int8
    cinc_chars: jax.Array  # [Ctot] int32 characters of the tokens of each (global) class
    cinc_words: jax.Array  # [Ctot, T] int8 word starts of the tokens of each class, per tracker state
    pend: jax.Array  # [S, 3] int32
    tracker: jax.Array  # [S] int32
    lo: jax.Array  # [S, 3, K] int32 allowed intervals of the value counts (empty slots: lo = INF, hi = -1)
    hi: jax.Array  # [S, 3, K] int32
    rmin: jax.Array  # [S, 3] int32
    rmax: jax.Array  # [S, 3] int32
    tab_off: jax.Array  # [S, 3] int32
    tab_cap: jax.Array  # [S, 3] int32
    tab_cum: jax.Array  # [N] int32 (at least one element): reachability tables and min-token tables
    mt_off: jax.Array  # [S, 3] int32 offset of the state's min-token row in tab_cum (-1: none)
    mt_cap: jax.Array  # [S, 3] int32 its last index (the lower bound)
    fixed_len: jax.Array  # [S] int32
    active: jax.Array  # [S] bool: the state's hole has a bound (or is fixed-length)


def init_counts(batch: int) -> jax.Array:
    """Raw counts at the start of a hole: ``[batch, 3] int32`` zeros."""
    return jnp.zeros((batch, 3), jnp.int32)


def increments(ca: CounterArrays, states: jax.Array, tokens: jax.Array) -> jax.Array:
    """``[B, 3]`` raw count increments of ``tokens`` generated in ``states``."""
    s = jnp.maximum(states, 0)
    ones = jnp.ones_like(tokens, dtype=jnp.int32)
    chars = ca.inc_chars[tokens]
    words = ca.inc_words[ca.tracker[s], tokens].astype(jnp.int32)
    return jnp.stack([ones, chars, words], axis=-1)


def update_counts(ca: CounterArrays, states: jax.Array, counts: jax.Array, tokens: jax.Array) -> jax.Array:
    """Raw counts after generating ``tokens`` in ``states`` (call with the states *before* the token)."""
    return counts + increments(ca, states, tokens)


def value_counts(ca: CounterArrays, states: jax.Array, counts: jax.Array) -> jax.Array:
    """Counts of the hole's value so far (terminator material excluded): ``raw - pend[state]``."""
    return counts - ca.pend[jnp.maximum(states, 0)]


def counter_mask(
    ca: CounterArrays,
    states: jax.Array,
    counts: jax.Array,
    next_states: jax.Array,
    classes: jax.Array,
    max_tokens: jax.Array | int | None = None,
) -> jax.Array:
    """``[B, C] bool``: token classes after which every bound of the hole can still be met.

    Works per token *class* (compiled holes with character / word bounds have classes whose tokens share
    their increments): ``next_states [B, C]`` are the successors (``-1`` disallowed: don't-care here) and
    ``classes [B, C]`` the global class ids indexing ``cinc_chars`` / ``cinc_words``. ``max_tokens`` (optional,
    traced or static; a scalar or one per row ``[B]``) is the strategy's token budget, on top of any
    ``tokens(X) <= N`` bound.
    Each counter's arithmetic is skipped (``lax.cond``) when no row of the batch has a bound on it."""
    s = jnp.maximum(states, 0)
    nxt = jnp.maximum(next_states, 0)
    lo = ca.lo[s]  # [B, 3, K]
    hi0 = ca.hi[s]  # as compiled (the reachability tables cover its finite values)
    hi = hi0
    if max_tokens is not None:  # a scalar, or one budget per row
        budget_rows = jnp.broadcast_to(jnp.asarray(max_tokens, jnp.int32), states.shape)[:, None]
        hi = hi.at[:, TOKENS, :].min(budget_rows)
    budget = jnp.max(hi[:, TOKENS, :], axis=-1)[:, None]  # [B, 1]
    last = ca.tab_cum.shape[0] - 1
    after_tok = counts[:, TOKENS][:, None] + 1  # [B, 1]
    width = ca.lo.shape[-1]

    def check(k: int, after):
        """Bounds of counter ``k`` given the value counts ``after`` [B, C] the token would leave."""
        rmin, rmax = ca.rmin[nxt, k], ca.rmax[nxt, k]
        has_tab = jnp.any(ca.tab_off[s, k] >= 0)
        has_mt = jnp.any(ca.mt_off[s, k] >= 0) if k != TOKENS else None
        any_ok = jnp.zeros(next_states.shape, bool)
        for j in range(width):  # the intervals (static; most holes have one)
            lo_j, hi_j = lo[:, k, j][:, None], hi[:, k, j][:, None]
            unbounded_j = hi0[:, k, j][:, None] >= INF
            ok = (after + rmin <= hi_j) & (after + rmax >= lo_j)

            def table(ok, lo_j=lo_j, hi_j=hi_j, unbounded_j=unbounded_j):
                off = ca.tab_off[nxt, k]
                a = jnp.maximum(lo_j - after, 0)
                b = jnp.minimum(hi_j - after, ca.tab_cap[nxt, k])
                base = jnp.maximum(off, 0)
                upper = ca.tab_cum[jnp.clip(base + b + 1, 0, last)]
                lower = ca.tab_cum[jnp.clip(base + a, 0, last)]
                return ok & ((off < 0) | unbounded_j | ((b >= a) & (upper - lower > 0)))

            ok = jax.lax.cond(has_tab, table, lambda ok: ok, ok)
            if k != TOKENS:

                def fewest_tokens(ok, lo_j=lo_j):  # a lower bound within the token budget
                    off = ca.mt_off[nxt, k]
                    need = jnp.clip(lo_j - after, 0, ca.mt_cap[nxt, k])
                    fewest = ca.tab_cum[jnp.clip(jnp.maximum(off, 0) + need, 0, last)]
                    return ok & ((off < 0) | (after_tok + fewest <= budget))

                ok = jax.lax.cond(has_mt, fewest_tokens, lambda ok: ok, ok)
            any_ok |= ok
        return any_ok

    def chars(_):
        after = counts[:, CHARS][:, None] + ca.cinc_chars[classes] - ca.pend[nxt, CHARS]
        return check(CHARS, after)

    def words(_):
        inc = ca.cinc_words[classes, ca.tracker[s][:, None]].astype(jnp.int32)
        after = counts[:, WORDS][:, None] + inc - ca.pend[nxt, WORDS]
        return check(WORDS, after)

    def bounded(k):
        return jnp.any((lo[:, k, 0] > 0) | (hi[:, k, 0] < INF) | (width > 1))

    ones = jnp.ones(next_states.shape, bool)
    ok = jax.lax.cond(bounded(TOKENS), lambda _: check(TOKENS, after_tok), lambda _: ones, None)
    ok &= jax.lax.cond(bounded(CHARS), chars, lambda _: ones, None)
    ok &= jax.lax.cond(bounded(WORDS), words, lambda _: ones, None)
    return ok


def hole_done(ca: CounterArrays, final: jax.Array, states: jax.Array, counts: jax.Array) -> jax.Array:
    """``[B] bool``: the hole has ended — a final state, and for a fixed-length hole exactly N tokens."""
    s = jnp.maximum(states, 0)
    fixed = ca.fixed_len[s]
    ok = final[s] & (states >= 0)
    return ok & ((fixed < 0) | (counts[:, TOKENS] == fixed))
