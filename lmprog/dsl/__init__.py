"""The .lmp front end: text -> typed AST, with located errors.

Modules:

* :mod:`lmprog.dsl.source` — source text, :class:`Span` (1-based line/column, end exclusive);
* :mod:`lmprog.dsl.errors` — :class:`LmpError` (the one exception type) and :class:`Diagnostic`;
* :mod:`lmprog.dsl.parser` — ``parse(text, filename) -> Module`` and ``parse_expression``;
* :mod:`lmprog.dsl.syntax` — text -> lark tree (grammar ``lmprog/grammar.lark``), syntax errors;
* :mod:`lmprog.dsl.builder` — lark tree -> AST; :mod:`lmprog.dsl.templates` — strings, escapes, holes;
* :mod:`lmprog.dsl.constraints` — ``where`` expressions -> constraint nodes;
* :mod:`lmprog.dsl.ast` — the node classes; :mod:`lmprog.dsl.printer` — AST -> canonical source;
* :mod:`lmprog.dsl.catalog` — keywords, built-ins, distributions, strategies;
* :mod:`lmprog.dsl.static` — values known before the run.

The semantic checks are in :mod:`lmprog.compiler.checks`; the user-facing API is :mod:`lmprog.program`.
"""

from lmprog.dsl.errors import Diagnostic, LmpError
from lmprog.dsl.source import Span

__all__ = ["Diagnostic", "LmpError", "Span"]
