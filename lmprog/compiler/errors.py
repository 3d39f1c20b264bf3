"""The errors of lowering and running a program, and located diagnostics for them.

* :class:`LoweringError`: the program (or its inputs) cannot be lowered; located like every program error
  (``file:line:col``, the source line, a caret, help).
* :class:`RunError`: a run-time failure of the program (an expression that fails for every particle, ...).
"""

from __future__ import annotations

from typing import Optional

from lmprog.dsl.errors import Diagnostic, LmpError
from lmprog.dsl.static import StaticError

__all__ = ["LoweringError", "RunError", "diagnostic", "error_message", "file_span", "lowering_error"]


class LoweringError(LmpError):
    """A program (or its inputs) cannot be lowered: located, like every program error."""


class RunError(RuntimeError):
    """A runtime failure of a program (an expression that fails for every particle, ...)."""


def file_span(program):
    """A span naming only the program's file (for errors that belong to no statement)."""
    from lmprog.dsl.source import Span

    return Span(program.filename, 0, 0, 0, 0)


def diagnostic(program, span, message: str, help: Optional[str] = None) -> Diagnostic:
    """A diagnostic at ``span`` of ``program``, with the source line it points into."""
    line = None
    if span is not None and span.line > 0:
        lines = program.source.split("\n")
        if span.line <= len(lines):
            line = lines[span.line - 1]
    return Diagnostic(span, message, help, line)


def lowering_error(program, span, message: str, help: Optional[str] = None) -> LoweringError:
    """A :class:`LoweringError` with one diagnostic at ``span``."""
    return LoweringError([diagnostic(program, span, message, help)])


def error_message(exc: Exception) -> str:
    """An exception as a run-time message: the type name first, except for the language's own errors
    (:class:`StaticError`, :class:`RunError`), whose messages already say what failed."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, (StaticError, RunError)) else text
