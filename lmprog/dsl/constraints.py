"""Classify a ``where`` expression into constraint nodes (purely syntactic; no name resolution).

The grammar parses a ``where`` clause as an ordinary boolean expression; this module recognises the constraint
forms of the language in it:

==========================================  ==============================================================
source                                      node
==========================================  ==============================================================
``X matches R``                             ``Matches(X, R)``
``X in L`` / ``X not in L``                 ``InChoices(X, L)`` / ``Not(InChoices(X, L))``
``S in X`` / ``S not in X`` (S a string)    ``Contains(X, S)`` / ``Not(Contains(X, S))``
``stop_at(X, S)`` / ``stop_before(X, S)``   ``StopAt(X, S, keep=True/False)``
``tokens(X) <= N`` (also len, words)        ``CountBound(X, kind, op, N)``; ``N >= tokens(X)`` is flipped
``a <= tokens(X) <= b``                     two ``CountBound`` s in an ``And``
``is_int(X)`` ``is_float(X)``               ``IsInt`` ``IsFloat``
``contains/startswith/endswith(X, S)``      ``Contains`` ``StartsWith`` ``EndsWith``
``grammar(X, F)`` ``json(X, schema=F)``     ``GrammarC`` ``JsonC``
``h.f(X, ...)`` / ``f(X, ...)``             ``PyPredicate`` (``prefix=true`` sets ``prefix``)
``a and b`` / ``a or b`` / ``not a``        ``And`` / ``Or`` / ``Not`` (flattened)
anything else                               ``InvalidConstraint`` with the reason
==========================================  ==============================================================

Whether ``X`` is really a hole of the statement, whether ``f`` exists, and whether the arguments are valid are
the checker's questions (:mod:`lmprog.compiler.checks`).
"""

from __future__ import annotations

from typing import Optional

from lmprog.dsl import ast as A
from lmprog.dsl.catalog import CONSTRAINT_HELP, COUNT_OPS, COUNTERS
from lmprog.dsl.errors import did_you_mean

_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")

# name -> (node class, number of positional arguments after the hole, keyword names accepted)
_CALL_FORMS = {
    "is_int": (A.IsInt, 0),
    "is_float": (A.IsFloat, 0),
    "contains": (A.Contains, 1),
    "startswith": (A.StartsWith, 1),
    "endswith": (A.EndsWith, 1),
    "stop_at": (A.StopAt, 1),
    "stop_before": (A.StopAt, 1),
    "grammar": (A.GrammarC, 1),
}


def classify(expr: A.Expr) -> A.Constraint:
    """The constraint tree of a ``where`` expression (never raises; bad terms become ``InvalidConstraint``)."""
    if isinstance(expr, A.BoolOp):
        parts = tuple(classify(v) for v in expr.values)
        cls = A.And if expr.op == "and" else A.Or
        return cls(_flatten(cls, parts), span=expr.span)
    if isinstance(expr, A.UnaryOp) and expr.op == "not":
        return A.Not(classify(expr.operand), span=expr.span)
    if isinstance(expr, A.Compare):
        return _compare(expr)
    if isinstance(expr, A.Call):
        return _call(expr)
    if isinstance(expr, A.Name):
        return _invalid(expr, f"'{expr.id}' alone is not a constraint")
    return _invalid(expr, "this is not a constraint")


def conjuncts(c: Optional[A.Constraint]) -> tuple[A.Constraint, ...]:
    """The top-level ``and`` terms of a constraint (empty for None)."""
    if c is None:
        return ()
    return c.operands if isinstance(c, A.And) else (c,)


def join(constraints: list[A.Constraint], span) -> Optional[A.Constraint]:
    """``and`` of several constraints (flattened); None for none, the constraint itself for one."""
    if not constraints:
        return None
    if len(constraints) == 1:
        return constraints[0]
    return A.And(_flatten(A.And, tuple(constraints)), span=span)


def _flatten(cls, parts: tuple) -> tuple:
    out: list = []
    for p in parts:
        out.extend(p.operands if isinstance(p, cls) else (p,))
    return tuple(out)


def _invalid(expr: A.Expr, message: str, help: Optional[str] = CONSTRAINT_HELP, at=None) -> A.InvalidConstraint:
    """A term that is no constraint; ``at`` narrows the reported span (default: the whole term)."""
    return A.InvalidConstraint(expr, message, help, span=at or expr.span)


def _compare(expr: A.Compare) -> A.Constraint:
    """``a op b`` (chains become an ``And`` of pairs, as in Python)."""
    operands = (expr.left, *expr.comparators)
    pairs = [_pair(expr, operands[i], op, operands[i + 1]) for i, op in enumerate(expr.ops)]
    if len(pairs) == 1:
        return pairs[0]
    return A.And(_flatten(A.And, tuple(pairs)), span=expr.span)


def _pair_span(expr: A.Compare, left: A.Expr, right: A.Expr):
    if len(expr.ops) == 1:
        return expr.span
    s, e = left.span, right.span
    return type(s)(s.file, s.line, s.col, e.end_line, e.end_col)


