"""Lark parse tree -> typed AST (:mod:`lmprog.dsl.ast`), with a span on every node.

The builder never raises for a problem in the program: it records a :class:`Diagnostic` and goes on with a
placeholder, so :func:`lmprog.dsl.parser.parse` can report every such problem at once. Problems found here:
keywords used as names, bad number literals, string escapes, template holes and interpolations (including
syntax errors inside ``{...}``), positional-after-keyword and repeated keyword arguments, f-strings where a plain
string is required.
"""

from __future__ import annotations

from typing import Optional, Union

from lark import Token, Tree

from lmprog.dsl import ast as A
from lmprog.dsl import templates as T
from lmprog.dsl.catalog import KEYWORDS
from lmprog.dsl.constraints import classify, join
from lmprog.dsl.errors import Diagnostic, LmpError
from lmprog.dsl.source import SourceFile, Span
from lmprog.dsl.syntax import parse_tree

Child = Union[Tree, Token, None]


#: Rules whose extent includes newlines / indentation tokens: their spans come from their children instead.
_LINE_RULES = frozenset({"start", "template_stmt", "turn_stmt", "gen_stmt", "where_block", "where_line", "suite", "if_stmt",
                         "elif_clause", "else_clause", "for_stmt"})


class Builder:
    """Builds AST nodes from lark trees of one source file; ``base`` offsets trees parsed from a substring."""

    def __init__(self, source: SourceFile, diagnostics: Optional[list[Diagnostic]] = None, base: int = 0):
        self.source = source
        self.diagnostics: list[Diagnostic] = diagnostics if diagnostics is not None else []
        self.base = base

    # ------------------------------------------------------------------------------------------------ plumbing

    def report(self, start: int, end: int, message: str, help: Optional[str] = None) -> None:
        """Record a diagnostic at absolute offsets ``[start, end)``."""
        span = self.source.span(start, end)
        self.diagnostics.append(Diagnostic(span, message, help, self.source.line_text(span.line)))

    def span(self, start: int, end: int) -> Span:
        return self.source.span(start, end)

    def _start(self, x: Child) -> int:
        if isinstance(x, Token):
            return self.base + (x.start_pos or 0)
        assert isinstance(x, Tree)
        if x.data not in _LINE_RULES and not x.meta.empty:
            return self.base + x.meta.start_pos
        for child in x.children:
            if child is not None:
                return self._start(child)
        return self.base + getattr(x.meta, "start_pos", 0)

    def _end(self, x: Child) -> int:
        if isinstance(x, Token):
            return self.base + (x.end_pos if x.end_pos is not None else (x.start_pos or 0) + len(x))
        assert isinstance(x, Tree)
        if x.data not in _LINE_RULES and not x.meta.empty:
            # the rule's own extent: its children lack the anonymous tokens lark filters out, so the last
            # child would lose a closing ')' / ']' / '}' (and the first an opening keyword or '(')
            return self.base + x.meta.end_pos
        for child in reversed(x.children):
            if child is not None:
                return self._end(child)
        return self.base + getattr(x.meta, "end_pos", 0)

    def sp(self, first: Child, last: Child = None) -> Span:
        """Span from the start of ``first`` to the end of ``last`` (default: ``first``)."""
        return self.span(self._start(first), self._end(last if last is not None else first))

    def tree_span(self, tree: Tree) -> Span:
        """Span of a rule including its leading keyword (which the tree's children do not keep)."""
        return self.span(self.base + tree.meta.start_pos, self._end(tree))

    def name(self, tok: Token) -> str:
        """A NAME token's text, reporting keywords used as names."""
        text = str(tok)
        if text in KEYWORDS:
            self.report(self._start(tok), self._end(tok), f"'{text}' is a keyword and cannot be used as a name")
        return text

    def parse_expr(self, text: str, offset: int) -> Optional[A.Expr]:
        """Parse an expression at absolute ``offset`` (template interpolations); None after a report."""
        try:
            tree = parse_tree(self.source, text, offset, "expr_only")
        except LmpError as err:
            self.diagnostics.extend(err.diagnostics)
            return None
        return Builder(self.source, self.diagnostics, offset).expr(tree.children[0])

    # ------------------------------------------------------------------------------------------------- strings

    def string_token(self, tok: Token) -> T.StringToken:
        return T.split_string_token(str(tok), self._start(tok))

    def plain_string(self, tok: Token, what: str) -> str:
        """The value of a string that must be plain (no f prefix): model names, paths."""
        st = self.string_token(tok)
        if st.is_f:
            self.report(self._start(tok), self._end(tok), f"{what} must be a plain string, not an f-string")
        return T.decode_plain(st, self)

    def template_parts(self, tok: Token) -> tuple[A.Part, ...]:
        return T.parse_parts(self.string_token(tok), self, holes=True)

    # ---------------------------------------------------------------------------------------------- statements

    def module(self, tree: Tree) -> A.Module:
        body = tuple(s for s in (self.stmt(c) for c in tree.children if isinstance(c, Tree)) if s is not None)
        end = len(self.source.text)
        return A.Module(body, span=self.span(0, max(end, 1)))

    def block(self, suite: Tree) -> tuple[A.Stmt, ...]:
        return tuple(s for s in (self.stmt(c) for c in suite.children if isinstance(c, Tree)) if s is not None)

    def stmt(self, tree: Tree) -> Optional[A.Stmt]:
        method = getattr(self, "s_" + str(tree.data))
        return method(tree, tree.children)

    def s_model_stmt(self, tree, ch):
        return A.ModelStmt(self.plain_string(ch[0], "the model name"), span=self.tree_span(tree))

    def s_model_decl(self, tree, ch):
        return A.ModelDecl(self.name(ch[0]), self.plain_string(ch[1], "the model name"), span=self.tree_span(tree),
                           name_span=self.sp(ch[0]), path_span=self.sp(ch[1]))

    def s_infer_stmt(self, tree, ch):
        args, kwargs = self.arguments(ch[1])
        return A.InferStmt(str(ch[0]), args, kwargs, span=self.tree_span(tree), name_span=self.sp(ch[0]))

    def s_input_stmt(self, tree, ch):
        name_tok, type_tok, default = ch
        return A.InputStmt(self.name(name_tok), str(type_tok) if type_tok is not None else None,
                           self.expr(default) if default is not None else None, span=self.tree_span(tree),
                           name_span=self.sp(name_tok), type_span=self.sp(type_tok) if type_tok else A.NO_SPAN)

    def s_import_stmt(self, tree, ch):
        return A.ImportStmt(self.plain_string(ch[0], "an import path"), self.name(ch[1]),
                            span=self.tree_span(tree), name_span=self.sp(ch[1]), path_span=self.sp(ch[0]))

    def s_let_stmt(self, tree, ch):
        return A.Let(self.name(ch[0]), self.expr(ch[1]), span=self.tree_span(tree), name_span=self.sp(ch[0]))

    def s_sample_stmt(self, tree, ch):
        args, kwargs = self.arguments(ch[2])
        return A.SampleStmt(self.name(ch[0]), str(ch[1]), args, kwargs, span=self.tree_span(tree),
                            name_span=self.sp(ch[0]), dist_span=self.sp(ch[1]))

    def s_condition_stmt(self, tree, ch):
        return A.Condition(self.expr(ch[0]), span=self.tree_span(tree))

    def s_factor_stmt(self, tree, ch):
        return A.Factor(self.expr(ch[0]), span=self.tree_span(tree))

    def s_observe_stmt(self, tree, ch):
        return A.Observe(self.template_parts(ch[0]), span=self.tree_span(tree))

    def s_return_stmt(self, tree, ch):
        return A.Return(tuple(self.expr(c) for c in ch if c is not None), span=self.tree_span(tree))

    def s_template_stmt(self, tree, ch):
        tok, inline, block = ch
        return A.Template(self.template_parts(tok), self.where(inline, block), span=self.tree_span(tree))

    def s_turn_stmt(self, tree, ch):
        role, tok, inline, block = ch
        return A.Turn(self.template_parts(tok), self.where(inline, block), role=str(role.children[0]),
                      span=self.tree_span(tree), role_span=self.sp(role))

    def s_gen_stmt(self, tree, ch):
        tok, inline, block = ch
        return A.Gen(self.name(tok), self.where(inline, block), span=self.tree_span(tree), name_span=self.sp(tok))

    def where(self, inline: Optional[Tree], block: Optional[Tree]) -> Optional[A.Constraint]:
        """The constraint of a statement: the inline clause and every indented where/and line, joined by and."""
        exprs = []
        if inline is not None:
            exprs.append(inline.children[0])
        if block is not None:
            exprs.extend(line.children[0] for line in block.children)
        if not exprs:
            return None
        parts = [classify(self.expr(e)) for e in exprs]
        return join(parts, self.sp(exprs[0], exprs[-1]))

    def s_if_stmt(self, tree, ch):
        test, suite, *rest = ch
        branches = [A.IfBranch(self.expr(test), self.block(suite), span=self.tree_span(tree))]
        orelse = None
        for clause in rest:
            if clause is None:
                continue
            if clause.data == "elif_clause":
                branches.append(A.IfBranch(self.expr(clause.children[0]), self.block(clause.children[1]),
                                           span=self.tree_span(clause)))
            else:
                orelse = self.block(clause.children[0])
        return A.If(tuple(branches), orelse, span=self.tree_span(tree))

    def s_for_stmt(self, tree, ch):
        var, iterable, suite = ch
        return A.For(self.name(var), self.expr(iterable), self.block(suite), span=self.tree_span(tree),
                     name_span=self.sp(var))

    # --------------------------------------------------------------------------------------------- expressions

    def expr(self, x: Child) -> A.Expr:
        if isinstance(x, Token):  # a bare terminal can only be a NAME inlined by '?' rules
            return A.Name(self.name(x), span=self.sp(x))
        method = getattr(self, "e_" + str(x.data))
        return method(x, x.children)

    def arguments(self, tree: Optional[Tree]) -> tuple[tuple[A.Expr, ...], tuple[A.Keyword, ...]]:
        """Positional and keyword arguments of a call, reporting misplaced or repeated keywords."""
        args: list[A.Expr] = []
        kwargs: list[A.Keyword] = []
        if tree is None:
            return (), ()
        seen: set[str] = set()
        for child in tree.children:
            if child is None:
                continue
            if isinstance(child, Tree) and child.data == "keyword":
                name_tok, value = child.children
                name = self.name(name_tok)
                if name in seen:
                    self.report(self._start(name_tok), self._end(name_tok), f"argument '{name}' is given twice")
                seen.add(name)
                kwargs.append(A.Keyword(name, self.expr(value), span=self.sp(child), name_span=self.sp(name_tok)))
            else:
                if kwargs:
                    self.report(self._start(child), self._end(child), "positional argument after keyword argument",
                                "put positional arguments first")
                args.append(self.expr(child))
        return tuple(args), tuple(kwargs)

    def e_name(self, tree, ch):
        return A.Name(self.name(ch[0]), span=self.sp(ch[0]))

    def e_true(self, tree, ch):
        return A.Bool(True, span=self.tree_span(tree))

    def e_false(self, tree, ch):
        return A.Bool(False, span=self.tree_span(tree))

    def e_number(self, tree, ch):
        tok = ch[0]
        text = str(tok).replace("_", "")
        span = self.sp(tok)
        lowered = text.lower()
        try:
            if lowered.startswith(("0x", "0o", "0b")):
                return A.Int(int(text, 0), span=span)
            if any(c in lowered for c in ".e"):
                return A.Float(float(text), span=span)
            if len(text) > 1 and text[0] == "0" and text.strip("0"):
                self.report(self._start(tok), self._end(tok), "leading zeros are not allowed in a decimal integer",
                            f"write {int(text)} (or 0o{text.lstrip('0')} for octal)")
                return A.Int(int(text), span=span)
            return A.Int(int(text), span=span)
        except ValueError:
            self.report(self._start(tok), self._end(tok), "number literal too large")
            return A.Int(0, span=span)

    def e_string(self, tree, ch):
        tok = ch[0]
        st = self.string_token(tok)
        if st.is_f:
            return A.FString(T.parse_parts(st, self, holes=False), span=self.sp(tok))
        return A.Str(T.decode_plain(st, self), span=self.sp(tok))

    def e_list(self, tree, ch):
        return A.ListExpr(tuple(self.expr(c) for c in ch if c is not None), span=self.tree_span(tree))

    def e_dict(self, tree, ch):
        items = [c for c in ch if c is not None]
        return A.DictExpr(tuple(self.expr(i.children[0]) for i in items),
                          tuple(self.expr(i.children[1]) for i in items), span=self.tree_span(tree))

    def e_ifexp(self, tree, ch):
        body, test, orelse = ch
        return A.IfExp(self.expr(test), self.expr(body), self.expr(orelse), span=self.sp(body, orelse))

    def e_or_(self, tree, ch):
        return A.BoolOp("or", tuple(self.expr(c) for c in ch), span=self.sp(ch[0], ch[-1]))

    def e_and_(self, tree, ch):
        return A.BoolOp("and", tuple(self.expr(c) for c in ch), span=self.sp(ch[0], ch[-1]))

    def e_not_(self, tree, ch):
        return A.UnaryOp("not", self.expr(ch[0]), span=self.tree_span(tree))

    def e_compare(self, tree, ch):
        left = self.expr(ch[0])
        ops = tuple(" ".join(str(t) for t in op.children) for op in ch[1::2])
        comparators = tuple(self.expr(c) for c in ch[2::2])
        return A.Compare(left, ops, comparators, span=self.sp(ch[0], ch[-1]))

    def e_binop(self, tree, ch):
        left, op, right = ch
        return A.BinOp(str(op), self.expr(left), self.expr(right), span=self.sp(left, right))

    def e_unary(self, tree, ch):
        op, operand = ch
        return A.UnaryOp(str(op), self.expr(operand), span=self.sp(op, operand))

    def e_call(self, tree, ch):
        func, arguments = ch
        args, kwargs = self.arguments(arguments)
        return A.Call(self.expr(func), args, kwargs, span=self.tree_span(tree))

    def e_paren(self, tree, ch):
        # the node keeps its own span (as in Python); an enclosing node's span covers the parentheses
        return self.expr(ch[0])

    def e_attribute(self, tree, ch):
        value, attr = ch
        return A.Attribute(self.expr(value), str(attr), span=self.sp(value, attr))

    def e_subscript(self, tree, ch):
        value, sub = ch
        span = self.tree_span(tree)
        if sub.data == "index":
            return A.Index(self.expr(value), self.expr(sub.children[0]), span=span)
        lower, upper, step = (self.expr(c) if c is not None else None for c in sub.children)
        return A.Slice(self.expr(value), lower, upper, step, span=span)
