"""Byte-level DFAs: the language of a hole's constraints, before it meets a vocabulary.

A :class:`ByteDFA` is a deterministic automaton over the 256 byte values: ``delta[s, b]`` is the state after
byte ``b`` (``-1`` = dead: no string with this prefix is in the language), ``accept[s]`` says the bytes read so
far form a string of the language, and the start state is always ``0``. Every constraint kind compiles to one
(regexes through :func:`regex_dfa`, fixed strings through a trie), and the boolean operators (``and``, ``or``,
``not``) are product / complement constructions on them. Languages are sets of *valid UTF-8* byte strings
(hole values are text): regexes and literals only produce valid UTF-8 and the complement is taken relative to
the valid UTF-8 strings.

Regexes: the pattern's structure (concatenation, alternation, repetition) is compiled with bounds by
:mod:`lmprog.compiler.regex_compile` (outlines-core's whole-pattern build also determinizes the unanchored
search, exponential for ``a?[a-z]{40}``, and cannot be counted or stopped), and each character item by
outlines-core (Rust ``regex-automata``: Unicode classes and case folding are Rust's): an outlines-core ``Index``
over a vocabulary of the 256 single bytes, with the byte DFA read off its transition map. That pattern is
wrapped as ``(?:R)\\x00\\z`` and a state ``q`` accepts iff reading the sentinel ``\\x00`` from ``q`` reaches
an outlines-core final state. The wrapping matters for exactness, because outlines-core's own index is built
with leftmost-first match semantics and drops transitions out of match states (``a|ab`` does not accept
``ab``, ``a(bx)?`` does not allow ``b`` after ``a``): with the sentinel and ``\\z`` no state is a match state
before the very end, so every transition survives, and ``(?:R)`` can match the empty string without losing the
anchored start state. A state reached through the sentinel in a way ``R`` does not allow is dead for ``R``
and is removed by :meth:`ByteDFA.trim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmprog.compiler.regex_compile import MAX_DFA_STATES, RegexError, RegexLimitError, bounded_regex_dfa, limit_reason

DEAD = -1


# --------------------------------------------------------------------------------------------------
# Graph helpers (vectorised BFS over edge lists)
# --------------------------------------------------------------------------------------------------


def _csr(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(src, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, src + 1, 1)
    return np.cumsum(indptr), dst[order]


def gather_ranges(indptr: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Concatenated ``range(indptr[v], indptr[v + 1])`` for ``v`` in ``nodes``."""
    starts, ends = indptr[nodes], indptr[nodes + 1]
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.cumsum(lens) + lens, lens)
    return offsets + np.arange(total)


