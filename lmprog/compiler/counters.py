"""Counters, host side: ``tokens(X)``, ``len(X)`` and ``words(X)`` bounds, kept in the particle state (never as
regex repetition, which would multiply the automaton's states by the bound). This module builds the counter
data of a compiled hole (numpy); the jittable half that reads it at run time (``CounterArrays``,
``counter_mask``, count updates) is :mod:`lmprog.automata.counters`.

A particle in a hole carries ``counts: [3] int32`` — *raw* counts since the hole started, in the order of
:data:`lmprog.automata.counters.COUNTERS`: tokens generated, characters generated, words generated.
"Generated" includes the bytes of the terminator produced so far; the counts of the hole's *value* are
``raw - pend[state]``, where ``pend`` is a per-state array (the characters / word starts of terminator bytes
the automaton holds as "pending" in that state; see docs/constraints.md). The raw updates depend only on the token (and, for words, on a small
per-state tracker id), so the jitted step is a few gathers:

* tokens: ``+1`` per token;
* characters: ``+inc_chars[token]`` (UTF-8 lead bytes of the token: characters as Python's ``len`` counts
  them);
* words: ``+inc_words[tracker[state], token]`` (word starts, as ``len(str.split())`` counts words: a word
  starts at a non-whitespace character that follows whitespace or the start; whitespace is ``str.isspace``).
  ``tracker[state]`` is the state of the byte-level word tracker (:func:`word_tracker`) after everything
  generated so far.

The bounds on one counter are a union of closed intervals (``tokens(x) < 3 or tokens(x) > 10`` is
``[0, 2] ∪ [11, ∞)``; most holes have one interval). They are exact for completability: a token is allowed
only if, after it, some completion of the hole puts the value count in one of the intervals. Per state and
counter we keep the least (``rmin``) and greatest (``rmax``, "infinite" with a cycle that adds) amount the
*value* count can still grow on the way to the hole's end; an interval ``[0, hi]`` needs ``value + rmin <= hi``,
``[lo, ∞)`` needs ``value + rmax >= lo``, and a two-sided ``[lo, hi]`` (``==``, or ``>=`` and ``<=`` together)
also consults a per-state reachability table over ``0..cap`` (stored as cumulative sums, so a window query
is two gathers). Each counter is exact on its own, and so is a lower bound on characters or words together
with the token budget (a per-state table of the fewest tokens that gain at least ``a``); other combinations
are each checked separately (one that only fails jointly ends with no allowed token: the particle dies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from lmprog.automata.counters import CHARS, INF, TOKENS

# --------------------------------------------------------------------------------------------------
# The word tracker: a byte-level transducer emitting 1 at each word start
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def whitespace_encodings() -> frozenset[bytes]:
    """UTF-8 encodings of the characters ``str.split()`` splits on (``str.isspace``)."""
    return frozenset(chr(c).encode("utf-8") for c in range(0x3001) if chr(c).isspace())


@dataclass(frozen=True)
class WordTracker:
    """``delta[t, b]``: the tracker state after byte ``b``; ``emit[t, b]``: 1 where a word starts.

    State 0: at the start or after whitespace; 1: after a non-whitespace character; ``2 + 2i + f``: inside
    a multi-byte character whose bytes so far (``prefixes[i]``) may still be whitespace, ``f`` telling
    which of the first two the character before it was."""

    delta: np.ndarray
    emit: np.ndarray
    prefixes: tuple[bytes, ...]

    @property
    def num_states(self) -> int:
        return int(self.delta.shape[0])

    def run(self, data: bytes, state: int = 0) -> tuple[int, int]:
        """The state after ``data`` and the number of word starts in it."""
        count = 0
        for b in data:
            count += int(self.emit[state, b])
            state = int(self.delta[state, b])
        return state, count


@lru_cache(maxsize=1)
def word_tracker() -> WordTracker:
    ws = whitespace_encodings()
    prefixes = sorted({e[:i] for e in ws for i in range(1, len(e))})
    index = {p: i for i, p in enumerate(prefixes)}

    def encode(flag: int, pending: bytes) -> int:
        return flag if not pending else 2 + 2 * index[pending] + flag

    states = [(0, b""), (1, b"")] + [(f, p) for p in prefixes for f in (0, 1)]
    n = len(states)
    delta = np.zeros((n, 256), np.int32)
    emit = np.zeros((n, 256), np.int8)
    for flag, pending in states:
        s = encode(flag, pending)
        for b in range(256):
            q = pending + bytes([b])
            if q in ws:
                delta[s, b] = 0
            elif q in index:
                delta[s, b] = encode(flag, q)
            elif not pending and 0x80 <= b < 0xC0:
                delta[s, b] = s  # continuation byte of a character already classified
            else:  # a non-whitespace character starts here (or started at ``pending``)
                emit[s, b] = 1 if flag == 0 else 0
                delta[s, b] = 1
    return WordTracker(delta, emit, tuple(prefixes))


def char_count(data: bytes) -> int:
    """Characters in valid UTF-8 ``data`` (bytes that are not continuation bytes)."""
    return sum(1 for b in data if not 0x80 <= b < 0xC0)


# --------------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------------


Interval = tuple[int, int]
EVERYTHING: tuple[Interval, ...] = ((0, INF),)


def intersect_intervals(a, b) -> tuple[Interval, ...]:
    out = [(max(x, u), min(y, v)) for x, y in a for u, v in b if max(x, u) <= min(y, v)]
    return tuple(sorted(out))


@dataclass(frozen=True)
class Bounds:
    """Per counter, the allowed values of the hole's value count: disjoint sorted closed intervals
    (``hi = INF``: unbounded above); ``()`` allows nothing."""

    sets: tuple[tuple[Interval, ...], ...] = (EVERYTHING, EVERYTHING, EVERYTHING)

    def with_set(self, counter: int, intervals) -> "Bounds":
        sets = list(self.sets)
        sets[counter] = intersect_intervals(sets[counter], tuple(intervals))
        return Bounds(tuple(sets))

    def with_bound(self, counter: int, lo: int, hi: int) -> "Bounds":
        return self.with_set(counter, ((lo, hi),))

    def active(self, counter: int) -> bool:
        return self.sets[counter] != EVERYTHING

    @property
    def lo(self) -> tuple[int, ...]:
        """Least allowed value per counter (``INF`` when nothing is allowed)."""
        return tuple(s[0][0] if s else INF for s in self.sets)

    @property
    def hi(self) -> tuple[int, ...]:
        """Greatest allowed value per counter (``-1`` when nothing is allowed)."""
        return tuple(s[-1][1] if s else -1 for s in self.sets)

    @property
    def fixed_tokens(self) -> int | None:
        """``N`` when exactly ``N`` tokens are allowed (a fixed-length hole)."""
        t = self.sets[TOKENS]
        return t[0][0] if len(t) == 1 and t[0][0] == t[0][1] else None

    @property
    def empty_counter(self) -> int | None:
        for k in range(3):
            if not self.sets[k]:
                return k
        return None


# --------------------------------------------------------------------------------------------------
# Host side: completability data of one hole's token automaton
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HoleCounters:
    """Counter data of one compiled hole (numpy, local state ids).

    Attributes:
        lo, hi: ``[3, K]`` the allowed intervals of the *value* counts (tokens, characters, words); unused
            slots are empty (``lo = INF, hi = -1``).
        pend: ``[S, 3]`` counts of pending terminator material per state (value = raw - pend).
        tracker: ``[S]`` word-tracker state after everything generated so far.
        rmin, rmax: ``[S, 3]`` least / greatest growth of the value count until the hole ends (``INF``:
            unbounded; an inactive counter has ``rmin = 0, rmax = INF``).
        tables: ``{counter: [S, cap + 2] int32}`` cumulative reachability counts, for counters with a
            two-sided interval: ``tables[k][s, i]`` = how many ``r < i`` are reachable growths from ``s``;
            ``cap`` = the greatest finite ``hi`` of the counter.
        fixed_len: ``N`` for a fixed-length hole (``tokens == N``, no terminator), else ``-1``.
        mintok: ``{counter: [S, lo + 1] int32}`` for characters / words with a lower bound ``lo``:
            ``mintok[k][s, a]`` = fewest tokens from ``s`` to the hole's end gaining at least ``a`` (``INF``:
            impossible). Checked against the token budget, so "at least N words within the budget" is exact.
    """

    lo: np.ndarray
    hi: np.ndarray
    pend: np.ndarray
    tracker: np.ndarray
    rmin: np.ndarray
    rmax: np.ndarray
    tables: dict
    fixed_len: int = -1
    mintok: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return int(
            self.pend.nbytes + self.tracker.nbytes + self.rmin.nbytes + self.rmax.nbytes
            + sum(t.nbytes for t in self.tables.values()) + sum(t.nbytes for t in self.mintok.values())
        )

    @property
    def active(self) -> bool:
        everything = (self.lo <= 0) & (self.hi >= INF)
        return bool(self.fixed_len >= 0 or not everything.any(axis=1).all())

    def completable(self, state: int, value: np.ndarray) -> bool:
        """Whether, with value counts ``value`` in ``state``, some completion meets every bound."""
        return bool(self.completable_many(np.array([state]), np.asarray(value)[None, :])[0])

    def completable_many(self, states: np.ndarray, values: np.ndarray, max_tokens: int | None = None) -> np.ndarray:
        """Vectorised :meth:`completable` (the host reference of the device
        :func:`lmprog.automata.counters.counter_mask`)."""
        states = np.asarray(states, np.int64)
        values = np.asarray(values, np.int64)
        hi_all = self.hi.astype(np.int64).copy()
        if max_tokens is not None:
            hi_all[TOKENS] = np.minimum(hi_all[TOKENS], max_tokens)
        budget = hi_all[TOKENS].max()
        result = np.ones(states.size, bool)
        for k in range(3):
            v = values[:, k]
            any_ok = np.zeros(states.size, bool)
            for lo, hi, hi0 in zip(self.lo[k].astype(np.int64), hi_all[k], self.hi[k]):
                ok = (v + self.rmin[states, k] <= hi) & (v + self.rmax[states, k] >= lo)
                if k in self.tables and hi0 < INF:
                    cum = self.tables[k]
                    cap = cum.shape[1] - 2
                    a = np.maximum(lo - v, 0)
                    b = np.minimum(hi - v, cap)
                    ai, bi = np.clip(a, 0, cap + 1), np.clip(b + 1, 0, cap + 1)
                    ok &= (b >= a) & (cum[states, bi] - cum[states, ai] > 0)
                if k in self.mintok:
                    mt = self.mintok[k]
                    need = np.clip(lo - v, 0, mt.shape[1] - 1)
                    ok &= values[:, TOKENS] + mt[states, need] <= budget
                any_ok |= ok
            result &= any_ok
        return result


def _transition_triples(next_state: np.ndarray, delta_value: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct ``(src, dst, d)`` over the allowed transitions (``next_state >= 0``)."""
    s, v = np.nonzero(next_state >= 0)
    dst = next_state[s, v].astype(np.int64)
    d = delta_value[s, v].astype(np.int64)
    if d.size and d.min() < 0:
        raise AssertionError("a value count decreased along a transition")
    n = next_state.shape[0]
    dmax = int(d.max()) + 1 if d.size else 1
    codes = np.unique((s.astype(np.int64) * n + dst) * dmax + d)
    return codes // dmax // n, codes // dmax % n, codes % dmax


