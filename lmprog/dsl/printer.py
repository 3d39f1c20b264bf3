"""AST -> canonical .lmp source.

``to_source(parse(text))`` parses back to an equal AST (spans aside) for every program the parser accepts; the
round-trip tests check this on random programs. The canonical form: 4-space indentation, one statement per line,
``where`` clauses inline, double-quoted strings (raw ``r"..."`` when a string has backslashes and can be written
raw exactly, which keeps regexes readable), single quotes for strings inside ``{...}`` interpolations, the fewest
parentheses that keep the tree, and no comments (comments are not part of the AST).
"""

from __future__ import annotations

import math

from lmprog.dsl import ast as A
from lmprog.dsl.templates import quote_text, string_literal

INDENT = "    "

# Binding strength, loosest first (Python's table).
_IFEXP, _OR, _AND, _NOT, _CMP, _SUM, _TERM, _UNARY, _POW, _POSTFIX, _ATOM = range(1, 12)
_BINOP_PREC = {"+": _SUM, "-": _SUM, "*": _TERM, "/": _TERM, "//": _TERM, "%": _TERM, "**": _POW}


def to_source(module: A.Module) -> str:
    """The canonical source text of a program."""
    lines: list[str] = []
    for stmt in module.body:
        _stmt(stmt, 0, lines)
    return "\n".join(lines) + ("\n" if lines else "")


def expr_to_source(expr: A.Expr, quote: str = '"') -> str:
    """Canonical text of an expression (strings use ``quote``)."""
    return _Printer(quote).expr(expr)


def constraint_to_source(c: A.Constraint) -> str:
    """Canonical text of a constraint, as written after ``where``."""
    return _Printer('"').constraint(c, _IFEXP)


def parts_to_source(parts: tuple[A.Part, ...], holes: bool = True, prefix: str = "") -> str:
    """A template (statement template when ``holes``, else an f-string body) as a double-quoted literal."""
    return _Printer('"').template(parts, holes, prefix)


# ---------------------------------------------------------------------------------------------- statements


def _stmt(s: A.Stmt, depth: int, out: list[str]) -> None:
    pad = INDENT * depth
    p = _Printer('"')
    if isinstance(s, A.ModelStmt):
        out.append(f"{pad}model {string_literal(s.name)}")
    elif isinstance(s, A.ModelDecl):
        out.append(f"{pad}model {s.alias} = {string_literal(s.name)}")
    elif isinstance(s, A.InferStmt):
        out.append(f"{pad}infer {s.strategy}({p.arguments(s.args, s.kwargs)})")
    elif isinstance(s, A.InputStmt):
        text = f"{pad}input {s.name}"
        if s.type is not None:
            text += f": {s.type}"
        if s.default is not None:
            text += f" = {p.expr(s.default)}"
        out.append(text)
    elif isinstance(s, A.ImportStmt):
        out.append(f"{pad}import {string_literal(s.path)} as {s.alias}")
    elif isinstance(s, A.Turn):
        out.append(f"{pad}{s.role} {p.template(s.parts, True)}{_where(s.where)}")
    elif isinstance(s, A.Template):
        out.append(pad + p.template(s.parts, True) + _where(s.where))
    elif isinstance(s, A.Gen):
        out.append(f"{pad}gen {s.name}{_where(s.where)}")
    elif isinstance(s, A.Observe):
        out.append(f"{pad}observe {p.template(s.parts, True)}")
    elif isinstance(s, A.SampleStmt):
        out.append(f"{pad}sample {s.name} ~ {s.dist}({p.arguments(s.args, s.kwargs)})")
    elif isinstance(s, A.Let):
        out.append(f"{pad}let {s.name} = {p.expr(s.value)}")
    elif isinstance(s, A.Condition):
        out.append(f"{pad}condition {p.expr(s.test)}")
    elif isinstance(s, A.Factor):
        out.append(f"{pad}factor {p.expr(s.value)}")
    elif isinstance(s, A.If):
        for i, branch in enumerate(s.branches):
            out.append(f"{pad}{'if' if i == 0 else 'elif'} {p.expr(branch.test)}:")
            _block(branch.body, depth + 1, out)
        if s.orelse is not None:
            out.append(f"{pad}else:")
            _block(s.orelse, depth + 1, out)
    elif isinstance(s, A.For):
        out.append(f"{pad}for {s.var} in {p.expr(s.iter)}:")
        _block(s.body, depth + 1, out)
    elif isinstance(s, A.Return):
        out.append(f"{pad}return " + ", ".join(p.expr(v) for v in s.values))
    else:  # pragma: no cover - every statement class is handled above
        raise TypeError(f"not a statement: {type(s).__name__}")


