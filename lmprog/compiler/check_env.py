"""What the semantic checks share: the environment of names, the checker's interface, message helpers.

:mod:`lmprog.compiler.checks` walks the program; :mod:`lmprog.compiler.check_args` (``infer`` / ``sample``
arguments) and :mod:`lmprog.compiler.check_constraints` (``where`` clauses) check parts of it and call back into
the walker through the :class:`CheckContext` interface. All three import this module, and the two part checkers
never import :mod:`lmprog.compiler.checks`, so the checks have no import cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from lmprog.dsl import ast as A
from lmprog.dsl.source import SourceFile, Span

UNKNOWN = object()
"""The value of an expression the checker cannot compute before the run."""


@dataclass(frozen=True)
class Binding:
    """What a name means at a point of the program.

    ``kind``: input, let, hole, sample, loop, module, function, model (``model judge = "..."``). ``static``: its value is known before the run
    (inputs, and lets of static values outside branches and loops); ``value`` is that value when the checker
    knows it (literals), else UNKNOWN. ``maybe``: the span of the ``if`` after which it may be undefined.
    """

    kind: str
    type: str
    span: Span
    static: bool = False
    value: Any = UNKNOWN
    maybe: Optional[Span] = None


Env = dict[str, Binding]


@dataclass(frozen=True)
class Ctx:
    """Where a statement is: at the top level, inside how many loops, inside an if branch."""

    top: bool = True
    loops: int = 0
    branch: bool = False


KIND_WORD = {"input": "an input", "let": "a let variable", "hole": "a hole", "sample": "a sampled value",
             "loop": "a loop variable", "module": "an imported module", "function": "a function",
             "model": "a declared model"}
"""A binding kind in a message: ``'x' is a hole``."""


class CheckContext(Protocol):
    """The part of the checker (:class:`lmprog.compiler.checks.Checker`) the part checkers use."""

    source: SourceFile
    base_dir: Path

    def error(self, span: Span, message: str, help: Optional[str] = None,
              source_line: Optional[str] = None) -> None: ...

    def expr(self, e: A.Expr, env: Env) -> str: ...

    def fold(self, e: A.Expr, env: Env, report: bool = True) -> Any: ...

    def module_attribute(self, e: A.Attribute, env: Env) -> bool: ...

    def python_signature(self, e: A.Call, name: str) -> None: ...

    def require_static(self, e: A.Expr, env: Env, what: str) -> bool: ...

    def resolve(self, path: str) -> Path: ...


def show_value(value: Any) -> str:
    """A value as a message shows it (``.lmp`` spelling, at most about 40 characters)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value[:40] + ('..."' if len(value) > 40 else '"')
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def regex_span(ck: CheckContext, e: A.Expr, pos: Optional[int]) -> Span:
    """The span of character ``pos`` of a regex literal, when it maps exactly onto the source; else ``e``'s."""
    span = e.span
    if pos is None or not isinstance(e, A.Str) or span.line != span.end_line or span.line <= 0:
        return span
    line = ck.source.line_text(span.line)
    token = line[span.col - 1:span.end_col - 1]
    m = re.match(r"[rRfF]{0,2}(\"\"\"|'''|\"|')", token)
    if not m:
        return span
    body = token[m.end():len(token) - len(m.group(1))]
    if body[:pos + 1] != e.value[:pos + 1]:  # an escape before pos: columns do not match characters
        return span
    col = span.col + m.end() + pos
    return Span(span.file, span.line, col, span.line, col + 1)