def _min_growth(n: int, src, dst, d, base: np.ndarray) -> np.ndarray:
    dist = np.where(base, 0, INF).astype(np.int64)
    for _ in range(n + 1):
        new = dist.copy()
        np.minimum.at(new, src, np.minimum(d + dist[dst], INF))
        if np.array_equal(new, dist):
            break
        dist = new
    return dist


def _max_growth(n: int, src, dst, d, base: np.ndarray) -> np.ndarray:
    """Longest growth to a base state (Bellman-Ford); ``INF`` for states that reach a cycle that grows.

    Every state reaches a base state (the automaton is trimmed), so after ``n`` rounds all values are set
    and exact unless a growing cycle is reachable; an edge still relaxable in round ``n + 1`` lies on a path
    into such a cycle, and every state that can reach it is unbounded."""
    from lmprog.compiler.bytedfa import bfs_reach

    best = np.where(base, 0, -1).astype(np.int64)
    for i in range(n + 1):
        cand = np.where(best[dst] >= 0, d + best[dst], -1)
        new = best.copy()
        np.maximum.at(new, src, cand)
        if np.array_equal(new, best):
            return np.minimum(best, INF)
        if i == n:
            grow = np.unique(src[cand > best[src]])
            unbounded = bfs_reach(n, dst, src, grow)
            new[unbounded] = INF
            return np.minimum(new, INF)
        best = new
    return np.minimum(best, INF)


