"""A program's input values: coerced to their declared types, defaults filled in, errors located.

``input NAME: TYPE [= DEFAULT]`` declares an input; :func:`resolve_inputs` turns the values a run is given
(``Program.run`` keyword arguments, ``--set NAME=VALUE``, a batch row) into every input's value, and reports
each missing, unknown or ill-typed input at once, located at its ``input`` statement.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lmprog.compiler.errors import LoweringError, diagnostic, file_span
from lmprog.dsl.errors import suggestion

__all__ = ["coerce_input", "resolve_inputs"]


def coerce_input(spec, value: Any, from_text: bool = False) -> Any:
    """``value`` as the input's declared type. ``from_text``: the value came from ``--set NAME=VALUE``."""
    import json

    typ = spec.type
    if from_text and isinstance(value, str):
        if typ == "str":
            return value
        if typ == "bool":
            low = value.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if typ == "int":
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if typ == "float":
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if typ == "list":
            try:
                parsed = json.loads(value)
            except ValueError:
                raise ValueError(f"expected a JSON list such as [\"a\", \"b\"], got {value!r}") from None
            value = parsed
    if typ == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if typ == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"expected true or false, got {value!r}")
        return bool(value)
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if typ == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__} {value!r}")
        return value
    return value


def resolve_inputs(program, given: Mapping[str, Any], from_text: bool = False) -> dict[str, Any]:
    """Every input's value (given, else its default). Raises :class:`LoweringError` naming each missing,
    unknown or ill-typed input, located at its ``input`` statement."""
    diags = []
    out: dict[str, Any] = {}
    anchor = file_span(program)
    for name in given:
        if name not in program.inputs:
            valid = ", ".join(program.inputs) or "none"
            diags.append(diagnostic(program, anchor,
                                    f"unknown input '{name}'" + suggestion(str(name), program.inputs),
                                    f"the program's inputs: {valid}"))
    for name, spec in program.inputs.items():
        if name in given:
            try:
                out[name] = coerce_input(spec, given[name], from_text)
            except ValueError as exc:
                diags.append(diagnostic(program, spec.span, f"bad value for input '{name}' ({spec.type}): {exc}"))
        elif spec.required:
            diags.append(diagnostic(program, spec.span, f"missing required input '{name}' ({spec.type})",
                                    f"set it with --set {name}=VALUE, or {name}=... in Program.run"))
        else:
            out[name] = spec.default
    if diags:
        raise LoweringError(diags)
    return out
