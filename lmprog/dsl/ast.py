"""The typed AST of a .lmp program: frozen dataclasses, each with a source :class:`~lmprog.dsl.source.Span`.

Every node has a keyword-only ``span`` field that takes no part in ``==`` / ``hash`` / ``repr``, so two programs
that differ only in layout compare equal (the round-trip property) while diagnostics can still point at the
text. Binding statements also carry ``name_span`` (the span of the bound name) for precise carets. Sequences are
tuples, so nodes are hashable.

Node families (the lowering consumes these):

Expressions (:data:`Expr`)
    ``Name(id)``, ``Str(value)``, ``Int(value)``, ``Float(value)``, ``Bool(value)``,
    ``FString(parts)`` (``f"..{x}.."`` in an expression; parts are ``Text`` / ``Interp``),
    ``ListExpr(items)``, ``DictExpr(keys, values)``, ``UnaryOp(op, operand)`` with op ``-`` ``+`` ``not``,
    ``BinOp(op, left, right)`` with op ``+ - * / // % **``, ``BoolOp(op, values)`` with op ``and`` / ``or``,
    ``Compare(left, ops, comparators)`` (chained as in Python; ops ``< <= > >= == != in`` ``not in`` ``matches``),
    ``IfExp(test, body, orelse)``, ``Call(func, args, kwargs)`` (``kwargs`` are :class:`Keyword` s),
    ``Attribute(value, attr)`` (only ``module.name`` passes the checks), ``Index(value, index)``,
    ``Slice(value, lower, upper, step)``.

Template parts (:data:`Part`)
    ``Text(value)`` (already unescaped), ``Interp(expr, fmt)`` (``{expr}`` or ``{expr:fmt}``), ``Hole(name)``.

Constraints (:data:`Constraint`, the ``where`` clause, classified from its expression by
:mod:`lmprog.dsl.constraints`; every atom names its hole as a :class:`Name`)
    ``Matches(hole, pattern)``, ``InChoices(hole, choices)``, ``StopAt(hole, text, keep)``
    (``stop_at`` keeps the stop text, ``stop_before`` drops it), ``CountBound(hole, kind, op, n)`` with kind
    ``tokens`` / ``len`` / ``words`` and op ``< <= == >= >``, ``IsInt(hole)``, ``IsFloat(hole)``,
    ``Contains(hole, text)``, ``StartsWith(hole, text)``, ``EndsWith(hole, text)``, ``GrammarC(hole, path)``,
    ``JsonC(hole, schema)``, ``PyPredicate(func, hole, args, kwargs, prefix)``, ``Not(operand)``,
    ``And(operands)``, ``Or(operands)``, and ``InvalidConstraint(expr, message, help)`` for a ``where`` term
    that is no constraint at all (the checker reports it; it never survives a successful check).

Statements (:data:`Stmt`)
    ``ModelStmt(name)``, ``ModelDecl(alias, name)`` (``model judge = "..."``), ``InferStmt(strategy, args, kwargs)``, ``InputStmt(name, type, default)``,
    ``ImportStmt(path, alias)``, ``Template(parts, where)``, ``Turn(parts, where, role)`` (a chat turn: a
    ``Template`` subclass, so every walk that handles templates handles turns), ``Gen(name, where)``, ``Observe(parts)``,
    ``SampleStmt(name, dist, args, kwargs)``, ``Let(name, value)``, ``Condition(test)``, ``Factor(value)``,
    ``If(branches, orelse)`` (``branches`` are :class:`IfBranch` (test, body): the ``if`` and each ``elif``),
    ``For(var, iter, body)``, ``Return(values)``; the root is ``Module(body)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Optional, Union

from lmprog.dsl.source import NO_SPAN, Span

_SPAN = dict(default=NO_SPAN, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class Node:
    """Base of every node: the span of the source text it came from (ignored by ``==``)."""

    span: Span = field(**_SPAN)

    def children(self) -> Iterator["Node"]:
        """Direct child nodes, in field order (tuples are flattened)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Node):
                yield value
            elif isinstance(value, tuple):
                for item in value:
                    if isinstance(item, Node):
                        yield item


