"""Evaluate expressions whose value is known before the run (literals, inputs, lets of those).

The checker uses this to fold constant arguments (regexes, choice lists, bounds, loop ranges, strategy options)
and the lowering can use it with the run's input values for constraint arguments. Semantics follow Python for
the language's operators and built-ins; ``tokens`` (needs the model's tokenizer), ``logprob`` and imported
functions are never static.

:func:`static_value` raises :class:`NotStatic` when the value depends on something unknown, and
:class:`StaticError` when evaluating it would fail at run time anyway (``1 / 0``, ``int("x")``) so the caller can
report it. Results that would be huge (``10 ** 10 ** 9``, ``"a" * 10 ** 9``) count as not static rather than
hanging the checker.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Mapping

from lmprog.dsl import ast as A

MAX_SEQUENCE = 100_000  # longest string, or most elements of a collection, built while folding
MAX_INT_BITS = 10_000


class NotStatic(Exception):
    """The expression's value is not known before the run."""


class StaticError(Exception):
    """Evaluating the expression fails (the message says why, as Python would)."""


def static_value(expr: A.Expr, env: Mapping[str, Any] | None = None) -> Any:
    """The value of ``expr`` with names looked up in ``env`` (raises NotStatic / StaticError)."""
    return Evaluator(env or {}).eval(expr)


def is_literal(expr: A.Expr) -> bool:
    """A literal, a list/dict of literals, or a signed number: foldable without any environment."""
    try:
        static_value(expr)
        return True
    except (NotStatic, StaticError):
        return False


_BINOPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
           "//": operator.floordiv, "%": operator.mod, "**": operator.pow}
_CMPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
         "!=": operator.ne}


def _static_match(pattern: Any, text: Any) -> bool:
    """``text matches pattern`` with the constraint compiler's byte DFA (linear time, never backtracking, and
    the same regex semantics as a ``where`` constraint); NotStatic when the DFA cannot be had (not a string,
    not a constraint regex, or past the automaton bounds: the checker reports those where the regex is)."""
    if not isinstance(pattern, str) or not isinstance(text, str):
        raise NotStatic("matches needs two strings")
    if len(text) > 16:  # kept from the backtracking days (tests/test_dsl_units.py expects it); the DFA needs no cap
        raise NotStatic("only short strings are matched while folding")
    from lmprog.compiler.check_regex import fullmatch  # the compiler's regex DFA (imported late: no cycle)

    ok = fullmatch(pattern, text)
    if ok is None:
        raise NotStatic("this regex has no automaton within the bounds")
    return ok