def _pair(expr: A.Compare, left: A.Expr, op: str, right: A.Expr) -> A.Constraint:
    span = _pair_span(expr, left, right)
    if op in ("in", "not in"):
        if isinstance(left, A.Name):
            atom = A.InChoices(left, right, span=span)
        elif isinstance(right, A.Name) and isinstance(left, (A.Str, A.FString)):
            atom = A.Contains(right, left, span=span)
        else:
            return _invalid(A.Compare(left, (op,), (right,), span=span),
                            f"the left side of '{op}' must be the hole: X {op} [\"a\", \"b\"]")
        return A.Not(atom, span=span) if op == "not in" else atom
    if op == "matches":
        if not isinstance(left, A.Name):
            return _invalid(A.Compare(left, (op,), (right,), span=span),
                            "the left side of 'matches' must be the hole: X matches r\"...\"")
        return A.Matches(left, right, span=span)
    # an ordering or equality: one side must be a count of the hole
    counted = _count(left)
    flipped = False
    if counted is None:
        counted, flipped = _count(right), True
    if counted is None:
        for side in (left, right):
            near = _near_count(side)
            if near is not None:
                return _invalid(A.Compare(left, (op,), (right,), span=span),
                                f"unknown count '{side.func.id}' — did you mean '{near}'?",
                                "counts are tokens(X), len(X) and words(X)", at=side.func.span)
        help = None
        if op in ("==", "!=") and (isinstance(left, A.Name) or isinstance(right, A.Name)):
            help = 'to allow exactly some strings write X in ["a", "b"]; to compare values use condition'
        return _invalid(A.Compare(left, (op,), (right,), span=span),
                        f"'{op}' in a where clause must bound a count: tokens(X), len(X) or words(X)",
                        help or CONSTRAINT_HELP)
    kind, hole = counted
    if op not in COUNT_OPS:
        return _invalid(A.Compare(left, (op,), (right,), span=span),
                        f"a count cannot be bounded with '{op}'", "use <, <=, ==, >= or >")
    n = left if flipped else right
    return A.CountBound(hole, kind, _FLIP[op] if flipped else op, n, span=span)


def _count(expr: A.Expr) -> Optional[tuple[str, A.Name]]:
    """(kind, hole) if ``expr`` is ``tokens(X)`` / ``len(X)`` / ``words(X)`` with a plain name X."""
    if (isinstance(expr, A.Call) and isinstance(expr.func, A.Name) and expr.func.id in COUNTERS
            and len(expr.args) == 1 and not expr.kwargs and isinstance(expr.args[0], A.Name)):
        return expr.func.id, expr.args[0]
    return None


def _call(expr: A.Call) -> A.Constraint:
    func = expr.func
    name = func.id if isinstance(func, A.Name) else None
    if name in COUNTERS:
        return _invalid(expr, f"{name}(...) must be compared with a number, e.g. {name}(X) <= 8", None)
    if name == "json":
        return _json(expr)
    if name in _CALL_FORMS:
        return _builtin_call(expr, name)
    if not isinstance(func, (A.Name, A.Attribute)):
        return _invalid(expr, "this is not a constraint")
    return _predicate(expr)


def _builtin_call(expr: A.Call, name: str) -> A.Constraint:
    cls, extra = _CALL_FORMS[name]
    wanted = 1 + extra
    usage = f"{name}(X)" if extra == 0 else f'{name}(X, "...")'
    if expr.kwargs:
        return _invalid(expr, f"{name}() takes no keyword arguments", f"write {usage}")
    if len(expr.args) != wanted:
        got = len(expr.args)
        return _invalid(expr, f"{name}() takes {wanted} argument{'s' if wanted > 1 else ''} ({got} given)",
                        f"write {usage}")
    hole = expr.args[0]
    if not isinstance(hole, A.Name):
        return _invalid(expr, f"the first argument of {name}() must be the hole", f"write {usage}")
    if cls is A.StopAt:
        return A.StopAt(hole, expr.args[1], name == "stop_at", span=expr.span)
    if extra == 0:
        return cls(hole, span=expr.span)
    return cls(hole, expr.args[1], span=expr.span)


def _json(expr: A.Call) -> A.Constraint:
    usage = 'write json(X) or json(X, schema="file.json")'
    if not expr.args or not isinstance(expr.args[0], A.Name):
        return _invalid(expr, "the first argument of json() must be the hole", usage)
    schema: Optional[A.Expr] = None
    if len(expr.args) == 2:
        schema = expr.args[1]
    elif len(expr.args) > 2:
        return _invalid(expr, f"json() takes at most 2 arguments ({len(expr.args)} given)", usage)
    for kw in expr.kwargs:
        if kw.name != "schema" or schema is not None:
            return _invalid(expr, f"unexpected argument '{kw.name}' to json()", usage)
        schema = kw.value
    return A.JsonC(expr.args[0], schema, span=expr.span)


def _predicate(expr: A.Call) -> A.Constraint:
    if not expr.args or not isinstance(expr.args[0], A.Name):
        return _invalid(expr, "a predicate constraint takes the hole as its first argument", "write h.pred(X)")
    prefix = False
    kwargs = []
    for kw in expr.kwargs:
        if kw.name == "prefix":
            if not isinstance(kw.value, A.Bool):
                return _invalid(expr, "prefix= must be true or false", "write h.pred(X, prefix=true)")
            prefix = kw.value.value
        else:
            kwargs.append(kw)
    return A.PyPredicate(expr.func, expr.args[0], expr.args[1:], tuple(kwargs), prefix, span=expr.span)


def _near_count(expr: A.Expr) -> Optional[str]:
    """The count a misspelt ``lenn(X)`` probably meant, if ``expr`` looks like a count call."""
    if isinstance(expr, A.Call) and isinstance(expr.func, A.Name) and len(expr.args) == 1:
        return did_you_mean(expr.func.id, COUNTERS, cutoff=0.5) if expr.func.id not in COUNTERS else None
    return None
