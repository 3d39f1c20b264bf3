"""The constraint IR of one hole: a handful of frozen dataclasses, independent of the front end (the lowering
from the AST builds them; each node takes an optional ``loc`` — any object whose ``str`` is ``file:line:col`` — that errors
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
``JsonSchema(schema, text)``           ``v`` is JSON whose value validates against the schema (regular
                                       subset: :mod:`lmprog.compiler.structured`)
``Grammar(path, text, file)``          ``v`` is a sentence of the (non-recursive) Lark grammar
=====================================  ===================================================================

The compiler to token automata is :mod:`lmprog.compiler.constraints`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmprog.automata.counters import CHARS, INF, TOKENS, WORDS
from lmprog.dsl.catalog import IS_FLOAT_REGEX, IS_INT_REGEX

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
    """``grammar(X, "file.lark")``: ``v`` is a sentence of the Lark grammar's ``start`` rule (a regular one:
    :func:`lmprog.compiler.structured.grammar_regex`). ``text`` is the file's contents (the lowering reads it;
    part of equality, so compiled holes follow edits of the file), ``file`` its path as diagnostics show it."""

    path: str
    text: str = ""
    file: str = ""
    loc: Any = _loc()

    def describe(self) -> str:
        return f"grammar(X, {self.path!r})"


@dataclass(frozen=True)
class JsonSchema(Constraint):
    """``json(X)`` (``schema == ""``: any JSON value, depth-bounded) / ``json(X, schema="file.json")``: ``v`` is a
    JSON text whose value validates (:func:`lmprog.compiler.structured.schema_regex`). ``text``: the schema
    file's contents (read by the lowering; part of equality)."""

    schema: str
    text: str = ""
    loc: Any = _loc()

    def describe(self) -> str:
        return f"json(X, schema={self.schema!r})" if self.schema else "json(X)"


LANGUAGE_KINDS = (Regex, Choices, Contains, StartsWith, EndsWith, IsInt, IsFloat, Grammar, JsonSchema)


def is_language(c: Constraint) -> bool:
    """Whether ``c`` is a regular language of values (compiled to a byte DFA), not a counter or terminator."""
    if isinstance(c, LANGUAGE_KINDS):
        return True
    if isinstance(c, Not):
        return is_language(c.c)
    if isinstance(c, (And, Or)):
        return all(is_language(x) for x in c.items)
    return False
