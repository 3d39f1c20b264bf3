"""Regex -> byte DFA with bounds: the construction behind :func:`lmprog.compiler.bytedfa.regex_dfa`.

Why not outlines-core for the whole pattern: its ``Index`` determinizes the *unanchored* search as well as the
anchored one, and the unanchored DFA of ``a?[a-z]{40}`` or ``[^\\n]*[^ ]{30}`` is exponential even where the
anchored one (the only one a hole needs) has a few thousand states; the build runs in Rust, where nothing can
count its states or stop it. So the structure of the pattern (concatenation, alternation, repetition) is
compiled here, into a Thompson NFA over bytes and then a DFA by subset construction, which counts the states
as it creates them and checks a deadline; the *characters* (each literal, class, ``.``, ``\\w``...) are still
compiled by outlines-core one at a time (a one-character pattern is tiny), so Unicode classes and case folding
keep Rust ``regex`` semantics exactly as before.

The pattern is parsed with Python's own regex parser (a constraint regex must be valid for both dialects,
:mod:`lmprog.compiler.check_regex`); ``\\x{HEX}`` (Rust syntax, written by :func:`bytedfa.escape_regex`) is
translated first. A pattern Python cannot parse returns ``None`` from :func:`bounded_regex_dfa` (the caller
falls back to outlines-core for the whole pattern, which only internal Rust-syntax patterns reach).

Bounds (module constants, documented in ``docs/hardening.md``): :data:`MAX_NFA_STATES` (the expanded
pattern: ``(a{1000}){1000}`` is a million copies of ``a``), :data:`MAX_DFA_STATES` (determinization:
``.*a.{20}`` needs 2^20 states, one per set of positions a following ``a`` could be at),
:data:`MAX_SUBSET_WORK` (the total size of the DFA's state sets) and :data:`MAX_BUILD_SECONDS`, all counted
while building; exceeding one raises :class:`RegexLimitError`, whose ``reason`` says which (and
:data:`LIMIT_HELP` what to write instead). :data:`MAX_HOLE_STATES` and :data:`MAX_TABLE_ENTRIES` bound the
later stages of a hole's compilation (:mod:`lmprog.compiler.constraints`, :mod:`lmprog.compiler.vocab_index`).
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Callable, Optional

import numpy as np

try:  # the private parser module is the only way to see the structure Python parsed
    import re._constants as _C
    import re._parser as _P
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _P  # type: ignore[no-redef]

#: Most NFA states a pattern may expand to (each copy of a character class is a few states).
MAX_NFA_STATES = 200_000
#: Most DFA states a regex (or a product of constraint automata) may have.
MAX_DFA_STATES = 10_000
#: Most states of a hole's byte automaton: its content DFA paired with the bytes of its terminator seen so far.
MAX_HOLE_STATES = 4 * MAX_DFA_STATES
#: Most entries (states x vocabulary) of the token table built from a hole's automaton (int32: 1 GiB).
MAX_TABLE_ENTRIES = 1 << 28
#: Most NFA states visited in all while computing the DFA's state sets (a few seconds of work, and a bound on
#: the memory the sets take).
MAX_SUBSET_WORK = 16_000_000
#: Longest time a regex's automaton may take to build, in seconds (a backstop for the state bounds).
MAX_BUILD_SECONDS = 10.0

LIMIT_HELP = ("a long bounded repetition is better written as a counter constraint: e.g. "
              "`x matches r\"[a-z]*\" and len(x) <= 40` (or `tokens(x) <= N`) instead of r\"[a-z]{0,40}\"")

_HEX_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\x\{([0-9A-Fa-f]{1,6})\}")


class RegexError(ValueError):
    """A pattern that cannot be compiled to an automaton (re-exported by :mod:`lmprog.compiler.bytedfa`).

    ``str()`` names the pattern; ``reason`` is the reason alone (what the checks report)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class RegexLimitError(RegexError):
    """Building an automaton went past a bound (``limit``: ``"nfa"``, ``"dfa"``, ``"work"``, ``"product"``,
    ``"hole"``, ``"table"`` or ``"time"``); ``reason`` says which, :data:`LIMIT_HELP` what to write instead."""

    def __init__(self, limit: str, reason: str):
        super().__init__(reason, reason=reason)
        self.limit = limit