class Evaluator:
    """The language's expressions with Python semantics, names looked up in ``env`` (a name not in it is
    :class:`NotStatic`). Subclasses add names and calls that need a run (the lowering's run-time evaluator)."""

    def __init__(self, env: Mapping[str, Any]):
        self.env = env

    def eval(self, e: A.Expr) -> Any:
        method = getattr(self, "_" + type(e).__name__, None)
        if method is None:
            raise NotStatic(type(e).__name__)
        try:
            return method(e)
        except (NotStatic, StaticError):
            raise
        except ZeroDivisionError:
            raise StaticError("division by zero") from None
        except OverflowError:
            raise StaticError("number too large") from None
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, re.error) as exc:
            raise StaticError(_message(exc)) from None

    def _Name(self, e: A.Name):
        if e.id in self.env:
            return self.env[e.id]
        raise NotStatic(e.id)

    def _Str(self, e):
        return e.value

    def _Int(self, e):
        return e.value

    def _Float(self, e):
        return e.value

    def _Bool(self, e):
        return e.value

    def _FString(self, e: A.FString):
        out = []
        for part in e.parts:
            if isinstance(part, A.Text):
                out.append(part.value)
            else:
                fmt = part.fmt or ""
                if any(len(run) > 5 for run in re.findall(r"[0-9]+", fmt)):
                    raise NotStatic("too large")  # a width like 999999999 would build a huge string
                value = self.eval(part.expr)
                if isinstance(value, (list, dict)):
                    raise NotStatic("formatting a collection")
                out.append(format(value, fmt))
        return _sized("".join(out))

    def _ListExpr(self, e):
        return _sized([self.eval(i) for i in e.items])

    def _DictExpr(self, e):
        return _sized({self.eval(k): self.eval(v) for k, v in zip(e.keys, e.values)})

    def _UnaryOp(self, e: A.UnaryOp):
        value = self.eval(e.operand)
        if e.op == "not":
            return not value
        if not isinstance(value, (int, float)):
            raise StaticError(f"bad operand type for unary {e.op}: '{type(value).__name__}'")
        return -value if e.op == "-" else +value

    def _BinOp(self, e: A.BinOp):
        left, right = self.eval(e.left), self.eval(e.right)
        if e.op == "**" and isinstance(left, int) and isinstance(right, int) and not isinstance(right, bool):
            if right > 0 and abs(left) > 1 and right * max(abs(left).bit_length(), 1) > MAX_INT_BITS:
                raise NotStatic("too large")
        if e.op == "%" and isinstance(left, str):
            raise NotStatic("printf-style formatting")  # not a language feature; also unbounded widths
        if e.op == "*" and isinstance(left, (str, list)) != isinstance(right, (str, list)):
            count = right if isinstance(left, (str, list)) else left
            seq = left if isinstance(left, (str, list)) else right
            if isinstance(count, int) and count * len(seq) > MAX_SEQUENCE:
                raise NotStatic("too large")
        result = _BINOPS[e.op](left, right)
        if isinstance(result, complex):
            raise StaticError("complex result")
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise NotStatic("too large")
        return _sized(result)

    def _BoolOp(self, e: A.BoolOp):
        value: Any = None
        for v in e.values:
            value = self.eval(v)
            if (e.op == "and" and not value) or (e.op == "or" and value):
                return value
        return value

    def _Compare(self, e: A.Compare):
        left = self.eval(e.left)
        for op, right_e in zip(e.ops, e.comparators):
            right = self.eval(right_e)
            if op == "in":
                ok = left in right
            elif op == "not in":
                ok = left not in right
            elif op == "matches":
                ok = _static_match(right, left)
            else:
                ok = _CMPS[op](left, right)
            if not ok:
                return False
            left = right
        return True

    def _IfExp(self, e: A.IfExp):
        return self.eval(e.body) if self.eval(e.test) else self.eval(e.orelse)

    def _Index(self, e: A.Index):
        return self.eval(e.value)[self.eval(e.index)]

    def _Slice(self, e: A.Slice):
        bounds = [self.eval(x) if x is not None else None for x in (e.lower, e.upper, e.step)]
        return self.eval(e.value)[slice(*bounds)]

    def _Call(self, e: A.Call):
        if not isinstance(e.func, A.Name) or e.func.id not in PURE_BUILTINS:
            raise NotStatic("call")
        args = [self.eval(a) for a in e.args]
        kwargs = {k.name: self.eval(k.value) for k in e.kwargs}
        return _sized(PURE_BUILTINS[e.func.id](*args, **kwargs))


def _sized(value: Any) -> Any:
    """``value``, unless it is a string or a (possibly nested) collection too big to fold cheaply.

    Nested lists may share sub-lists (``[[0] * 1000] * 1000``), so the size that matters is the number of
    elements reachable, counted with an early exit so that the check itself stays cheap.
    """
    if isinstance(value, str) and len(value) > MAX_SEQUENCE:
        raise NotStatic("too large")
    if isinstance(value, (list, dict)):
        budget = MAX_SEQUENCE
        stack = [value]
        while stack:
            item = stack.pop()
            items = item.values() if isinstance(item, dict) else item
            budget -= len(items) + 1
            if budget < 0:
                raise NotStatic("too large")
            stack.extend(x for x in items if isinstance(x, (list, dict)))
    return value


def _message(exc: Exception) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _scalar_str(x):
    if isinstance(x, (list, dict)):
        raise NotStatic("str of a collection")  # bounded by _sized, but not worth folding
    return str(x)


def _join(items, sep=""):
    return sep.join(items)


def _log(x, base=None):
    return math.log(x) if base is None else math.log(x, base)


def _minmax(fn):
    def call(*values):
        return fn(values[0]) if len(values) == 1 else fn(values)
    return call


#: The built-ins that are pure functions of their arguments (``tokens`` needs the tokenizer; ``logprob`` a run).
PURE_BUILTINS = {
    "len": len, "int": int, "float": float, "str": lambda x: _scalar_str(x),
    "words": lambda s: len(s.split()),
    "lower": lambda s: s.lower(), "upper": lambda s: s.upper(),
    "strip": lambda s, chars=None: s.strip(chars), "split": lambda s, sep=None: s.split(sep),
    "join": _join, "contains": lambda s, sub: sub in s,
    "startswith": lambda s, prefix: s.startswith(prefix), "endswith": lambda s, suffix: s.endswith(suffix),
    "count": lambda s, sub: s.count(sub), "min": _minmax(min), "max": _minmax(max), "abs": abs,
    "log": _log, "exp": math.exp,
}