def _reach_table(n: int, src, dst, d, base: np.ndarray, cap: int) -> np.ndarray:
    """``[n, cap + 1] bool``: growth ``r`` of the value count is achievable on some path to the end."""
    reach = np.zeros((n, cap + 1), bool)
    zero = d == 0
    zs, zt = src[zero], dst[zero]
    ps, pt, pd = src[~zero], dst[~zero], d[~zero]
    for r in range(cap + 1):
        cur = base.copy() if r == 0 else np.zeros(n, bool)
        m = pd <= r
        if m.any():
            hit = reach[pt[m], r - pd[m]]
            cur[ps[m][hit]] = True
        while zs.size:
            add = zs[cur[zt] & ~cur[zs]]
            if add.size == 0:
                break
            cur[add] = True
        reach[:, r] = cur
    return reach


def _min_tokens_table(n: int, src, dst, d, base: np.ndarray, lo: int) -> np.ndarray:
    """``[n, lo + 1]``: fewest tokens (edges) from each state to a base state gaining at least ``a``."""
    mt = np.full((n, lo + 1), INF, np.int64)
    for a in range(lo + 1):
        col = np.where(base & (a == 0), 0, INF).astype(np.int64)
        need = np.maximum(a - d, 0)
        earlier = need < a  # reads a finished column
        fixed = np.where(earlier, 1 + mt[dst, need], INF)
        same = ~earlier
        for _ in range(n + 1):
            cand = np.minimum(fixed, np.where(same, 1 + col[dst], INF))
            new = col.copy()
            np.minimum.at(new, src, np.minimum(cand, INF))
            if np.array_equal(new, col):
                break
            col = new
        mt[:, a] = col
    return np.minimum(mt, INF).astype(np.int32)


