"""The errors of lowering and running a program, and located diagnostics for them.

* :class:`LoweringError`: the program (or its inputs) cannot be lowered; located like every program error
  (``file:line:col``, the source line, a caret, help).
* :class:`RunError`: a run-time failure of the program (an expression that fails for every particle, ...).
* :class:`HostError`: a :class:`RunError` of the user's Python code (an imported function, a predicate, a
  factor), located at the ``.lmp`` call site (``file:line:col``, the source line, a caret, what is valid).
* :class:`HostAbort`: carries a :class:`HostError` that must stop the whole run instead of killing one particle
  (a time limit, ``SystemExit``, a predicate that returns no bool, a factor that is no finite number).
* :class:`OptionError`: a bad argument of a run (a ``Program.run`` keyword, a CLI option); a ``ValueError``
  and a ``TypeError``.
"""

from __future__ import annotations

from typing import Optional

from lmprog.dsl.errors import Diagnostic, LmpError
from lmprog.dsl.static import StaticError

__all__ = ["HostAbort", "HostError", "LoweringError", "OptionError", "RunError", "diagnostic", "error_message",
           "file_span", "lowering_error"]


class LoweringError(LmpError):
    """A program (or its inputs) cannot be lowered: located, like every program error."""


class RunError(RuntimeError):
    """A runtime failure of a program (an expression that fails for every particle, ...)."""


class HostError(RunError):
    """The user's Python code failed (raised, returned a value of the wrong kind, ran past its time limit):
    ``diagnostic`` locates the ``.lmp`` call site; the message is its rendering (location, line, caret, help),
    or ``text`` (one line, for an error that becomes part of a host step's message)."""

    def __init__(self, diagnostic: Diagnostic, text: Optional[str] = None):
        self.diagnostic = diagnostic
        super().__init__(text if text is not None else diagnostic.render())


class HostAbort(BaseException):
    """Stops the run with ``error`` (a :class:`HostError`). A ``BaseException``, like ``KeyboardInterrupt``, so
    that the per-particle ``except Exception`` handlers of host steps (an exception kills only its particle) let
    it through; the runner turns it back into ``error``. Raised for what no particle can recover from: a call
    past its time limit, ``SystemExit`` in user code, a predicate that returns no bool, a factor that is no
    finite number."""

    def __init__(self, error: HostError):
        super().__init__(str(error))
        self.error = error


class OptionError(ValueError, TypeError):
    """A bad argument of a run (``Program.run(particles=2.5)``, ``--seed -1``): names it and what is valid.
    Both a ``ValueError`` and a ``TypeError`` (what Python raises for a bad value or type of an argument), so
    code written against either keeps working."""


def file_span(program):
    """A span naming only the program's file (for errors that belong to no statement)."""
    from lmprog.dsl.source import Span

    return Span(program.filename, 0, 0, 0, 0)


def diagnostic(program, span, message: str, help: Optional[str] = None) -> Diagnostic:
    """A diagnostic at ``span`` of ``program``, with the source line it points into."""
    line = None
    if span is not None and span.line > 0:
        lines = program.source.split("\n") if span.file == program.filename else _other_file(program, span.file)
        if span.line <= len(lines):
            line = lines[span.line - 1]
    return Diagnostic(span, message, help, line)


def _other_file(program, name: str) -> list[str]:
    """The lines of another file a diagnostic points into (a grammar file), read relative to the program's
    folder; none when it cannot be read."""
    import os

    from lmprog.dsl.source import normalize_source

    base = getattr(program, "base_dir", None)
    folder = os.path.dirname(program.filename)
    candidates = [name] if os.path.isabs(name) else [os.path.join(str(base), os.path.relpath(name, folder or "."))
                                                     if base is not None else name, name]
    for path in candidates:
        try:
            with open(path, encoding="utf-8") as f:
                return normalize_source(f.read()).split("\n")
        except (OSError, UnicodeDecodeError, ValueError):
            continue
    return []


def lowering_error(program, span, message: str, help: Optional[str] = None) -> LoweringError:
    """A :class:`LoweringError` with one diagnostic at ``span``."""
    return LoweringError([diagnostic(program, span, message, help)])


def error_message(exc: Exception) -> str:
    """An exception as a run-time message: the type name first, except for the language's own errors
    (:class:`StaticError`, :class:`RunError`), whose messages already say what failed."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, (StaticError, RunError)) else text
