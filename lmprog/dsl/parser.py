"""Text -> AST: the front end's entry points.

Entry points: :func:`parse` (a whole program -> :class:`~lmprog.dsl.ast.Module`) and :func:`parse_expression`
(one expression). Both raise :class:`~lmprog.dsl.errors.LmpError` and nothing else, whatever the input.

Syntax errors stop the parse at the first one (as in Python); problems found while building the AST (string
escapes, template holes and interpolations, number literals, keywords used as names, repeated or misplaced
keyword arguments) are collected, so a file with several such mistakes reports them all. ``where`` terms that are
no constraint become ``InvalidConstraint`` nodes, which the checker reports with everything else.

The two passes are :mod:`lmprog.dsl.syntax` (lark, the indentation postlexer, syntax errors as diagnostics) and
:mod:`lmprog.dsl.builder` (parse tree -> AST).
"""

from __future__ import annotations

from lmprog.dsl import ast as A
from lmprog.dsl.builder import Builder
from lmprog.dsl.errors import Diagnostic, LmpError
from lmprog.dsl.source import SourceFile
from lmprog.dsl.syntax import MAX_DEPTH, check_first_line, parse_tree

__all__ = ["MAX_DEPTH", "parse", "parse_expression"]


# ------------------------------------------------------------------------------------------------ entry points


def parse(text: str, filename: str = "<string>") -> A.Module:
    """Parse a whole program. Raises :class:`LmpError` with every problem found."""
    source = SourceFile(filename, text)
    try:
        return _parse_module(source)
    except LmpError:
        raise
    except RecursionError:
        raise LmpError([Diagnostic(source.span(0, 0), "the program is nested too deeply", None,
                                   source.line_text(1))]) from None


def parse_expression(text: str, filename: str = "<string>") -> A.Expr:
    """Parse a single expression (for tools and tests). Raises :class:`LmpError`."""
    source = SourceFile(filename, text)
    builder = Builder(source)
    expr = builder.parse_expr(source.text, 0)
    if builder.diagnostics or expr is None:
        raise LmpError(builder.diagnostics)
    return expr


def _parse_module(source: SourceFile) -> A.Module:
    check_first_line(source)
    tree = parse_tree(source, source.text + "\n", 0, "start")
    builder = Builder(source)
    module = builder.module(tree)
    if builder.diagnostics:
        raise LmpError(builder.diagnostics)
    return module
