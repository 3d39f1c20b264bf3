"""Token automata, host side: one hole's constraint as a numpy automaton over token ids, and the builders that
stack the automata of a run into one :class:`~lmprog.automata.table.TokenTable` (the device runtime the
kernels call, :mod:`lmprog.automata`).

A constraint on a hole is a deterministic automaton over *token ids*: from state ``s`` token ``v`` is
allowed iff ``next_state[s, v] >= 0``, and then the automaton moves to ``next_state[s, v]``. A state is
``final`` when the hole is complete there (its terminator has been produced). The whole constraint
state of a particle is one int32 (plus, for holes with ``tokens``/``len``/``words`` bounds, a ``[3]`` vector
of raw counts: :mod:`lmprog.automata.counters`, built by :mod:`lmprog.compiler.counters`).

Storage (token classes). Tokens that behave the same in every state of an automaton form a *class*; an
automaton is stored as ``token_class [V]`` (the class of each token) and a ``[S, C]`` table over classes. A
regex over digits has a few dozen classes, so a 49k vocabulary costs ``4 V`` bytes plus ``4 S C`` instead
of ``4 S V``; an automaton whose columns are all different is the dense layout (``C = V``). :func:`stack_holes`
puts every automaton's states at an offset in one table of *global* states (see :mod:`lmprog.automata.table`);
holes with the same compiled constraint (a loop's unrolled holes) share one block (:func:`constraint_key`).
"""

from __future__ import annotations

from typing import Hashable, NamedTuple, Protocol, Sequence

import numpy as np

from lmprog.automata.counters import INF, CounterArrays
from lmprog.automata.table import DISALLOWED, TokenTable
from lmprog.backends.jax_setup import to_device
from lmprog.compiler.counters import HoleCounters, word_tracker

#: Device bytes per state in a TokenTable besides its transition row: auto_of, row_base, final, pending,
#: and the counter arrays (pend, tracker, lo, hi, rmin, rmax, tab_off, tab_cap, mt_off, mt_cap, fixed_len, active).
PER_STATE_BYTES = 4 + 4 + 1 + 4 + 12 + 4 + 12 * 8 + 4 + 1  # (lo/hi counted for one interval per counter)
#: ... and per token class: its character count (int32) and word starts per word-tracker state (int8).
PER_CLASS_BYTES = 4 + word_tracker().num_states


class Automaton(NamedTuple):
    """One constraint, host side (numpy), with local state ids ``0 .. S-1``.

    Attributes:
        next_state: ``[S, V] int32``; ``-1`` where the token is not allowed. When ``token_class`` is given,
            ``[S, C]`` over token classes instead: token ``v`` goes to ``next_state[s, token_class[v]]``.
        final: ``[S] bool``; the hole is complete in this state.
        start: the initial state.
        token_class: ``[V] int32`` class of each token, or ``None`` (columns are tokens).
    """

    next_state: np.ndarray
    final: np.ndarray
    start: int = 0
    token_class: np.ndarray | None = None

    @property
    def num_states(self) -> int:
        return int(self.next_state.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.next_state.shape[1] if self.token_class is None else self.token_class.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.next_state.shape[1])

    def dense(self) -> np.ndarray:
        """``[S, V] int32`` transition table over tokens."""
        if self.token_class is None:
            return np.asarray(self.next_state, np.int32)
        return np.asarray(self.next_state, np.int32)[:, self.token_class]

    def step(self, state: int, token: int) -> int:
        """Host-side transition (``-1``: not allowed)."""
        if state < 0:
            return DISALLOWED
        col = token if self.token_class is None else int(self.token_class[token])
        return int(self.next_state[state, col])

    def allowed_tokens(self, state: int) -> np.ndarray:
        """Host-side reference mask ``[V] bool``."""
        row = np.asarray(self.next_state[state])
        return (row >= 0) if self.token_class is None else (row[self.token_class] >= 0)

    @property
    def nbytes(self) -> int:
        """Bytes this automaton takes in a :class:`TokenTable` (class map + class table + per-state arrays)."""
        return int(self.vocab_size * 4 + self.num_states * self.num_classes * 4 + self.num_states * PER_STATE_BYTES
                   + self.num_classes * PER_CLASS_BYTES)