def limit_reason(limit: str) -> str:
    """The message for a bound that was hit (what it was, and why it is there)."""
    if limit == "nfa":
        return (f"this regex is too large to compile: its repetitions expand to more than {MAX_NFA_STATES} "
                "automaton states")
    if limit == "dfa":
        return (f"this regex needs more than {MAX_DFA_STATES} automaton states (the limit on a constraint's "
                "automaton): long repetitions multiply states, exponentially when what repeats overlaps what "
                "precedes it, as in r\".*a.{20}\"")
    if limit == "work":
        return ("this regex is too complex to compile: the states of its automaton are sets of more than "
                f"{MAX_SUBSET_WORK} pattern positions in all (nested or long optional repetitions)")
    if limit == "hole":
        return (f"the hole's automaton (its constraints followed by its terminator) needs more than "
                f"{MAX_HOLE_STATES} states")
    if limit == "table":
        return (f"the hole's token table needs more than {MAX_TABLE_ENTRIES} entries (automaton states times "
                "vocabulary size)")
    if limit == "product":
        return (f"these constraints together need more than {MAX_DFA_STATES} automaton states (the limit on a "
                "constraint's automaton)")
    return f"this regex took more than {MAX_BUILD_SECONDS:g} s to compile (the limit on building an automaton)"


class Deadline:
    """A build-time budget for one construction (checked at every DFA state it creates)."""

    def __init__(self, seconds: float | None = None):
        self.end = time.monotonic() + (MAX_BUILD_SECONDS if seconds is None else seconds)

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise RegexLimitError("time", limit_reason("time"))


def python_syntax(pattern: str) -> str:
    """``pattern`` with Rust's ``\\x{HEX}`` escapes written as Python's ``\\UXXXXXXXX``."""
    return _HEX_ESCAPE.sub(lambda m: m.group(1) + "\\U%08x" % int(m.group(2), 16), pattern)


def parse(pattern: str):
    """Python's parse tree of ``pattern`` (after :func:`python_syntax`), or None if Python rejects it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _P.parse(python_syntax(pattern))
    except (re.error, RecursionError, OverflowError, ValueError, MemoryError):
        return None


def python_only_syntax(pattern: str) -> Optional[str]:
    """Why ``pattern`` uses syntax that Python's ``re`` accepts but Rust's ``regex`` does not (the
    constraint dialect is their common subset), or None: ``{,N}`` (no lower bound) and ``(?#...)`` comments."""
    i, in_class, first = 0, False, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]" or i == first  # a "]" first in a class is a literal
        elif ch == "[":
            in_class = True
            if pattern.startswith("[^", i):
                i += 1
            first = i + 1
        elif pattern.startswith("{,", i) and i > 0:
            return "a repetition {,N} without a lower bound is Python-only syntax: write {0,N}"
        elif pattern.startswith("(?#", i):
            return "(?#...) comments are Python-only syntax: remove the comment"
        i += 1
    return None


# -------------------------------------------------------------------------------------------------- atoms

_CATEGORY_RUST = {
    _C.CATEGORY_DIGIT: (r"\d", "0-9", False), _C.CATEGORY_NOT_DIGIT: (r"\D", "0-9", True),
    _C.CATEGORY_WORD: (r"\w", "0-9A-Za-z_", False), _C.CATEGORY_NOT_WORD: (r"\W", "0-9A-Za-z_", True),
    _C.CATEGORY_SPACE: (r"\s", r"\t\n\x0B\x0C\r ", False), _C.CATEGORY_NOT_SPACE: (r"\S", r"\t\n\x0B\x0C\r ", True),
}


def _char(c: int) -> str:
    return "\\x{%x}" % c


def _category(cat, ascii_only: bool) -> str:
    """A class escape in Rust syntax (as a nested class when ASCII-only, as Python's ``(?a)`` means)."""
    unicode, ascii_set, negated = _CATEGORY_RUST[cat]
    if not ascii_only:
        return unicode
    return ("[^" if negated else "[") + ascii_set + "]"


def atom_source(op, av, flags: int) -> Optional[str]:
    """One character-matching item of a parse tree as a Rust regex (None: not a character item)."""
    ascii_only = bool(flags & re.ASCII)
    if op is _C.LITERAL:
        body = _char(av)
    elif op is _C.NOT_LITERAL:
        body = "[^" + _char(av) + "]"
    elif op is _C.ANY:
        body = "(?s:.)" if flags & re.DOTALL else "."
    elif op is _C.CATEGORY:
        if av not in _CATEGORY_RUST:
            return None
        body = _category(av, ascii_only)
    elif op is _C.IN:
        parts, negate = [], False
        for iop, iav in av:
            if iop is _C.NEGATE:
                negate = True
            elif iop is _C.LITERAL:
                parts.append(_char(iav))
            elif iop is _C.RANGE:
                parts.append(_char(iav[0]) + "-" + _char(iav[1]))
            elif iop is _C.CATEGORY and iav in _CATEGORY_RUST:
                parts.append(_category(iav, ascii_only))
            else:
                return None
        body = ("[^" if negate else "[") + "".join(parts) + "]" if parts else ("(?s:.)" if negate else "[^\\x{0}-\\x{10ffff}]")
    else:
        return None
    return f"(?i:{body})" if flags & re.IGNORECASE else body