def analyse_counters(
    class_table: np.ndarray,
    token_class: np.ndarray,
    base: np.ndarray,
    pend: np.ndarray,
    tracker: np.ndarray,
    bounds: Bounds,
    inc_chars: np.ndarray,
    inc_words: np.ndarray,
    words_id: np.ndarray,
    fixed_len: int = -1,
) -> HoleCounters:
    """Completability data for a token automaton (local ``class_table [S, C]`` over ``token_class [V]``).

    ``base[s]``: the hole can end in ``s`` (final states; for a fixed-length hole, accepting states)."""
    n = class_table.shape[0]
    width = max(len(x) for x in bounds.sets) or 1
    lo = np.full((3, width), INF, np.int32)
    hi = np.full((3, width), -1, np.int32)
    for k, intervals in enumerate(bounds.sets):
        for j, (a, b) in enumerate(intervals):
            lo[k, j], hi[k, j] = a, b
    rmin = np.zeros((n, 3), np.int32)
    rmax = np.full((n, 3), INF, np.int32)
    tables: dict[int, np.ndarray] = {}
    mintok: dict[int, np.ndarray] = {}
    for k in range(3):
        if k != TOKENS and not bounds.active(k):
            continue
        intervals = bounds.sets[k]
        # Tokens that agree on (class, increment) are one column here.
        if k == TOKENS:
            keys = token_class.astype(np.int64)
        elif k == CHARS:
            keys = token_class.astype(np.int64) * (int(inc_chars.max()) + 1) + inc_chars
        else:
            keys = token_class.astype(np.int64) * (int(words_id.max()) + 1) + words_id
        _, reps = np.unique(keys, return_index=True)
        next_state = class_table[:, token_class[reps]]
        if k == TOKENS:
            inc = np.ones_like(next_state)
        elif k == CHARS:
            inc = np.broadcast_to(inc_chars[reps][None, :], next_state.shape)
        else:
            inc = inc_words[tracker][:, reps].astype(np.int32)
        growth = inc + pend[:, k][:, None] - pend[np.maximum(next_state, 0), k]
        src, dst, d = _transition_triples(next_state, growth)
        rmin[:, k] = _min_growth(n, src, dst, d, base)
        lows = [a for a, _ in intervals if a > 0]
        if lows:
            rmax[:, k] = _max_growth(n, src, dst, d, base)
            if k != TOKENS:
                mintok[k] = _min_tokens_table(n, src, dst, d, base, max(lows))
        if any(a > 0 and b < INF for a, b in intervals):
            cap = max(b for _, b in intervals if b < INF)
            reach = _reach_table(n, src, dst, d, base, cap)
            cum = np.zeros((n, reach.shape[1] + 1), np.int32)
            np.cumsum(reach, axis=1, out=cum[:, 1:])
            tables[k] = cum
    return HoleCounters(lo, hi, pend.astype(np.int32), tracker.astype(np.int32), rmin, rmax, tables, fixed_len,
                        mintok)