def walk(node: Node) -> Iterator[Node]:
    """Every node under ``node`` (itself included), depth first, without recursion."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(list(current.children())))


# ------------------------------------------------------------------------------------------------ expressions


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class Str(Node):
    value: str


@dataclass(frozen=True)
class Int(Node):
    value: int


@dataclass(frozen=True)
class Float(Node):
    value: float


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class Text(Node):
    """Literal text of a template (escapes already applied)."""

    value: str


@dataclass(frozen=True)
class Interp(Node):
    """``{expr}`` (``fmt`` is the text after a top-level ``:``, as in Python's ``format``), else None."""

    expr: "Expr"
    fmt: Optional[str] = None


@dataclass(frozen=True)
class Hole(Node):
    """``[name]``: a generation hole of a statement template."""

    name: str


@dataclass(frozen=True)
class FString(Node):
    """``f"...{x}..."`` in an expression: text and interpolations (no holes)."""

    parts: tuple[Union[Text, Interp], ...]


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class DictExpr(Node):
    keys: tuple["Expr", ...]
    values: tuple["Expr", ...]


@dataclass(frozen=True)
class UnaryOp(Node):
    op: str  # '-', '+', 'not'
    operand: "Expr"


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # '+', '-', '*', '/', '//', '%', '**'
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class BoolOp(Node):
    op: str  # 'and', 'or'
    values: tuple["Expr", ...]


@dataclass(frozen=True)
class Compare(Node):
    """``left op0 c0 op1 c1 ...``, chained as in Python."""

    left: "Expr"
    ops: tuple[str, ...]  # '<', '<=', '>', '>=', '==', '!=', 'in', 'not in', 'matches'
    comparators: tuple["Expr", ...]


@dataclass(frozen=True)
class IfExp(Node):
    test: "Expr"
    body: "Expr"
    orelse: "Expr"


@dataclass(frozen=True)
class Keyword(Node):
    """``name=value`` in a call, a strategy or a distribution (``name_span`` is the name's span)."""

    name: str
    value: "Expr"
    name_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class Call(Node):
    func: "Expr"  # Name (built-in or functions=) or Attribute (imported module function)
    args: tuple["Expr", ...] = ()
    kwargs: tuple[Keyword, ...] = ()


@dataclass(frozen=True)
class Attribute(Node):
    value: "Expr"
    attr: str


@dataclass(frozen=True)
class Index(Node):
    value: "Expr"
    index: "Expr"


@dataclass(frozen=True)
class Slice(Node):
    value: "Expr"
    lower: Optional["Expr"] = None
    upper: Optional["Expr"] = None
    step: Optional["Expr"] = None


Expr = Union[Name, Str, Int, Float, Bool, FString, ListExpr, DictExpr, UnaryOp, BinOp, BoolOp, Compare, IfExp,
             Call, Attribute, Index, Slice]
Part = Union[Text, Interp, Hole]
LITERALS = (Str, Int, Float, Bool)

# ------------------------------------------------------------------------------------------------ constraints


@dataclass(frozen=True)
class Matches(Node):
    """``X matches r"REGEX"``: the whole hole matches the regex."""

    hole: Name
    pattern: Expr


@dataclass(frozen=True)
class InChoices(Node):
    """``X in ["a", "b"]``: the hole is exactly one of the strings."""

    hole: Name
    choices: Expr


@dataclass(frozen=True)
class StopAt(Node):
    """``stop_at(X, S)`` (keep=True) / ``stop_before(X, S)`` (keep=False): the hole ends at the first S."""

    hole: Name
    text: Expr
    keep: bool


@dataclass(frozen=True)
class CountBound(Node):
    """``tokens(X) <= N`` etc.; the count is always on the left (``5 >= len(x)`` is stored as ``len(x) <= 5``)."""

    hole: Name
    kind: str  # 'tokens', 'len', 'words'
    op: str  # '<', '<=', '==', '>=', '>'
    n: Expr


@dataclass(frozen=True)
class IsInt(Node):
    hole: Name


@dataclass(frozen=True)
class IsFloat(Node):
    hole: Name


@dataclass(frozen=True)
class Contains(Node):
    """``contains(X, S)`` (also written ``S in X``)."""

    hole: Name
    text: Expr


@dataclass(frozen=True)
class StartsWith(Node):
    hole: Name
    text: Expr


@dataclass(frozen=True)
class EndsWith(Node):
    hole: Name
    text: Expr


@dataclass(frozen=True)
class GrammarC(Node):
    """``grammar(X, "file.lark")`` (not supported yet: the checker says so)."""

    hole: Name
    path: Expr


@dataclass(frozen=True)
class JsonC(Node):
    """``json(X, schema="file.json")``; ``schema`` None means any JSON value (not supported yet)."""

    hole: Name
    schema: Optional[Expr] = None


@dataclass(frozen=True)
class PyPredicate(Node):
    """``h.pred(X, *args, **kwargs)`` / ``pred(X)`` from ``functions=``: a host call on the hole's text.

    ``prefix=True`` (written ``prefix=true``) asks for a check of every prefix instead of the complete hole.
    """

    func: Expr  # Name or Attribute(Name(module), attr)
    hole: Name
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    prefix: bool = False


@dataclass(frozen=True)
class Not(Node):
    operand: "Constraint"


@dataclass(frozen=True)
class And(Node):
    operands: tuple["Constraint", ...]


@dataclass(frozen=True)
class Or(Node):
    operands: tuple["Constraint", ...]


@dataclass(frozen=True)
class InvalidConstraint(Node):
    """A ``where`` term that is not a constraint; ``message``/``help`` say why (reported by the checker)."""

    expr: Expr
    message: str
    help: Optional[str] = None


Constraint = Union[Matches, InChoices, StopAt, CountBound, IsInt, IsFloat, Contains, StartsWith, EndsWith,
                   GrammarC, JsonC, PyPredicate, Not, And, Or, InvalidConstraint]
CONSTRAINT_ATOMS = (Matches, InChoices, StopAt, CountBound, IsInt, IsFloat, Contains, StartsWith, EndsWith,
                    GrammarC, JsonC, PyPredicate)

# ------------------------------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class ModelStmt(Node):
    name: str


@dataclass(frozen=True)
class ModelDecl(Node):
    """``model ALIAS = "NAME-OR-PATH"``: a second model (a judge), scored with ``ALIAS.logprob_of(...)``; the
    program's own model stays the one of ``model "..."`` (``ModelStmt``)."""

    alias: str
    name: str
    name_span: Span = field(**_SPAN)  # the alias
    path_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class InferStmt(Node):
    strategy: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    name_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class InputStmt(Node):
    name: str
    type: Optional[str] = None
    default: Optional[Expr] = None
    name_span: Span = field(**_SPAN)
    type_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class ImportStmt(Node):
    path: str
    alias: str
    name_span: Span = field(**_SPAN)  # the alias
    path_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class Template(Node):
    """A template statement: append the text, generating each hole under the ``where`` constraints."""

    parts: tuple[Part, ...]
    where: Optional[Constraint] = None

    @property
    def holes(self) -> tuple[Hole, ...]:
        return tuple(p for p in self.parts if isinstance(p, Hole))


#: The roles of chat turns.
TURN_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn(Template):
    """``system "..."`` / ``user "..."`` / ``assistant "..."``: one chat message of that role, its content the
    template (holes only in assistant turns, checked), rendered with the model's chat template."""

    role: str = field(default="user", kw_only=True)
    role_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class Gen(Node):
    """``gen NAME where ...``: a bare hole, the same as the template ``"[NAME]"``."""

    name: str
    where: Optional[Constraint] = None
    name_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class Observe(Node):
    """``observe "text"``: append the text and multiply the weight by its LM probability."""

    parts: tuple[Part, ...]


@dataclass(frozen=True)
class SampleStmt(Node):
    """``sample NAME ~ DIST(args)``: a non-LM random choice drawn from its prior."""

    name: str
    dist: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    name_span: Span = field(**_SPAN)
    dist_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class Let(Node):
    name: str
    value: Expr
    name_span: Span = field(**_SPAN)


@dataclass(frozen=True)
class Condition(Node):
    test: Expr


@dataclass(frozen=True)
class Factor(Node):
    value: Expr


@dataclass(frozen=True)
class IfBranch(Node):
    """One ``if``/``elif`` test and its block."""

    test: Expr
    body: tuple["Stmt", ...]


@dataclass(frozen=True)
class If(Node):
    branches: tuple[IfBranch, ...]
    orelse: Optional[tuple["Stmt", ...]] = None


@dataclass(frozen=True)
class For(Node):
    """``for var in range(...)`` / ``for var in LIST``: the iterable is known before the run (checked)."""

    var: str
    iter: Expr
    body: tuple["Stmt", ...]
    name_span: Span = field(**_SPAN)

    @property
    def is_range(self) -> bool:
        return isinstance(self.iter, Call) and isinstance(self.iter.func, Name) and self.iter.func.id == "range"


@dataclass(frozen=True)
class Return(Node):
    """``return a, b`` (``values`` in order) or ``return {"k": v}`` (one ``DictExpr`` value)."""

    values: tuple[Expr, ...]


Stmt = Union[ModelStmt, ModelDecl, InferStmt, InputStmt, ImportStmt, Template, Turn, Gen, Observe, SampleStmt, Let, Condition,
             Factor, If, For, Return]


@dataclass(frozen=True)
class Module(Node):
    body: tuple[Stmt, ...]


# ------------------------------------------------------------------------------------------------------ dump


def dump(node: Node, spans: bool = True, indent: str = "  ") -> str:
    """A readable, stable multi-line rendering of a tree (used by golden tests and for debugging).

    One node per line: ``ClassName field=value ... @line:col-end_line:end_col``; child nodes are indented under
    the field that holds them.
    """
    lines: list[str] = []
    _dump(node, 0, spans, indent, lines)
    return "\n".join(lines) + "\n"


def _dump(node: Node, depth: int, spans: bool, indent: str, out: list[str]) -> None:
    pad = indent * depth
    scalars, nested = [], []
    for f in fields(node):
        if f.name in ("span",) or f.name.endswith("_span"):
            continue
        value = getattr(node, f.name)
        if isinstance(value, Node) or (isinstance(value, tuple) and any(isinstance(v, Node) for v in value)):
            nested.append((f.name, value))
        elif isinstance(value, tuple) and not value:
            continue
        else:
            scalars.append(f"{f.name}={value!r}")
    where = ""
    if spans and node.span is not NO_SPAN:
        s = node.span
        where = f" @{s.line}:{s.col}-{s.end_line}:{s.end_col}"
    out.append(pad + " ".join([type(node).__name__, *scalars]) + where)
    for name, value in nested:
        out.append(pad + indent + name + ":")
        for child in value if isinstance(value, tuple) else (value,):
            _dump(child, depth + 2, spans, indent, out)