# -------------------------------------------------------------------------------------------------- NFA


class _NFA:
    """A Thompson NFA over byte classes, built state by state with a bound on the number of states."""

    def __init__(self, atoms: dict[str, list[list[tuple[int, int]]]], atom_accepts: dict[str, list[int]]):
        self.eps: list[list[int]] = []
        self.moves: list[list[tuple[int, int]]] = []  # (byte class, target) pairs
        self.atoms = atoms  # atom source -> per state of its DFA, its (byte class, target state) moves
        self.atom_accepts = atom_accepts  # atom source -> its accepting states (one character read)

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise RegexLimitError("nfa", limit_reason("nfa"))
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1

    def atom(self, source: str, entry: int) -> int:
        """Append a copy of an atom's DFA after ``entry``; returns the exit state."""
        rows = self.atoms[source]
        base = len(self.eps)
        for _ in rows:
            self.new()
        exit_ = self.new()
        self.eps[entry].append(base)
        for i, row in enumerate(rows):
            self.moves[base + i] = [(c, base + t) for c, t in row]
        for i in self.atom_accepts[source]:
            self.eps[base + i].append(exit_)
        return exit_

    def seq(self, items, flags: int, entry: int) -> int:
        """Compile a sequence of parse-tree items after ``entry``; returns the exit state."""
        s = entry
        for op, av in items:
            s = self.item(op, av, flags, s)
        return s

    def item(self, op, av, flags: int, entry: int) -> int:
        source = atom_source(op, av, flags)
        if source is not None:
            return self.atom(source, entry)
        if op is _C.SUBPATTERN:
            _group, add, remove, sub = av
            return self.seq(sub, (flags | add) & ~remove, entry)
        if op is _C.BRANCH:
            exit_ = self.new()
            for alt in av[1]:
                self.eps[self.seq(alt, flags, entry)].append(exit_)
            return exit_
        if op in (_C.MAX_REPEAT, _C.MIN_REPEAT):  # laziness does not change the language
            lo, hi, sub = av
            s = entry
            for _ in range(lo):
                s = self.seq(sub, flags, s)
            if hi == _C.MAXREPEAT:
                loop = self.new()
                self.eps[s].append(loop)
                self.eps[self.seq(sub, flags, loop)].append(loop)
                return loop
            exit_ = self.new()
            self.eps[s].append(exit_)
            for _ in range(hi - lo):
                s = self.seq(sub, flags, s)
                self.eps[s].append(exit_)
            return exit_
        raise _Unsupported(op)


class _Unsupported(Exception):
    """A parse-tree item that has no finite-automaton meaning here (anchor, lookaround, backreference)."""


def _atoms(tree, flags: int, out: dict[str, None]) -> None:
    """Collect the atom sources of a tree (with the flags in force at each), in order."""
    stack = [(tree, flags)]
    while stack:
        sub, fl = stack.pop()
        for op, av in sub:
            source = atom_source(op, av, fl)
            if source is not None:
                out[source] = None
            elif op is _C.SUBPATTERN:
                stack.append((av[3], (fl | av[1]) & ~av[2]))
            elif op is _C.BRANCH:
                stack.extend((alt, fl) for alt in av[1])
            elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT):
                stack.append((av[2], fl))


def _unsupported_reason(op) -> str:
    if op is _C.AT:
        return "anchors or word boundaries (^, \\b, lookaround) are not supported inside a pattern"
    if op in (_C.ASSERT, _C.ASSERT_NOT):
        return "lookahead and lookbehind are not supported"
    if op in (_C.GROUPREF, _C.GROUPREF_EXISTS):
        return "backreferences are not supported"
    return f"{str(op).lower()} is not supported"


# -------------------------------------------------------------------------------------------------- DFA


