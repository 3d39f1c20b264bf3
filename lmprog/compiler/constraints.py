"""Hole constraints: the intermediate representation and its compiler to token automata.

The IR is a handful of frozen dataclasses, independent of the front end (the lowering from the AST builds
them; each node takes an optional ``loc`` — any object whose ``str`` is ``file:line:col`` — that errors
include). One hole's constraints are a conjunction (a list, or :class:`And`) of:

=====================================  ===================================================================
IR                                     meaning (``v`` is the hole's value, a ``str``)
=====================================  ===================================================================
``Regex(pattern)``                     ``re.fullmatch(pattern, v)`` (Rust ``regex`` syntax: no lookaround
                                       or backreferences; a leading ``^`` / trailing ``$`` is ignored)
``Choices(items)``                     ``v in items``
``Contains(s)`` / ``StartsWith(s)``    ``s in v`` / ``v.startswith(s)`` / ``v.endswith(s)``
``EndsWith(s)``
``IsInt()``                            ``re.fullmatch(INT_PATTERN, v)``: ``-?[0-9]+``
``IsFloat()``                          ``re.fullmatch(FLOAT_PATTERN, v)``: decimal, optional exponent
``Not(c)`` / ``And(cs)`` / ``Or(cs)``  boolean combinations (of the kinds above; ``Not`` of a counter
                                       flips its comparison)
``Count(kind, op, n)``                 ``tokens(X)`` / ``len(X)`` / ``words(X)`` ``op n`` with ``op`` in
                                       ``<= < == >= >``
``StopAt(s, keep=True)``               ``stop_at`` (``keep=True``) / ``stop_before`` (``keep=False``)
=====================================  ===================================================================

:func:`compile_hole` turns the constraints of one hole, its terminator and a tokenizer into a
:class:`CompiledHole`: a token automaton (:class:`~lmprog.compiler.automaton.Automaton`) whose allowed tokens
at every step are exactly those that keep the hole completable, plus counter data. The exact semantics of
terminators, straddling tokens and counters are in docs/constraints.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lmprog.automata.counters import CHARS, INF, TOKENS, WORDS
from lmprog.automata.values import ValueRule, generated_bytes
from lmprog.compiler import counters as C
from lmprog.compiler.automaton import Automaton
from lmprog.compiler.bytedfa import ByteDFA, RegexError, escape_regex, minimize_labelled, product, useful_states
from lmprog.compiler.vocab_index import VocabInfo, compress_columns, token_transitions, vocab_info
from lmprog.dsl.catalog import IS_FLOAT_REGEX, IS_INT_REGEX

COMPILER_VERSION = "4"
INT_PATTERN = IS_INT_REGEX  # -?[0-9]+
FLOAT_PATTERN = IS_FLOAT_REGEX  # -?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?


class ConstraintError(ValueError):
    """A constraint that cannot be compiled: unsatisfiable, unsupported, or malformed.

    ``loc`` (optional) is the source location (``file:line:col``); ``str(error)`` starts with it."""

    def __init__(self, message: str, loc: Any = None):
        self.message = message
        self.loc = loc
        super().__init__(f"{loc}: {message}" if loc is not None else message)


# --------------------------------------------------------------------------------------------------
# IR
# --------------------------------------------------------------------------------------------------


class Constraint:
    """Base class of the constraint IR (frozen dataclasses; ``loc`` does not take part in equality)."""

    loc: Any

    def describe(self) -> str:  # pragma: no cover - overridden
        return repr(self)


def _loc():
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Regex(Constraint):
    pattern: str
    loc: Any = _loc()

    def describe(self) -> str:
        return f"matches r{self.pattern!r}"


@dataclass(frozen=True)
class Choices(Constraint):
    items: tuple[str, ...]
    loc: Any = _loc()

    def __post_init__(self):
        object.__setattr__(self, "items", tuple(self.items))

    def describe(self) -> str:
        return f"in {list(self.items)!r}"


@dataclass(frozen=True)
class Contains(Constraint):
    s: str
    loc: Any = _loc()

    def describe(self) -> str:
        return f"contains(X, {self.s!r})"


@dataclass(frozen=True)
class StartsWith(Constraint):
    s: str
    loc: Any = _loc()

    def describe(self) -> str:
        return f"startswith(X, {self.s!r})"


@dataclass(frozen=True)
class EndsWith(Constraint):
    s: str
    loc: Any = _loc()

    def describe(self) -> str:
        return f"endswith(X, {self.s!r})"


@dataclass(frozen=True)
class IsInt(Constraint):
    loc: Any = _loc()

    def describe(self) -> str:
        return "is_int(X)"


@dataclass(frozen=True)
class IsFloat(Constraint):
    loc: Any = _loc()

    def describe(self) -> str:
        return "is_float(X)"


@dataclass(frozen=True)
class Not(Constraint):
    c: Constraint
    loc: Any = _loc()

    def describe(self) -> str:
        return f"not {self.c.describe()}"


@dataclass(frozen=True)
class And(Constraint):
    items: tuple[Constraint, ...]
    loc: Any = _loc()

    def __post_init__(self):
        object.__setattr__(self, "items", tuple(self.items))

    def describe(self) -> str:
        return " and ".join(f"({c.describe()})" for c in self.items)


@dataclass(frozen=True)
class Or(Constraint):
    items: tuple[Constraint, ...]
    loc: Any = _loc()

    def __post_init__(self):
        object.__setattr__(self, "items", tuple(self.items))

    def describe(self) -> str:
        return " or ".join(f"({c.describe()})" for c in self.items)


COUNT_KINDS = {"tokens": TOKENS, "len": CHARS, "words": WORDS}
COUNT_OPS = ("<=", "<", "==", ">=", ">")
_NEGATE = {"<=": ">", "<": ">=", ">=": "<", ">": "<="}


@dataclass(frozen=True)
class Count(Constraint):
    kind: str  # "tokens" | "len" | "words"
    op: str  # "<=" | "<" | "==" | ">=" | ">"
    n: int
    loc: Any = _loc()

    def __post_init__(self):
        if self.kind not in COUNT_KINDS:
            raise ConstraintError(f"unknown counter {self.kind!r} (expected tokens, len or words)", self.loc)
        if self.op not in COUNT_OPS:
            raise ConstraintError(f"unsupported comparison {self.op!r} (expected {', '.join(COUNT_OPS)})", self.loc)
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)):
            raise ConstraintError(f"{self.kind}(X) must be compared with an integer, not {self.n!r}", self.loc)

    def interval(self) -> tuple[int, int]:
        n = int(self.n)
        return {
            "<=": (0, n), "<": (0, n - 1), "==": (n, n), ">=": (max(n, 0), INF), ">": (max(n + 1, 0), INF),
        }[self.op]

    def describe(self) -> str:
        return f"{self.kind}(X) {self.op} {self.n}"


@dataclass(frozen=True)
class StopAt(Constraint):
    """``stop_at(X, s)`` (``keep=True``: ``s`` is part of the value) / ``stop_before(X, s)`` (``keep=False``)."""

    s: str
    keep: bool = True
    loc: Any = _loc()

    def describe(self) -> str:
        return f"{'stop_at' if self.keep else 'stop_before'}(X, {self.s!r})"


@dataclass(frozen=True)
class Grammar(Constraint):
    """``grammar(X, "file.lark")``: not supported yet (a later issue); compiling it raises ConstraintError."""

    path: str
    loc: Any = _loc()

    def describe(self) -> str:
        return f"grammar(X, {self.path!r})"


@dataclass(frozen=True)
class JsonSchema(Constraint):
    """``json(X, schema=...)``: not supported yet (a later issue); compiling it raises ConstraintError."""

    schema: str
    loc: Any = _loc()

    def describe(self) -> str:
        return f"json(X, schema={self.schema!r})"


LANGUAGE_KINDS = (Regex, Choices, Contains, StartsWith, EndsWith, IsInt, IsFloat)


def _is_language(c: Constraint) -> bool:
    if isinstance(c, LANGUAGE_KINDS):
        return True
    if isinstance(c, Not):
        return _is_language(c.c)
    if isinstance(c, (And, Or)):
        return all(_is_language(x) for x in c.items)
    return False


# --------------------------------------------------------------------------------------------------
# Languages (byte DFAs)
# --------------------------------------------------------------------------------------------------


_LANGUAGE_CACHE: dict[Constraint, ByteDFA] = {}


def language_dfa(c: Constraint) -> ByteDFA:
    """The minimal byte DFA of a language constraint (independent of any tokenizer)."""
    cached = _LANGUAGE_CACHE.get(c)
    if cached is not None:
        return cached
    dfa = _language_dfa(c)
    if len(_LANGUAGE_CACHE) > 1024:
        _LANGUAGE_CACHE.clear()
    _LANGUAGE_CACHE[c] = dfa
    return dfa


def _regex(pattern: str, loc) -> ByteDFA:
    try:
        return ByteDFA.from_regex(pattern)
    except RegexError as e:
        raise ConstraintError(str(e), loc) from None


def _language_dfa(c: Constraint) -> ByteDFA:
    any_text = r"(?s:.*)"
    if isinstance(c, Regex):
        return _regex(c.pattern, c.loc)
    if isinstance(c, Choices):
        if not all(isinstance(x, str) for x in c.items):
            raise ConstraintError("the choices of `in` must be strings", c.loc)
        return ByteDFA.from_strings(c.items)
    if isinstance(c, Contains):
        return _regex(any_text + escape_regex(c.s) + any_text, c.loc)
    if isinstance(c, StartsWith):
        return _regex(escape_regex(c.s) + any_text, c.loc)
    if isinstance(c, EndsWith):
        return _regex(any_text + escape_regex(c.s), c.loc)
    if isinstance(c, IsInt):
        return _regex(INT_PATTERN, c.loc)
    if isinstance(c, IsFloat):
        return _regex(FLOAT_PATTERN, c.loc)
    if isinstance(c, Not):
        return language_dfa(c.c).complement()
    if isinstance(c, (And, Or)):
        if not c.items:
            return ByteDFA.any_utf8() if isinstance(c, And) else ByteDFA.empty()
        dfa = language_dfa(c.items[0])
        for other in c.items[1:]:
            dfa = dfa.intersect(language_dfa(other)) if isinstance(c, And) else dfa.union(language_dfa(other))
        return dfa
    raise ConstraintError(f"{type(c).__name__} is not a constraint on the text of a hole", getattr(c, "loc", None))


# --------------------------------------------------------------------------------------------------
# Normalisation of one hole's constraints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Terminator:
    """How a hole ends.

    * ``"text"``: at the first occurrence of ``text`` in the generated bytes (the template text after the
      hole, or a ``stop_at``/``stop_before`` string); ``keep`` says whether ``text`` is part of the value.
    * ``"eos"``: at an end-of-sequence token.
    * ``"fixed"``: after exactly ``tokens(X) == N`` tokens (no terminator).
    """

    kind: str
    text: str = ""
    keep: bool = False


def _push_not(c: Constraint) -> Constraint:
    """Double negation cancels; ``not`` of a stop is an error; everything else stays (complement or interval)."""
    inner = c.c
    if isinstance(inner, Not):
        return inner.c
    if isinstance(inner, StopAt):
        raise ConstraintError("`not` cannot apply to stop_at/stop_before", c.loc or inner.loc)
    if not _is_language(inner) and _count_kind(inner) is None:
        raise ConstraintError(f"`not` of {inner.describe()} is not supported", c.loc or inner.loc)
    return c


def _count_kind(c: Constraint) -> str | None:
    """The counter a formula of counter bounds constrains (``None``: not such a formula, or mixed counters)."""
    if isinstance(c, Count):
        return c.kind
    if isinstance(c, Not):
        return _count_kind(c.c)
    if isinstance(c, (And, Or)) and c.items:
        kinds = {_count_kind(x) for x in c.items}
        return kinds.pop() if len(kinds) == 1 and None not in kinds else None
    return None


Intervals = list[tuple[int, int]]  # disjoint, sorted, closed, within [0, INF] (INF: unbounded)


def _count_set(c: Constraint) -> Intervals:
    """The values of the counter that a formula of bounds on one counter allows, as intervals."""
    if isinstance(c, Count):
        lo, hi = c.interval()
        return [(lo, hi)] if lo <= hi else []
    if isinstance(c, Not):
        out, at = [], 0
        for lo, hi in _count_set(c.c):
            if lo > at:
                out.append((at, lo - 1))
            at = hi + 1
        if at <= INF:
            out.append((at, INF))
        return out
    sets = [_count_set(x) for x in c.items]
    if isinstance(c, And):
        acc = sets[0]
        for other in sets[1:]:
            acc = [(max(a, c2), min(b, d)) for a, b in acc for c2, d in other if max(a, c2) <= min(b, d)]
        return sorted(acc)
    merged: Intervals = []
    for lo, hi in sorted(x for s in sets for x in s):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _conjuncts(constraints) -> list[Constraint]:
    if constraints is None:
        return []
    if isinstance(constraints, Constraint):
        constraints = [constraints]
    out: list[Constraint] = []
    stack = list(constraints)[::-1]
    while stack:
        c = stack.pop()
        if not isinstance(c, Constraint):
            raise ConstraintError(f"not a constraint: {c!r}")
        if isinstance(c, And):
            stack.extend(list(c.items)[::-1])
            continue
        if isinstance(c, Not):
            c2 = _push_not(c)
            if c2 is not c:
                stack.append(c2)
                continue
        out.append(c)
    return out


@dataclass(frozen=True)
class HolePlan:
    """A hole's constraints sorted by kind: the content language, the counter bounds and the terminator."""

    language: tuple[Constraint, ...]
    bounds: C.Bounds
    terminator: Terminator
    counts: tuple[Constraint, ...]

    def key(self, fingerprint: str) -> str:
        text = "|".join([COMPILER_VERSION, fingerprint, repr(self.language), repr(self.bounds), repr(self.terminator)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_hole(constraints, following_text: str | None = None, loc=None) -> HolePlan:
    """Sort a hole's constraints and choose its terminator (see module docs and docs/constraints.md).

    Terminator: an explicit ``stop_at``/``stop_before``; else, with ``tokens(X) == N``, none (a fixed-length
    hole); else ``following_text`` (the literal template text after the hole) when non-empty; else EOS."""
    language: list[Constraint] = []
    counts: list[Constraint] = []
    stops: list[StopAt] = []
    for c in _conjuncts(constraints):
        if isinstance(c, StopAt):
            stops.append(c)
        elif _count_kind(c) is not None:
            counts.append(c)
        elif _is_language(c):
            language.append(c)
        elif isinstance(c, (Grammar, JsonSchema)):
            raise ConstraintError(f"{c.describe()} constraints are not supported yet", c.loc or loc)
        elif isinstance(c, (Or, And, Not)):
            raise ConstraintError(
                f"`{c.describe()}`: `or`/`not` need every part to be of one kind — constraints on the text "
                "(matches, in, contains, startswith, endswith, is_int, is_float) or bounds of one counter "
                "(tokens, len or words); a hole has one stop_at/stop_before", c.loc or loc)
        else:
            raise ConstraintError(f"unsupported constraint {c.describe()}", getattr(c, "loc", None) or loc)
    if len(stops) > 1:
        raise ConstraintError("a hole can have at most one stop_at/stop_before", stops[1].loc or loc)
    bounds = C.Bounds()
    for kind, k in COUNT_KINDS.items():
        mine = [c for c in counts if _count_kind(c) == kind]
        if not mine:
            continue
        allowed = _count_set(And(tuple(mine)))
        text = " and ".join(c.describe() for c in mine)
        where = next((c.loc for c in mine if c.loc is not None), loc)
        if not allowed:
            raise ConstraintError(f"the bounds {text} allow no value", where)
        if len(allowed) > 8:
            raise ConstraintError(f"the bounds {text} allow {len(allowed)} separate ranges (at most 8)", where)
        bounds = bounds.with_set(k, allowed)
    if stops:
        if not stops[0].s:
            raise ConstraintError("the stop string is empty", stops[0].loc or loc)
        term = Terminator("text", stops[0].s, stops[0].keep)
    elif bounds.fixed_tokens is not None:
        if bounds.fixed_tokens == 0:
            raise ConstraintError("tokens(X) == 0 leaves nothing to generate", loc)
        term = Terminator("fixed")
    elif following_text:
        term = Terminator("text", following_text, False)
    else:
        term = Terminator("eos")
    return HolePlan(tuple(language), bounds, term, tuple(counts))


# --------------------------------------------------------------------------------------------------
# The hole's byte automaton: content, then terminator
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HoleDFA:
    """Byte DFA of a whole hole (value + terminator) with per-state labels.

    ``final``: the hole has ended (absorbing for text terminators; for fixed-length holes the value is
    acceptable here). ``eos_ok``: an EOS token ends the hole here. ``labels[:, 0]``: pending terminator bytes;
    ``1``: pending characters; ``2``: pending word starts; ``3``: raw word-tracker state."""

    dfa: ByteDFA
    final: np.ndarray
    eos_ok: np.ndarray
    labels: np.ndarray


def _kmp(t: bytes) -> np.ndarray:
    m = len(t)
    table = np.zeros((m, 256), np.int32)
    table[0, t[0]] = 1
    x = 0
    for k in range(1, m):
        table[k] = table[x]
        table[k, t[k]] = k + 1
        x = int(table[x, t[k]])
    return table


def _with_tracker(content: ByteDFA, track_words: bool) -> tuple[ByteDFA, np.ndarray]:
    """The content DFA, times the word tracker when words are counted; returns it and the tracker states."""
    if not track_words:
        return content, np.zeros(content.num_states, np.int64)
    wt = C.word_tracker()
    tracker_dfa = ByteDFA(wt.delta.astype(np.int32), np.ones(wt.num_states, bool))
    prod, _, tcomp = product(content, tracker_dfa, "and")
    dfa, lab = minimize_labelled(prod, tcomp)
    return dfa, lab[:, 0]


def build_hole_dfa(content: ByteDFA, term: Terminator, track_chars: bool, track_words: bool) -> HoleDFA:
    """Compose the content language with the terminator (see docs/constraints.md, "Where a hole ends").

    For a text terminator ``T`` the states are pairs ``(c, k)``: ``k`` is the longest suffix of the generated
    bytes that is a prefix of ``T`` (KMP), and ``c`` is the content DFA's state after the generated bytes
    *minus* those ``k`` pending bytes. A byte moves ``k`` by KMP and commits to the content exactly the bytes
    that leave the pending window, so the construction stays deterministic; reaching ``k = len(T)`` ends the
    hole (the first occurrence of ``T``), provided the content accepts (``keep``: accepts after ``T`` too).
    """
    cdfa, trk = _with_tracker(content, track_words)
    wt = C.word_tracker()
    n = cdfa.num_states
    if term.kind in ("eos", "fixed"):
        labels = np.zeros((n, 4), np.int64)
        labels[:, 3] = trk
        if term.kind == "eos":
            final, eos_ok = np.zeros(n, bool), cdfa.accept.copy()
        else:
            final, eos_ok = cdfa.accept.copy(), np.zeros(n, bool)
        return _minimize_hole(cdfa, final, eos_ok, labels, track_chars, track_words)

    t = term.text.encode("utf-8")
    m = len(t)
    kmp = _kmp(t)
    delta = cdfa.delta
    pref = np.full((n, m + 1), -1, np.int64)  # content state after committing t[:j]
    pref[:, 0] = np.arange(n)
    for j in range(m):
        prev = pref[:, j]
        pref[:, j + 1] = np.where(prev >= 0, delta[np.maximum(prev, 0), t[j]], -1)
    # Word-tracker facts about terminator prefixes, per tracker state: state after t[:k], word starts in it.
    trk_after = np.zeros((wt.num_states, m + 1), np.int64)
    trk_words = np.zeros((wt.num_states, m + 1), np.int64)
    for s0 in range(wt.num_states):
        s, w = s0, 0
        trk_after[s0, 0] = s0
        for j in range(m):
            w += int(wt.emit[s, t[j]])
            s = int(wt.delta[s, t[j]])
            trk_after[s0, j + 1], trk_words[s0, j + 1] = s, w
    chars = np.array([C.char_count(t[:k]) for k in range(m + 1)], np.int64)

    def label(c: int, k: int) -> tuple[int, int, int, int]:
        tr = int(trk[c])
        if term.keep:
            return (k, 0, 0, int(trk_after[tr, k]))
        return (k, int(chars[k]), int(trk_words[tr, k]), int(trk_after[tr, k]))

    ids: dict[tuple, int] = {}
    keys: list[tuple] = []
    rows: list[np.ndarray] = []
    labs: list[tuple] = []
    finals: list[bool] = []

    def state_id(key: tuple, lab: tuple, is_final: bool) -> int:
        j = ids.get(key)
        if j is None:
            j = ids[key] = len(keys)
            keys.append(key)
            labs.append(lab)
            finals.append(is_final)
        return j

    state_id(("s", 0, 0), label(0, 0), False)
    i = 0
    while i < len(keys):
        key = keys[i]
        row = np.full(256, -1, np.int64)
        if key[0] == "s":
            _, c, k = key
            k2 = kmp[k].astype(np.int64)
            nxt_c = np.where(k2 >= 1, pref[c, np.clip(k + 1 - k2, 0, m)], -1)
            base = pref[c, k]
            if base >= 0:
                zero = k2 == 0
                nxt_c[zero] = delta[base][zero]
            done = k2 == m
            for b in np.flatnonzero(done):
                end = pref[c, m] if term.keep else c
                if end >= 0 and cdfa.accept[end]:
                    lab = label(c, m)
                    row[b] = state_id(("f",) + lab, lab, True)
            live = ~done & (nxt_c >= 0)
            for b in np.flatnonzero(live):
                c2, kk = int(nxt_c[b]), int(k2[b])
                row[b] = state_id(("s", c2, kk), label(c2, kk), False)
        rows.append(row)
        i += 1
    dfa = ByteDFA(np.stack(rows).astype(np.int32), np.array(finals, bool))
    final = np.array(finals, bool)
    return _minimize_hole(dfa, final, np.zeros_like(final), np.array(labs, np.int64), track_chars, track_words)


def _minimize_hole(dfa: ByteDFA, final, eos_ok, labels, track_chars: bool, track_words: bool) -> HoleDFA:
    labels = labels.copy()
    if not track_chars:
        labels[:, 1] = 0
    if not track_words:
        labels[:, 2:] = 0
    target = final | eos_ok
    full = np.concatenate([final[:, None], eos_ok[:, None], labels], axis=1)
    mdfa, lab = minimize_labelled(ByteDFA(dfa.delta, target), full)
    if not mdfa.accept.any():
        return HoleDFA(mdfa, np.zeros(1, bool), np.zeros(1, bool), np.zeros((1, 4), np.int64))
    return HoleDFA(mdfa, lab[:, 0].astype(bool), lab[:, 1].astype(bool), lab[:, 2:])


# --------------------------------------------------------------------------------------------------
# The compiled hole
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CompiledHole:
    """One hole, compiled for one tokenizer.

    Attributes:
        automaton: the token automaton (token-class layout); ``automaton.start`` is the hole's first state.
        counters: :class:`~lmprog.compiler.counters.HoleCounters` (bounds and completability data).
        pending: ``[S] int32`` terminator bytes possibly produced already in each state (see TokenTable).
        terminator: how the hole ends.
        plan: the normalised constraints.
        tokenizer_fingerprint: the tokenizer this was compiled for.
        compile_s: seconds spent compiling (0 when loaded from the cache); ``from_cache``: disk cache hit.
    """

    automaton: Automaton
    counters: C.HoleCounters
    pending: np.ndarray
    terminator: Terminator
    plan: HolePlan
    tokenizer_fingerprint: str
    inc_chars: np.ndarray = field(repr=False)
    inc_words: np.ndarray = field(repr=False)
    compile_s: float = 0.0
    from_cache: bool = False

    @property
    def num_states(self) -> int:
        return self.automaton.num_states

    @property
    def value_rule(self) -> ValueRule:
        """Which generated bytes are the value: all but a terminator that is not kept."""
        t = self.terminator
        return ValueRule(stop=t.text.encode("utf-8") if t.kind == "text" and not t.keep else b"")

    @property
    def nbytes(self) -> int:
        """Device bytes this hole adds to a TokenTable: its token-class row, its class table, the per-state
        arrays and any reachability tables (the table's shared per-token counter arrays come once)."""
        a = self.automaton
        tables = sum(t.nbytes for t in self.counters.tables.values()) + \
            sum(t.nbytes for t in self.counters.mintok.values())
        extra_intervals = 2 * 4 * 3 * (self.counters.lo.shape[1] - 1) * a.num_states  # lo/hi slots beyond one
        return a.nbytes + tables + extra_intervals

    def generated_bytes(self, token_ids: Iterable[int], tokenizer) -> bytes:
        return generated_bytes(tokenizer, token_ids)

    def value(self, token_ids: Iterable[int], tokenizer) -> str:
        """The hole's value from the tokens generated for it (terminator included, EOS included or not)."""
        return self.value_rule.of_tokens(tokenizer, token_ids)

    # Host-side reference semantics (tests, debugging).

    def run(self, token_ids: Iterable[int]) -> tuple[int, np.ndarray] | None:
        """Automaton state and raw counts after ``token_ids``, or ``None`` if a token is not allowed
        (the automaton and counters say the prefix cannot be completed)."""
        a, hc = self.automaton, self.counters
        s = a.start
        raw = np.zeros(3, np.int64)
        check = hc.active
        for tok in map(int, token_ids):
            nxt = a.step(s, tok)
            if nxt < 0:
                return None
            raw = raw + np.array([1, self.inc_chars[tok], self.inc_words[hc.tracker[s], tok]])
            s = nxt
            if check and not hc.completable(s, raw - hc.pend[s]):
                return None
        return s, raw

    def completable(self, token_ids: Iterable[int]) -> bool:
        return self.run(token_ids) is not None

    def complete(self, token_ids: Iterable[int]) -> bool:
        """Whether ``token_ids`` is a whole generation of the hole (it ends exactly at the last token)."""
        r = self.run(token_ids)
        if r is None:
            return False
        s, raw = r
        if self.counters.fixed_len >= 0:
            return bool(self.automaton.final[s]) and raw[0] == self.counters.fixed_len
        return bool(self.automaton.final[s])

    def allowed_tokens(self, token_ids: Iterable[int] = (), max_tokens: int | None = None) -> np.ndarray:
        """Host-side reference of the device mask (:meth:`TokenTable.mask`) after ``token_ids``: ``[V] bool``."""
        r = self.run(token_ids)
        v = self.automaton.vocab_size
        if r is None:
            return np.zeros(v, bool)
        s, raw = r
        nxt = self.automaton.dense()[s] if self.automaton.token_class is None else \
            self.automaton.next_state[s][self.automaton.token_class]
        ok = nxt >= 0
        toks = np.flatnonzero(ok)
        hc = self.counters
        after = raw[None, :] + np.stack(
            [np.ones(toks.size, np.int64), self.inc_chars[toks], self.inc_words[hc.tracker[s], toks]], axis=1)
        good = hc.completable_many(nxt[toks], after - hc.pend[nxt[toks]], max_tokens)
        out = np.zeros(v, bool)
        out[toks[good]] = True
        return out


def _describe_plan(plan: HolePlan, name: str) -> str:
    parts = [c.describe() for c in plan.language] + [c.describe() for c in plan.counts]
    return (" and ".join(parts) or "no constraint").replace("X", name)


def _term_text(term: Terminator) -> str:
    if term.kind == "text":
        what = "stop_at" if term.keep else "terminator"
        return f"{what} {term.text!r}"
    return "end of sequence" if term.kind == "eos" else "fixed length"


def _compile(plan: HolePlan, info: VocabInfo, name: str, loc) -> tuple[Automaton, C.HoleCounters, np.ndarray]:
    content = language_dfa(And(plan.language)) if plan.language else ByteDFA.any_utf8()
    if content.is_empty:
        raise ConstraintError(f"the constraints on {name} allow no value: {_describe_plan(plan, name)}", loc)
    term, bounds = plan.terminator, plan.bounds
    hole = build_hole_dfa(content, term, bounds.active(CHARS), bounds.active(WORDS))
    if not hole.final.any() and not hole.eos_ok.any():
        raise ConstraintError(
            f"no value of {name} satisfying {_describe_plan(plan, name)} can be followed by the {_term_text(term)}"
            f" (the hole ends at its first occurrence)", loc)

    table = token_transitions(hole.dfa.delta, info)
    final = hole.final.copy()
    labels = hole.labels
    if term.kind == "eos":
        s = table.shape[0]
        table = np.vstack([table, np.full((1, info.size), -1, np.int32)])
        rows = np.flatnonzero(hole.eos_ok)
        for e in info.eos_ids:
            table[rows, e] = s
        final = np.concatenate([final, [True]])
        labels = np.vstack([labels, np.zeros((1, 4), np.int64)])
    token_class, class_table = compress_columns(table)
    del table
    # Token-level trim: keep states reachable from the start (0) that can still end the hole.
    keep = useful_states(class_table, 0, final)
    if not keep[0]:
        raise ConstraintError(
            f"no sequence of this tokenizer's tokens spells a value of {name} satisfying "
            f"{_describe_plan(plan, name)} followed by the {_term_text(term)}", loc)
    old = np.flatnonzero(keep)
    new_id = np.full(class_table.shape[0] + 1, -1, np.int32)
    new_id[old] = np.arange(old.size, dtype=np.int32)
    sub = class_table[old]
    sub = np.where(sub >= 0, new_id[np.where(sub >= 0, sub, class_table.shape[0])], -1).astype(np.int32)
    merge, class_table = compress_columns(sub)  # classes that became identical
    token_class = merge[token_class]
    final, labels = final[old], labels[old]
    # With character / word bounds, split classes so that every token of a class has the same increments:
    # the device then checks counters once per class, not once per token.
    keys = [token_class.astype(np.int64)]
    if bounds.active(CHARS):
        keys.append(info.inc_chars.astype(np.int64))
    if bounds.active(WORDS):
        keys.append(info.words_id.astype(np.int64))
    if len(keys) > 1:
        key = keys[0]
        for extra in keys[1:]:
            key = key * (int(extra.max()) + 1) + extra
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        reps = first[order]
        class_table = np.ascontiguousarray(class_table[:, token_class[reps]])
        token_class = rank[inverse.reshape(-1)].astype(np.int32)

    pend = np.zeros((old.size, 3), np.int32)
    pend[:, CHARS] = labels[:, 1]
    pend[:, WORDS] = labels[:, 2]
    tracker = labels[:, 3].astype(np.int32)
    fixed = bounds.fixed_tokens if term.kind == "fixed" else -1
    hc = C.analyse_counters(
        class_table, token_class, final, pend, tracker, bounds, info.inc_chars, info.inc_words, info.words_id, fixed)
    if not hc.completable(0, np.zeros(3, np.int64)):
        raise ConstraintError(
            f"the bounds on {name} cannot be met: {_describe_plan(plan, name)} (with the {_term_text(term)})", loc)
    automaton = Automaton(class_table, final, 0, token_class)
    return automaton, hc, labels[:, 0].astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Cache and entry point
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$LMPROG_CACHE_DIR/automata``, else ``~/.cache/lmprog/automata``."""
    root = os.environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog"
    return Path(root) / "automata"


_MEMORY: dict[str, tuple] = {}


def _save(path: Path, automaton: Automaton, hc: C.HoleCounters, pending: np.ndarray) -> None:
    arrays = {
        "next_state": automaton.next_state, "final": automaton.final, "token_class": automaton.token_class,
        "pending": pending, "lo": hc.lo, "hi": hc.hi, "pend": hc.pend, "tracker": hc.tracker, "rmin": hc.rmin,
        "rmax": hc.rmax, "meta": np.frombuffer(json.dumps({"start": automaton.start, "fixed": hc.fixed_len}).encode(),
                                               np.uint8),
    }
    for k, cum in hc.tables.items():
        arrays[f"table{k}"] = cum
    for k, mt in hc.mintok.items():
        arrays[f"mintok{k}"] = mt
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load(path: Path):
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        automaton = Automaton(z["next_state"], z["final"], int(meta["start"]), z["token_class"])
        tables = {int(k[5:]): z[k] for k in z.files if k.startswith("table")}
        mintok = {int(k[6:]): z[k] for k in z.files if k.startswith("mintok")}
        hc = C.HoleCounters(z["lo"], z["hi"], z["pend"], z["tracker"], z["rmin"], z["rmax"], tables,
                            int(meta["fixed"]), mintok)
        return automaton, hc, z["pending"]


def compile_hole(
    constraints: Constraint | Sequence[Constraint] | None,
    tokenizer,
    *,
    following_text: str | None = None,
    name: str = "X",
    loc: Any = None,
    cache: bool = True,
) -> CompiledHole:
    """Compile one hole's constraints for ``tokenizer``.

    Args:
        constraints: the hole's constraints (a conjunction; ``None`` or ``[]`` for free text).
        tokenizer: a :class:`~lmprog.backends.tokenizer.Tokenizer`.
        following_text: the literal template text right after the hole (its terminator unless a stop or a
            fixed length is given); ``None``/``""``: the hole ends at EOS.
        name: the hole's name, for messages. loc: its source location, for errors.
        cache: use the in-memory and on-disk caches (:func:`cache_dir`).

    Raises:
        ConstraintError: unsatisfiable (no value, no tokenization, bounds that cannot be met) or unsupported.
    """
    t0 = time.perf_counter()
    plan = plan_hole(constraints, following_text, loc)
    info = vocab_info(tokenizer)
    key = plan.key(info.fingerprint)
    from_cache = False
    hit = _MEMORY.get(key) if cache else None
    if hit is None and cache:
        path = cache_dir() / f"{key}.npz"
        if path.is_file():
            try:
                hit = _load(path)
                from_cache = True
            except Exception:  # a damaged cache entry is recompiled
                hit = None
    if hit is None:
        hit = _compile(plan, info, name, loc)
        if cache:
            try:
                _save(cache_dir() / f"{key}.npz", *hit)
            except OSError:
                pass
    if cache:
        if len(_MEMORY) > 512:
            _MEMORY.clear()
        _MEMORY[key] = hit
    automaton, hc, pending = hit
    return CompiledHole(
        automaton, hc, pending, plan.terminator, plan, info.fingerprint, info.inc_chars, info.inc_words,
        compile_s=time.perf_counter() - t0, from_cache=from_cache,
    )


def compile_constraint(constraint: Constraint, tokenizer, **kwargs) -> CompiledHole:
    """Alias of :func:`compile_hole` for a single constraint."""
    return compile_hole(constraint, tokenizer, **kwargs)