def path_lengths(next_state: np.ndarray, final: np.ndarray, start: int = 0) -> int | None:
    """The lengths, in tokens, of the paths from ``start`` that end at their first final state, as a bit set
    (bit ``l`` set: some such path has ``l`` transitions), or ``None`` when they are unbounded.

    ``next_state`` is ``[S, C]`` over token classes (or tokens: a column per token); every allowed column is a
    token, so a path's length is the number of tokens (decode steps) it takes. A hole ends on entering a final
    state, so the transitions out of final states are ignored; only states reachable from ``start`` that can
    still reach a final state count (a path into a dead end is not a way to end the hole). ``None``: a cycle
    among those states (an open language: paths of every length)."""
    from lmprog.compiler.bytedfa import bfs_reach

    table = np.asarray(next_state)
    final = np.asarray(final, bool)
    n = table.shape[0]
    src, col = np.nonzero(table >= 0)
    dst = table[src, col].astype(np.int64)
    src = src.astype(np.int64)
    live = ~final[src]  # the hole has ended in a final state
    codes = np.unique(src[live] * n + dst[live])
    src, dst = codes // n, codes % n
    useful = bfs_reach(n, src, dst, np.array([start])) & bfs_reach(n, dst, src, np.flatnonzero(final))
    if not useful[start]:
        return 0
    keep = useful[src] & useful[dst]
    src, dst = src[keep], dst[keep]
    # Kahn's algorithm on the useful part: a cycle leaves states unordered.
    nodes = np.flatnonzero(useful)
    outdeg = np.bincount(src, minlength=n)
    order = np.argsort(src, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))])
    succ = dst[order]
    preds_order = np.argsort(dst, kind="stable")
    pindptr = np.concatenate([[0], np.cumsum(np.bincount(dst, minlength=n))])
    pred = src[preds_order]
    left = outdeg.copy()
    stack = [int(s) for s in nodes if left[s] == 0]  # sinks of the useful part: final states
    done = 0
    bits: dict[int, int] = {}
    while stack:
        s = stack.pop()
        done += 1
        if final[s]:
            bits[s] = 1
        else:
            acc = 0
            for t in succ[indptr[s] : indptr[s + 1]]:
                acc |= bits[int(t)]
            bits[s] = acc << 1
        for p in pred[pindptr[s] : pindptr[s + 1]]:
            p = int(p)
            left[p] -= 1
            if left[p] == 0:
                stack.append(p)
    if done < nodes.size:
        return None
    return bits[int(start)]


def _table(automata: Sequence[Automaton], hole_counters: Sequence[HoleCounters | None], pending, incs):
    if not automata:
        raise ValueError("stack_automata needs at least one automaton")
    vocab = {a.vocab_size for a in automata}
    if len(vocab) != 1:
        raise ValueError(f"automata disagree on the vocabulary size: {sorted(vocab)}")
    (v,) = vocab
    offsets, classes, trans, row_base, auto_of, finals, reps = [], [], [], [], [], [], []
    total = flat = 0
    for i, a in enumerate(automata):
        offsets.append(total)
        table = np.asarray(a.next_state, np.int32)
        cls = np.arange(v, dtype=np.int32) if a.token_class is None else np.asarray(a.token_class, np.int32)
        classes.append(cls)
        _, first = np.unique(cls, return_index=True)  # a token of each class (classes are 0 .. C-1)
        reps.append(first)
        trans.append(np.where(table >= 0, table + total, DISALLOWED).astype(np.int32).reshape(-1))
        row_base.append(flat + np.arange(a.num_states, dtype=np.int64) * table.shape[1])
        auto_of.append(np.full(a.num_states, i, np.int32))
        finals.append(np.asarray(a.final, bool))
        total += a.num_states
        flat += table.size
    if flat >= 2**31:
        raise ValueError("token table too large for int32 offsets")

    s = total
    width = max([hc.lo.shape[1] for hc in hole_counters if hc is not None] or [1])
    pend = np.zeros((s, 3), np.int32)
    tracker = np.zeros(s, np.int32)
    lo = np.full((s, 3, width), INF, np.int32)  # empty interval slots
    hi = np.full((s, 3, width), -1, np.int32)
    lo[:, :, 0], hi[:, :, 0] = 0, INF  # no bound: [0, INF)
    rmin = np.zeros((s, 3), np.int32)
    rmax = np.full((s, 3), INF, np.int32)
    tab_off = np.full((s, 3), -1, np.int32)
    tab_cap = np.zeros((s, 3), np.int32)
    mt_off = np.full((s, 3), -1, np.int32)
    mt_cap = np.zeros((s, 3), np.int32)
    fixed = np.full(s, -1, np.int32)
    active = np.zeros(s, bool)
    cums, cum_len = [np.zeros(1, np.int32)], 1
    for a, off, hc in zip(automata, offsets, hole_counters):
        if hc is None:
            continue
        sl = slice(off, off + a.num_states)
        pend[sl], tracker[sl] = hc.pend, hc.tracker
        lo[sl], hi[sl] = INF, -1
        lo[sl, :, : hc.lo.shape[1]], hi[sl, :, : hc.hi.shape[1]] = hc.lo[None], hc.hi[None]
        rmin[sl], rmax[sl] = hc.rmin, hc.rmax
        fixed[sl] = hc.fixed_len
        active[sl] = hc.active
        for k, cum in hc.tables.items():
            width = cum.shape[1]
            tab_off[sl, k] = cum_len + np.arange(a.num_states) * width
            tab_cap[sl, k] = width - 2
            cums.append(cum.reshape(-1))
            cum_len += cum.size
        for k, mt in hc.mintok.items():
            width = mt.shape[1]
            mt_off[sl, k] = cum_len + np.arange(a.num_states) * width
            mt_cap[sl, k] = width - 1
            cums.append(mt.reshape(-1))
            cum_len += mt.size
    inc_chars, inc_words = incs if incs is not None else (np.zeros(v, np.int32), np.zeros((1, v), np.int8))
    num_classes = np.array([a.num_classes for a in automata], np.int32)
    class_base = np.concatenate([[0], np.cumsum(num_classes)[:-1]]).astype(np.int32)
    rep = np.concatenate(reps)
    ca = CounterArrays(
        to_device(inc_chars), to_device(inc_words), to_device(inc_chars[rep]),
        to_device(np.ascontiguousarray(inc_words[:, rep].T)), to_device(pend), to_device(tracker), to_device(lo),
        to_device(hi), to_device(rmin), to_device(rmax), to_device(tab_off), to_device(tab_cap),
        to_device(np.concatenate(cums)), to_device(mt_off), to_device(mt_cap), to_device(fixed),
        to_device(active),
    )
    table = TokenTable(
        to_device(np.stack(classes)),
        to_device(np.concatenate(auto_of)),
        to_device(np.concatenate(row_base).astype(np.int32)),
        to_device(np.concatenate(trans)),
        to_device(np.concatenate(finals)),
        to_device(np.concatenate(pending).astype(np.int32)),
        to_device(class_base),
        to_device(num_classes),
        to_device(np.arange(int(num_classes.max()), dtype=np.int32)),
        ca,
    )
    return table, offsets