def _block(body: tuple[A.Stmt, ...], depth: int, out: list[str]) -> None:
    for stmt in body:
        _stmt(stmt, depth, out)


def _where(c) -> str:
    return "" if c is None else " where " + constraint_to_source(c)


# --------------------------------------------------------------------------------------------- expressions


class _Printer:
    """Prints expressions; ``quote`` is the quote character string literals use at this nesting level."""

    def __init__(self, quote: str, avoid: str = ""):
        self.quote = quote
        self.avoid = avoid  # quotes of enclosing strings, escaped in every string printed here

    def inner(self) -> "_Printer":
        """The printer for the inside of a ``{...}`` in a string quoted with ``self.quote``."""
        return _Printer("'" if self.quote == '"' else '"', self.avoid + self.quote)

    def expr(self, e: A.Expr, min_prec: int = _IFEXP) -> str:
        text, prec = self._expr(e)
        return f"({text})" if prec < min_prec else text

    def _expr(self, e: A.Expr) -> tuple[str, int]:
        if isinstance(e, A.Name):
            return e.id, _ATOM
        if isinstance(e, A.Bool):
            return ("true" if e.value else "false"), _ATOM
        if isinstance(e, A.Int):
            return str(e.value), (_ATOM if e.value >= 0 else _UNARY)
        if isinstance(e, A.Float):
            return _float(e.value)
        if isinstance(e, A.Str):
            return string_literal(e.value, self.quote, self.avoid), _ATOM
        if isinstance(e, A.FString):
            return self.template(e.parts, False, "f"), _ATOM
        if isinstance(e, A.ListExpr):
            return "[" + ", ".join(self.expr(i) for i in e.items) + "]", _ATOM
        if isinstance(e, A.DictExpr):
            items = ", ".join(f"{self.expr(k)}: {self.expr(v)}" for k, v in zip(e.keys, e.values))
            return "{" + items + "}", _ATOM
        if isinstance(e, A.UnaryOp):
            if e.op == "not":
                return "not " + self.expr(e.operand, _NOT), _NOT
            return e.op + self.expr(e.operand, _UNARY), _UNARY
        if isinstance(e, A.BinOp):
            prec = _BINOP_PREC[e.op]
            if e.op == "**":
                return f"{self.expr(e.left, _POSTFIX)} ** {self.expr(e.right, _UNARY)}", prec
            return f"{self.expr(e.left, prec)} {e.op} {self.expr(e.right, prec + 1)}", prec
        if isinstance(e, A.BoolOp):
            prec = _OR if e.op == "or" else _AND
            return f" {e.op} ".join(self.expr(v, prec + 1) for v in e.values), prec
        if isinstance(e, A.Compare):
            text = self.expr(e.left, _SUM)
            for op, right in zip(e.ops, e.comparators):
                text += f" {op} {self.expr(right, _SUM)}"
            return text, _CMP
        if isinstance(e, A.IfExp):
            return f"{self.expr(e.body, _OR)} if {self.expr(e.test, _OR)} else {self.expr(e.orelse, _IFEXP)}", _IFEXP
        if isinstance(e, A.Call):
            return f"{self.postfix_base(e.func)}({self.arguments(e.args, e.kwargs)})", _POSTFIX
        if isinstance(e, A.Attribute):
            return f"{self.postfix_base(e.value, attribute=True)}.{e.attr}", _POSTFIX
        if isinstance(e, A.Index):
            return f"{self.postfix_base(e.value)}[{self.expr(e.index)}]", _POSTFIX
        if isinstance(e, A.Slice):
            parts = [self.expr(x) if x is not None else "" for x in (e.lower, e.upper)]
            text = ":".join(parts)
            if e.step is not None:
                text += ":" + self.expr(e.step)
            return f"{self.postfix_base(e.value)}[{text}]", _POSTFIX
        raise TypeError(f"not an expression: {type(e).__name__}")

    def postfix_base(self, e: A.Expr, attribute: bool = False) -> str:
        text = self.expr(e, _POSTFIX)
        if attribute and isinstance(e, (A.Int, A.Float)) and not text.startswith("("):
            return f"({text})"  # `1.x` would lex as the float `1.` followed by a name
        return text

    def arguments(self, args, kwargs) -> str:
        items = [self.expr(a) for a in args] + [f"{k.name}={self.expr(k.value)}" for k in kwargs]
        return ", ".join(items)

    # -------------------------------------------------------------------------------------------- templates

    def template(self, parts, holes: bool, prefix: str = "") -> str:
        inner = self.inner()
        out = [prefix, self.quote]
        for part in parts:
            if isinstance(part, A.Text):
                out.append(quote_text(part.value, self.quote, template=True, holes=holes, avoid=self.avoid))
            elif isinstance(part, A.Hole):
                out.append(f"[{part.name}]")
            else:
                text = inner.expr(part.expr)
                if text.startswith("{"):
                    text = " " + text  # `{{` would be a literal brace
                if part.fmt is not None:
                    text += ":" + part.fmt
                elif text.endswith("}"):
                    text += " "  # `}}` would be a literal brace
                out.append("{" + text + "}")
        out.append(self.quote)
        return "".join(out)

    # ------------------------------------------------------------------------------------------ constraints

    def constraint(self, c: A.Constraint, min_prec: int) -> str:
        text, prec = self._constraint(c)
        return f"({text})" if prec < min_prec else text

    def _constraint(self, c: A.Constraint) -> tuple[str, int]:
        if isinstance(c, A.And):
            return " and ".join(self.constraint(o, _NOT) for o in c.operands), _AND
        if isinstance(c, A.Or):
            return " or ".join(self.constraint(o, _AND) for o in c.operands), _OR
        if isinstance(c, A.Not):
            if isinstance(c.operand, A.InChoices):
                return f"{c.operand.hole.id} not in {self.expr(c.operand.choices, _SUM)}", _CMP
            return "not " + self.constraint(c.operand, _NOT), _NOT
        if isinstance(c, A.Matches):
            return f"{c.hole.id} matches {self.expr(c.pattern, _SUM)}", _CMP
        if isinstance(c, A.InChoices):
            return f"{c.hole.id} in {self.expr(c.choices, _SUM)}", _CMP
        if isinstance(c, A.CountBound):
            return f"{c.kind}({c.hole.id}) {c.op} {self.expr(c.n, _SUM)}", _CMP
        if isinstance(c, A.StopAt):
            return f"{'stop_at' if c.keep else 'stop_before'}({c.hole.id}, {self.expr(c.text)})", _ATOM
        if isinstance(c, (A.IsInt, A.IsFloat)):
            return f"{'is_int' if isinstance(c, A.IsInt) else 'is_float'}({c.hole.id})", _ATOM
        if isinstance(c, (A.Contains, A.StartsWith, A.EndsWith)):
            name = {A.Contains: "contains", A.StartsWith: "startswith", A.EndsWith: "endswith"}[type(c)]
            return f"{name}({c.hole.id}, {self.expr(c.text)})", _ATOM
        if isinstance(c, A.GrammarC):
            return f"grammar({c.hole.id}, {self.expr(c.path)})", _ATOM
        if isinstance(c, A.JsonC):
            schema = "" if c.schema is None else f", schema={self.expr(c.schema)}"
            return f"json({c.hole.id}{schema})", _ATOM
        if isinstance(c, A.PyPredicate):
            kwargs = c.kwargs + ((A.Keyword("prefix", A.Bool(True)),) if c.prefix else ())
            args = self.arguments((c.hole, *c.args), kwargs)
            return f"{self.postfix_base(c.func)}({args})", _ATOM
        if isinstance(c, A.InvalidConstraint):
            text, prec = self._expr(c.expr)
            return text, prec
        raise TypeError(f"not a constraint: {type(c).__name__}")


def _float(value: float) -> tuple[str, int]:
    if math.isinf(value):
        return ("1e999", _ATOM) if value > 0 else ("-1e999", _UNARY)
    if math.isnan(value):
        return "(1e999 - 1e999)", _ATOM
    text = repr(value)
    return text, (_UNARY if text.startswith("-") else _ATOM)