def bounded_regex_dfa(pattern: str, atom_dfa: Callable[[str], object], deadline: Deadline | None = None):
    """``(delta [n, 256] int32, accept [n] bool)``: the unminimised byte DFA (start 0, every state reachable)
    of the strings that fully match ``pattern``; None when Python's parser rejects the pattern.

    ``atom_dfa(source)`` compiles one character item (a Rust regex such as ``[^\\x{a}]``) to a trimmed byte DFA
    (``.delta``, ``.accept``; :mod:`lmprog.compiler.bytedfa` passes outlines-core's). Raises
    :class:`RegexLimitError` past a bound, and :class:`RegexError` for a construct with no automaton (anchors
    inside the pattern, lookaround, backreferences) or a character class ``atom_dfa`` rejects."""
    tree = parse(pattern)
    if tree is None:
        return None
    python_only = python_only_syntax(pattern)
    if python_only is not None:
        raise RegexError(f"cannot compile regex {pattern!r}: {python_only}", reason=python_only)
    deadline = deadline or Deadline()
    flags = tree.state.flags
    sources: dict[str, None] = {}
    _atoms(tree, flags, sources)
    dfas = {}
    for src in sources:
        try:
            dfas[src] = atom_dfa(src)
        except RegexError as e:
            raise RegexError(f"cannot compile regex {pattern!r}: {e.reason}", reason=e.reason) from None
    byte_class, reps = _byte_classes([d.delta for d in dfas.values()])
    rows = {src: [[(c, int(d.delta[i, b])) for c, b in enumerate(reps) if d.delta[i, b] >= 0]
                  for i in range(d.delta.shape[0])] for src, d in dfas.items()}
    nfa = _NFA(rows, {src: [int(i) for i in np.flatnonzero(d.accept)] for src, d in dfas.items()})
    start = nfa.new()
    try:
        final = nfa.seq(tree, flags, start)
    except _Unsupported as e:
        reason = _unsupported_reason(e.args[0])
        raise RegexError(f"cannot compile regex {pattern!r}: {reason}", reason=reason) from None
    table, accept = _determinize(nfa, start, final, len(reps), deadline)
    return np.ascontiguousarray(table[:, byte_class], dtype=np.int32), accept


def _byte_classes(deltas: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Bytes that every atom DFA treats alike share a class: ``(class of each byte [256], a byte per class)``."""
    if not deltas:
        return np.zeros(256, np.int64), [0]
    columns = np.concatenate([d.T for d in deltas], axis=1)  # [256, total states]
    _, first, inverse = np.unique(columns, axis=0, return_index=True, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), [int(b) for b in first]


def _determinize(nfa: _NFA, start: int, final: int, classes: int, deadline: Deadline):
    """Subset construction over byte classes, counting states as they are created: ``([n, classes] int32
    table, [n] bool accept)``. A DFA state is the set of NFA states with moves (or the final one) that the
    input so far can reach (a sorted tuple); no set is the dead state (-1).

    Besides the number of DFA states, the total size of their sets is bounded (:data:`MAX_SUBSET_WORK`):
    ``(a?){5000}`` has only 5001 DFA states, but each is a set of thousands of NFA states. Closures are
    computed per set with one stamp array (not cached per NFA state, which is quadratic memory for nested
    optional repeats)."""
    eps, moves = nfa.eps, nfa.moves
    important = [bool(m) for m in moves]
    important[final] = True
    mark = [0] * len(eps)
    stamp = work = 0

    def closure(seeds) -> tuple:
        nonlocal stamp, work
        stamp += 1
        stack = []
        for u in seeds:
            if mark[u] != stamp:
                mark[u] = stamp
                stack.append(u)
        keep = []
        visited = 0
        while stack:
            u = stack.pop()
            visited += 1
            if important[u]:
                keep.append(u)
            for v in eps[u]:
                if mark[v] != stamp:
                    mark[v] = stamp
                    stack.append(v)
        work += visited
        if work > MAX_SUBSET_WORK:
            raise RegexLimitError("work", limit_reason("work"))
        keep.sort()
        return tuple(keep)

    first = closure([start])
    ids = {first: 0}
    sets = [first]
    rows: list[list[int]] = []
    i = 0
    while i < len(sets):
        deadline.check()  # every state: one state's work can be large (a set of thousands of NFA states)
        buckets: dict[int, list[int]] = {}
        for u in sets[i]:
            for c, t in moves[u]:
                buckets.setdefault(c, []).append(t)
        row = [-1] * classes
        for c, targets in buckets.items():
            nxt = closure(targets)
            if not nxt:  # every path died: the dead state
                continue
            j = ids.get(nxt)
            if j is None:
                if len(sets) >= MAX_DFA_STATES:
                    raise RegexLimitError("dfa", limit_reason("dfa"))
                j = ids[nxt] = len(sets)
                sets.append(nxt)
            row[c] = j
        rows.append(row)
        i += 1
    accept = np.array([final in s for s in sets], bool)
    return np.array(rows, np.int32).reshape(len(rows), classes), accept