def stack_automata(automata: Sequence[Automaton]) -> tuple[TokenTable, list[int]]:
    """Concatenate automata into one :class:`TokenTable` (no counters).

    Returns the table and, for each automaton, the offset of its states, so that automaton ``i``'s local
    state ``s`` is global state ``offsets[i] + s`` (its start is ``offsets[i] + automata[i].start``).
    """
    pending = [np.zeros(a.num_states, np.int32) for a in automata]
    return _table(automata, [None] * len(automata), pending, None)


class StackableHole(Protocol):
    """What :func:`stack_holes` reads of a compiled hole (:class:`lmprog.compiler.constraints.CompiledHole`;
    stated here so that this module does not import that one, which imports it)."""

    automaton: Automaton
    counters: HoleCounters
    pending: np.ndarray
    tokenizer_fingerprint: str
    inc_chars: np.ndarray
    inc_words: np.ndarray


def constraint_key(hole: StackableHole) -> Hashable:
    """What makes two compiled holes' table blocks identical: the content key :func:`compile_hole` caches the
    hole under (its normalised constraints and terminator, the tokenizer's fingerprint, the compiler version;
    the automaton, counters and pending bytes are a function of it), or, for a hole without a plan, the
    identity of its arrays."""
    plan = getattr(hole, "plan", None)
    if plan is not None:
        return plan.key(hole.tokenizer_fingerprint)
    return (id(hole.automaton), id(hole.counters), id(hole.pending))


def stack_holes(holes: Sequence[StackableHole], *, share: bool = True) -> tuple[TokenTable, list[int]]:
    """Concatenate compiled holes (:func:`lmprog.compiler.constraints.compile_hole`) into one table, with
    their counters. Hole ``i`` starts at global state ``offsets[i] + holes[i].automaton.start``.

    ``share``: holes with the same compiled constraint (:func:`constraint_key`; e.g. the holes a loop unrolls
    into) get one block of states, so the table grows with the distinct constraints, not with the holes
    (their offsets are equal). Everything the table holds per state is a function of that key; what differs
    per hole (name, budget, value rule, reach, guard) lives in the hole's segment. ``share=False``: one block
    per hole (tests compare the two)."""
    if not holes:
        raise ValueError("stack_holes needs at least one hole")
    fps = {h.tokenizer_fingerprint for h in holes}
    if len(fps) != 1:
        raise ValueError("holes compiled for different tokenizers cannot share a table")
    incs = (holes[0].inc_chars, holes[0].inc_words)
    if share:
        block: dict[Hashable, int] = {}  # constraint key -> its block (in order of first use)
        which, unique = [], []
        for h in holes:
            b = block.setdefault(constraint_key(h), len(block))
            if b == len(unique):
                unique.append(h)
            which.append(b)
    else:
        which, unique = list(range(len(holes))), list(holes)
    table, offsets = _table([h.automaton for h in unique], [h.counters for h in unique],
                            [h.pending for h in unique], incs)
    return table, [offsets[b] for b in which]