def bfs_reach(n: int, src: np.ndarray, dst: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """``[n] bool``: the nodes reachable from ``sources`` along edges ``src -> dst``."""
    indptr, targets = _csr(n, np.asarray(src, np.int64), np.asarray(dst, np.int64))
    seen = np.zeros(n, dtype=bool)
    frontier = np.unique(np.asarray(sources, np.int64))
    seen[frontier] = True
    while frontier.size:
        nxt = np.unique(targets[gather_ranges(indptr, frontier)])
        frontier = nxt[~seen[nxt]]
        seen[frontier] = True
    return seen


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each ``uint64``: well-spread odd multipliers for the hashes below (fixed: deterministic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def distinct_columns(table: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of each distinct column of ``table`` (``[n, k]`` ints): what
    ``np.unique(table, axis=1, return_index=True)[1]`` gives, sorted, by a hash of each column checked exactly
    (a collision falls back to ``np.unique``)."""
    n, k = table.shape
    if k <= 1 or n == 0:
        return np.arange(min(k, 1) if n == 0 else k, dtype=np.int64)
    weights = (_mix(np.arange(n)) >> np.uint64(11)).astype(np.float64) / float(1 << 53) + 1.0  # in [1, 2)
    h = np.einsum("ij,i->j", table.astype(np.float64), weights)  # (a float hash, checked exactly below)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    if np.array_equal(np.take(table, first[inverse.reshape(-1)], axis=1), table):
        return np.sort(first).astype(np.int64)
    return np.sort(np.unique(table, axis=1, return_index=True)[1]).astype(np.int64)  # (a collision)


def dfa_edges(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``(src, dst)`` pairs of a transition table with ``-1`` for missing transitions."""
    n = delta.shape[0]
    if delta.shape[1] > 8:  # equal columns give equal edges
        delta = delta[:, distinct_columns(delta)]
    src = np.repeat(np.arange(n, dtype=np.int64), delta.shape[1])
    dst = delta.reshape(-1).astype(np.int64)
    ok = dst >= 0
    codes = np.unique(src[ok] * (n + 1) + dst[ok])
    return codes // (n + 1), codes % (n + 1)


def useful_states(delta: np.ndarray, start: int, targets: np.ndarray) -> np.ndarray:
    """``[n] bool``: states reachable from ``start`` from which a ``targets`` state is reachable."""
    n = delta.shape[0]
    src, dst = dfa_edges(delta)
    fwd = bfs_reach(n, src, dst, np.array([start]))
    back = bfs_reach(n, dst, src, np.flatnonzero(targets))
    return fwd & back


# --------------------------------------------------------------------------------------------------
# The DFA
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ByteDFA:
    """A DFA over bytes with start state 0.

    Attributes:
        delta: ``[n, 256] int32``; ``-1`` where the byte leads nowhere.
        accept: ``[n] bool``.
    """

    delta: np.ndarray
    accept: np.ndarray

    @property
    def num_states(self) -> int:
        return int(self.delta.shape[0])

    # -- construction -------------------------------------------------------------------------------

    @staticmethod
    def empty() -> "ByteDFA":
        return ByteDFA(np.full((1, 256), DEAD, np.int32), np.zeros(1, bool))

    @staticmethod
    def from_strings(items) -> "ByteDFA":
        """The finite language ``items`` (bytes or str), as a minimal DFA (a trie, then minimised)."""
        rows: list[np.ndarray] = [np.full(256, DEAD, np.int32)]
        accept = [False]
        for item in items:
            data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            s = 0
            for b in data:
                if rows[s][b] < 0:
                    rows[s][b] = len(rows)
                    rows.append(np.full(256, DEAD, np.int32))
                    accept.append(False)
                s = int(rows[s][b])
            accept[s] = True
        return ByteDFA(np.stack(rows), np.array(accept, bool)).minimize()

    @staticmethod
    def from_regex(pattern: str) -> "ByteDFA":
        """The strings that fully match ``pattern`` (Rust ``regex`` syntax), via outlines-core."""
        return regex_dfa(pattern)

    @staticmethod
    def any_utf8() -> "ByteDFA":
        """Every valid UTF-8 string."""
        return regex_dfa(r"(?s:.)*")

    # -- queries ------------------------------------------------------------------------------------

    def walk(self, data: bytes, state: int = 0) -> int:
        for b in data:
            if state < 0:
                return DEAD
            state = int(self.delta[state, b])
        return state

    def accepts(self, data: bytes | str) -> bool:
        if isinstance(data, str):
            data = data.encode("utf-8")
        s = self.walk(data)
        return s >= 0 and bool(self.accept[s])

    def is_prefix(self, data: bytes | str) -> bool:
        """Whether ``data`` extends to a string of the language (the DFA must be trimmed)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return self.walk(data) >= 0 and not self.is_empty

    @property
    def is_empty(self) -> bool:
        return not bool(useful_states(self.delta, 0, self.accept)[0])

    # -- normal forms -------------------------------------------------------------------------------

    def trim(self) -> "ByteDFA":
        """Keep only states reachable from the start that can still reach an accepting state."""
        keep = useful_states(self.delta, 0, self.accept)
        if not keep[0]:
            return ByteDFA.empty()
        return _restrict(self.delta, self.accept, keep)[0]

    def minimize(self, labels: np.ndarray | None = None) -> "ByteDFA":
        """Trim, then merge equivalent states (Moore's partition refinement); states are renumbered in
        breadth-first order from the start. ``labels`` (``[n]`` or ``[n, k]`` ints) keep states with
        different labels apart; use :func:`minimize_labelled` to get the labels of the result back."""
        return minimize_labelled(self, labels)[0]

    # -- boolean operations -------------------------------------------------------------------------

    def intersect(self, other: "ByteDFA") -> "ByteDFA":
        return product(self, other, "and")[0].minimize()

    def union(self, other: "ByteDFA") -> "ByteDFA":
        return product(self, other, "or")[0].minimize()

    def complement(self) -> "ByteDFA":
        """The valid UTF-8 strings *not* in the language."""
        n = self.num_states
        delta = np.where(self.delta >= 0, self.delta, n).astype(np.int32)
        delta = np.vstack([delta, np.full((1, 256), n, np.int32)])
        accept = np.concatenate([~self.accept, [True]])
        return ByteDFA(delta, accept).intersect(ByteDFA.any_utf8())


def _restrict(delta: np.ndarray, accept: np.ndarray, keep: np.ndarray) -> tuple[ByteDFA, np.ndarray]:
    """Sub-DFA on the ``keep`` states (state 0 kept first); returns it and the old ids of its states."""
    old = np.flatnonzero(keep)
    new_id = np.full(delta.shape[0] + 1, DEAD, np.int32)
    new_id[old] = np.arange(old.size, dtype=np.int32)
    sub = delta[old]
    sub = np.where(sub >= 0, new_id[np.where(sub >= 0, sub, delta.shape[0])], DEAD).astype(np.int32)
    return ByteDFA(sub, accept[old].copy()), old


def minimize_labelled(dfa: ByteDFA, labels: np.ndarray | None = None) -> tuple[ByteDFA, np.ndarray | None]:
    """Minimise ``dfa`` keeping apart states with different ``labels``; returns the DFA and its labels."""
    keep = useful_states(dfa.delta, 0, dfa.accept)
    if not keep[0]:
        empty = ByteDFA.empty()
        return empty, (None if labels is None else np.zeros((1,) + np.shape(labels)[1:], np.int64))
    trimmed, old = _restrict(dfa.delta, dfa.accept, keep)
    n = trimmed.num_states
    lab = np.zeros((n, 0), np.int64) if labels is None else np.asarray(labels, np.int64).reshape(len(keep), -1)[old]
    init = np.concatenate([trimmed.accept[:, None].astype(np.int64), lab], axis=1)
    _, cls = np.unique(init, axis=0, return_inverse=True)
    cls = cls.reshape(-1).astype(np.int64)
    count = int(cls.max()) + 1
    # Bytes with equal columns behave alike in every round: refine on one column per byte class (a handful,
    # not 256), which is what keeps a long chain like `.{400,}` (hundreds of rounds) fast.
    reduced = trimmed.delta[:, distinct_columns(trimmed.delta)]
    cls = _moore(reduced, cls)
    count = int(cls.max()) + 1
    # Quotient, then renumber breadth-first from the start so the result is canonical.
    rep = np.zeros(count, np.int64)
    rep[cls[::-1]] = np.arange(n)[::-1]  # first state of each class
    qdelta = trimmed.delta[rep]
    qdelta = np.where(qdelta >= 0, cls[np.maximum(qdelta, 0)], DEAD)
    order = _bfs_order(qdelta, int(cls[0]))
    new_id = np.full(count, DEAD, np.int64)
    new_id[order] = np.arange(order.size)
    out = qdelta[order]
    out = np.where(out >= 0, new_id[np.maximum(out, 0)], DEAD).astype(np.int32)
    result = ByteDFA(out, trimmed.accept[rep][order].copy())
    return result, (None if labels is None else lab[rep][order])


def _moore(reduced: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Moore's partition refinement, every state every round, until no class splits: the coarsest partition
    refining ``cls`` that is stable under ``reduced`` (``[n, k]``, ``-1`` dead)."""
    count = int(cls.max()) + 1
    while True:
        succ = np.where(reduced >= 0, cls[np.maximum(reduced, 0)], -1)
        new = _row_classes(np.concatenate([cls[:, None], succ], axis=1))
        new_count = int(new.max()) + 1
        cls = new
        if new_count == count:
            return cls
        count = new_count


def _row_classes(rows: np.ndarray) -> np.ndarray:
    """Class id per row, equal rows <-> equal ids (hash, verified; exact fallback on a collision)."""
    h = np.zeros(rows.shape[0], np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for col in rows.T:
            h = h * mult + (col + 2).astype(np.uint64)
            h ^= h >> np.uint64(29)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if np.array_equal(rows[first[inverse]], rows):
        return inverse.astype(np.int64)
    _, inverse = np.unique(rows, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def _bfs_order(delta: np.ndarray, start: int) -> np.ndarray:
    """The states reachable from ``start`` in breadth-first order, each state's successors in byte order (a
    FIFO queue scanning each row left to right), computed a level at a time: the next level is the states first
    met when scanning the current level's rows in order."""
    n = delta.shape[0]
    seen = np.zeros(n, bool)
    seen[start] = True
    frontier = np.array([start], np.int64)
    levels = [frontier]
    while frontier.size:
        targets = delta[frontier].reshape(-1)
        targets = targets[targets >= 0]
        targets = targets[~seen[targets]]
        if not targets.size:
            break
        _, first = np.unique(targets, return_index=True)
        frontier = targets[np.sort(first)].astype(np.int64)
        seen[frontier] = True
        levels.append(frontier)
    return np.concatenate(levels)


def product(a: ByteDFA, b: ByteDFA, mode: str = "and") -> tuple[ByteDFA, np.ndarray, np.ndarray]:
    """Reachable product of two DFAs (``mode`` ``"and"``: intersection, ``"or"``: union).

    Returns the product DFA (not minimised) and, per product state, the component states (``-1`` for a
    component that is dead, possible only with ``"or"``). Raises
    :class:`~lmprog.compiler.regex_compile.RegexLimitError` when the product would have more than
    ``MAX_DFA_STATES`` states (counted as they are created)."""
    if mode not in ("and", "or"):
        raise ValueError(mode)
    na, nb = a.num_states, b.num_states
    # Complete both with a sink so "or" can track a dead side.
    da = np.vstack([np.where(a.delta >= 0, a.delta, na), np.full((1, 256), na)]).astype(np.int64)
    db = np.vstack([np.where(b.delta >= 0, b.delta, nb), np.full((1, 256), nb)]).astype(np.int64)
    acc_a = np.concatenate([a.accept, [False]])
    acc_b = np.concatenate([b.accept, [False]])
    width = nb + 1
    ids: dict[int, int] = {0: 0}
    codes = [0]
    rows: list[np.ndarray] = []
    i = 0
    while i < len(codes):
        code = codes[i]
        sa, sb = divmod(code, width)
        ta, tb = da[sa], db[sb]
        if mode == "and":
            live = (ta < na) & (tb < nb)
        else:
            live = (ta < na) | (tb < nb)
        nxt = ta * width + tb
        row = np.full(256, DEAD, np.int64)
        for c in np.unique(nxt[live]).tolist():
            j = ids.get(c)
            if j is None:
                if len(codes) >= MAX_DFA_STATES:
                    raise RegexLimitError("product", limit_reason("product"))
                j = ids[c] = len(codes)
                codes.append(c)
            row[nxt == c] = j
        row[~live] = DEAD
        rows.append(row)
        i += 1
    comp = np.array(codes, np.int64)
    ca, cb = comp // width, comp % width
    if mode == "and":
        accept = acc_a[ca] & acc_b[cb]
    else:
        accept = acc_a[ca] | acc_b[cb]
    ca = np.where(ca < na, ca, DEAD)
    cb = np.where(cb < nb, cb, DEAD)
    return ByteDFA(np.stack(rows).astype(np.int32), accept), ca, cb


# --------------------------------------------------------------------------------------------------
# Regexes through outlines-core
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_vocabulary():
    from outlines_core import Vocabulary

    # Token id b is the single byte b; 256 is an EOS id outlines-core requires (unused here).
    return Vocabulary(256, {bytes([b]): [b] for b in range(256)})


def strip_anchors(pattern: str) -> str:
    """Holes are matched in full, so a leading ``^``/``\\A`` and a trailing ``$``/``\\z`` are redundant; they
    are removed because an anchor at the start prevents outlines-core from building an anchored DFA."""
    p = pattern
    if p.startswith("^"):
        p = p[1:]
    elif p.startswith("\\A"):
        p = p[2:]
    for tail in ("$", "\\z", "\\Z"):
        if p.endswith(tail):
            head = p[: -len(tail)]
            slashes = len(head) - len(head.rstrip("\\"))
            if slashes % 2 == 0:
                p = head
                break
    return p


def regex_dfa(pattern: str, minimal: bool = True) -> ByteDFA:
    """The byte DFA of the strings that fully match ``pattern`` (Rust ``regex`` syntax): the one door through
    which regexes become automata, for the constraint compiler and the checks alike.

    ``minimal=True`` (what the compiler uses): trimmed and minimised, canonical. ``minimal=False``: the same
    language, read off outlines-core's index as it is (neither trimmed nor minimised; every state is reachable
    from the start, so the language is empty iff no state accepts), which is much cheaper to get (minimising a
    long bounded repetition takes seconds); good for emptiness and membership (:meth:`ByteDFA.accepts`). A pattern that matches no string gives an empty DFA; one that
    outlines-core cannot compile raises :class:`RegexError` (``reason``: outlines-core's message). Both forms
    are cached per pattern.
    """
    return _minimal_regex_dfa(pattern) if minimal else _wrapped_regex_dfa(pattern)


@lru_cache(maxsize=512)
def _minimal_regex_dfa(pattern: str) -> ByteDFA:
    return _wrapped_regex_dfa(pattern).minimize()


def _wrapped_regex_dfa(pattern: str) -> ByteDFA:
    """The unminimised DFA of a pattern, built with bounds (:mod:`lmprog.compiler.regex_compile`); a pattern
    Python's parser rejects (Rust-only syntax, internal patterns) goes to outlines-core whole. Failures are
    cached like results, so a pattern past a bound costs its build once."""
    result = _cached_build(pattern)
    if isinstance(result, BaseException):
        raise result
    return result


@lru_cache(maxsize=128)
def _cached_build(pattern: str):
    try:
        built = bounded_regex_dfa(strip_anchors(pattern), _atom_dfa)
        return outlines_regex_dfa(pattern) if built is None else ByteDFA(*built)
    except RegexError as e:
        return e


@lru_cache(maxsize=4096)
def _atom_dfa(source: str) -> ByteDFA:
    """The minimal byte DFA of one character item (a Rust regex matching single characters), by outlines-core."""
    return outlines_regex_dfa(source).minimize()


def outlines_regex_dfa(pattern: str) -> ByteDFA:
    """The byte DFA of ``pattern`` read off an outlines-core index, unminimised (no bounds: its build runs in
    Rust; used for single characters, and for whole patterns only in Rust-only syntax)."""
    from outlines_core import Index

    core = strip_anchors(pattern)
    try:
        index = Index(f"(?:{core})\\x00\\z", _byte_vocabulary())
    except (ValueError, RuntimeError, TypeError) as e:
        message = str(e)
        if "no transitions" in message:  # the pattern matches nothing at all
            return ByteDFA.empty()
        if "universal start state" in message:
            message = "anchors or word boundaries (^, \\b, lookaround) are not supported inside a pattern"
        raise RegexError(f"cannot compile regex {pattern!r}: {message}", reason=message) from None
    transitions = index.get_transitions()
    finals = index.get_final_states()
    init = index.get_initial_state()
    # Breadth-first from the start (so every state is reachable and the start is 0), one pass over the edges.
    order = [init]
    ids = {init: 0}
    src: list[int] = []
    byte: list[int] = []
    dst: list[int] = []
    accept_list: list[bool] = []
    i = 0
    while i < len(order):
        row = transitions.get(order[i], {})
        for tok, nxt in row.items():
            if tok < 256:
                j = ids.get(nxt)
                if j is None:
                    j = ids[nxt] = len(order)
                    order.append(nxt)
                src.append(i)
                byte.append(tok)
                dst.append(j)
        sentinel = row.get(0)
        accept_list.append(sentinel is not None and sentinel in finals)
        i += 1
    delta = np.full((len(order), 256), DEAD, np.int32)
    delta[np.asarray(src, np.int64), np.asarray(byte, np.int64)] = np.asarray(dst, np.int32)
    return ByteDFA(delta, np.array(accept_list, bool))


def escape_regex(text: str) -> str:
    """``text`` as a Rust-regex literal (every ASCII non-alphanumeric as ``\\x{..}``)."""
    out = []
    for ch in text:
        if ch.isascii() and not ch.isalnum():
            out.append(f"\\x{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return "".join(out)


def regex_fullmatch(pattern: str, text: str) -> bool:
    """Whether ``text`` matches the whole of ``pattern``, by walking its byte DFA: linear in the text, never
    backtracking (``(((a+)+)+)+b`` on ``"a" * 30`` is instant), with the constraint regex semantics. Raises
    :class:`RegexError` (a :class:`~lmprog.compiler.regex_compile.RegexLimitError` past the automaton bounds)
    when the pattern has no automaton. For run-time ``matches`` on host strings."""
    return regex_dfa(pattern, minimal=False).accepts(text.encode("utf-8", "surrogatepass"))
