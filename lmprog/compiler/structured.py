"""JSON Schema and Lark grammars as regular languages: ``json(X)``, ``json(X, schema=...)``, ``grammar(X, ...)``.

Both compile to one regex (the constraint regex dialect of :mod:`lmprog.compiler.regex_compile`), which then takes
the path of every ``matches`` constraint: byte DFA, terminator, token automaton. So the exactness contract of
regex holes holds as it is (docs/constraints.md, "JSON and grammars").

* :func:`schema_regex` — a JSON Schema document (a parsed ``dict``/``bool``) to a regex of the JSON texts that
  validate. The supported keywords, the whitespace policy (:data:`WS`) and the depth bound for "any JSON value"
  (:data:`ANY_JSON_DEPTH`) are documented there and in docs/constraints.md. An unsupported keyword is a
  :class:`StructureError` that lists every one, with its JSON pointer.
* :func:`grammar_regex` — a Lark grammar's ``start`` language, read scannerless (every terminal is a regex over
  characters; ``%ignore`` terminals may occur before, between and after terminals), when no rule is recursive.

A language that is context-free but not regular (a recursive ``$ref``, a recursive rule) raises
:class:`NeedsHostMatcher` from :func:`context_free`, the one place that decides it; :func:`is_context_free` asks
it, and :func:`lmprog.compiler.constraints.compile_hole` then compiles the hole for the host matcher
(llguidance behind :class:`lmprog.automata.HoleConstraints`: :mod:`lmprog.compiler.host_hole`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from lmprog.compiler.bytedfa import escape_regex

__all__ = ["ANY_JSON_DEPTH", "WS", "GrammarLocation", "NeedsHostMatcher", "StructureError", "context_free",
           "grammar_regex", "is_context_free", "load_schema", "schema_regex"]

WS = " ?"
"""Whitespace policy of JSON holes: no whitespace anywhere except at most one space after each ``,`` and ``:``
(``{"a": 1, "b": [1,2]}`` and ``{"a":1,"b":[1, 2]}`` both match). No newlines, no indentation."""

ANY_JSON_DEPTH = 3
"""Where a schema allows any JSON value (``json(X)`` without a schema, ``{}``, ``true``, ``additionalProperties:
true``, an array without ``items``), values nest at most this many arrays/objects deep (counted from there):
any JSON value is context-free, this bound makes it regular."""

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))'
"""One character of a JSON string: unescaped (not ``"``, ``\\``, a control character), a short escape, or a
``\\uXXXX`` escape of a non-surrogate (so each item is exactly one character of the value: lengths are exact)."""
SAFE_CHAR = r'[^"\\\x00-\x1f]'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
SCALAR = f"(?:{STRING}|{NUMBER}|true|false|null)"

_YEAR = "[0-9]{4}"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
    "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
"""The ``format`` values a string schema may have (each a regex of JSON-safe characters, RFC 3339 for dates and
times, with the real days of each month and leap years)."""

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly",
               "writeOnly", "deprecated"}
"""Keywords that do not constrain a value (ignored)."""
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
             "uniqueItems"}
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
_OBJECT_KW = {"properties", "required", "additionalProperties"}
_ARRAY_KW = {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}
_STRING_KW = {"minLength", "maxLength", "pattern", "format"}
_NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


class StructureError(ValueError):
    """A schema or grammar that cannot be compiled. ``where``: a JSON pointer (``#/properties/age``) for
    schemas, a :class:`GrammarLocation` in the grammar file for grammars (or None)."""

    def __init__(self, message: str, where: Any = None, help: Optional[str] = None):
        self.message, self.where, self.help = message, where, help
        super().__init__(message)


class NeedsHostMatcher(StructureError):
    """The language is context-free, not regular: the hole runs on the host matcher (raised by the regex
    translators; :func:`is_context_free` turns it into the path decision)."""


@dataclass(frozen=True)
class GrammarLocation:
    """A position in a grammar file (1-based line and column, ``length`` characters for the caret)."""

    line: int
    col: int
    length: int = 1


def context_free(kind: str, cycle: list[str], where: Any) -> NeedsHostMatcher:
    """The one decision that a ``json()`` / ``grammar()`` language is context-free (a ``$ref`` or a rule that
    reaches itself: ``cycle``), hence not compiled to an automaton: the hole takes the host path
    (:func:`is_context_free`)."""
    path = " -> ".join(cycle)
    what = f"schema is recursive at {cycle[-1]}" if kind == "schema" else f"rule '{cycle[-1]}' is recursive"
    return NeedsHostMatcher(
        f"{what} ({path}): a context-free language, matched on the host (llguidance)",
        where, "unroll the recursion to a fixed depth for the device path (a regular language)")


def is_context_free(c) -> bool:
    """Whether a ``JsonSchema`` / ``Grammar`` IR constraint's language is context-free, not regular (a recursive
    ``$ref`` or rule): its hole then runs on the host matcher. Other errors are left to the regex path."""
    from lmprog.compiler.constraint_ir import Grammar, JsonSchema

    try:
        if isinstance(c, JsonSchema):
            schema_regex(load_schema(c.text) if c.schema else True)
        elif isinstance(c, Grammar):
            grammar_regex(c.text, c.file or c.path)
        else:
            return False
    except NeedsHostMatcher:
        return True
    except (StructureError, ValueError):
        return False
    return False


# ============================================================================================= JSON Schema


def load_schema(text: str) -> Any:
    """Parse a schema file's text (``ValueError`` with the JSON parser's message when it is not JSON)."""
    return json.loads(text)


def schema_regex(schema: Any = True, *, any_depth: int = ANY_JSON_DEPTH) -> str:
    """The regex of the JSON texts (in the whitespace policy :data:`WS`) whose value validates against
    ``schema`` (a parsed JSON Schema; ``True``: any JSON value, nested at most ``any_depth`` deep).

    Raises :class:`StructureError` (unsupported keywords, all listed, each with its JSON pointer; a schema that
    admits no value) or :class:`NeedsHostMatcher` (a recursive ``$ref``)."""
    return _schema_regex_cached(json.dumps(schema, sort_keys=False), any_depth)


@lru_cache(maxsize=256)
def _schema_regex_cached(text: str, any_depth: int) -> str:
    t = _SchemaTranslator(json.loads(text), any_depth)
    out = t.schema(t.root, "#")
    if t.unsupported:
        listed = ", ".join(f"{kw} at {ptr}" for kw, ptr in t.unsupported)
        kws = sorted({kw for kw, _ in t.unsupported})
        raise StructureError(f"unsupported JSON Schema keyword{'s' if len(kws) > 1 else ''} {', '.join(kws)} "
                             f"({listed})", t.unsupported[0][1],
                             "the supported keywords are listed in docs/constraints.md, \"JSON and grammars\"")
    if out is None:
        raise StructureError("the schema admits no JSON value", "#")
    return out


def _any_json(depth: int) -> str:
    value = SCALAR
    for _ in range(depth):
        value = (f"(?:{SCALAR}|\\[(?:{value}(?:,{WS}{value})*)?\\]"
                 f"|\\{{(?:{STRING}:{WS}{value}(?:,{WS}{STRING}:{WS}{value})*)?\\}})")
    return value


def _alt(parts: list[Optional[str]]) -> Optional[str]:
    parts = [p for p in dict.fromkeys(parts) if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _literal(v: Any) -> str:
    """The regex of a JSON value written compactly (with the optional spaces of :data:`WS`)."""
    if isinstance(v, dict):
        items = [f"{escape_regex(json.dumps(k, ensure_ascii=False))}:{WS}{_literal(x)}" for k, x in v.items()]
        return r"\{" + f",{WS}".join(items) + r"\}"
    if isinstance(v, list):
        return r"\[" + f",{WS}".join(_literal(x) for x in v) + r"\]"
    return escape_regex(json.dumps(v, ensure_ascii=False))


def _types_of(v: Any) -> set[str]:
    if v is None:
        return {"null"}
    if isinstance(v, bool):
        return {"boolean"}
    if isinstance(v, int):
        return {"integer", "number"}
    if isinstance(v, float):
        return {"number", "integer"} if v.is_integer() else {"number"}
    if isinstance(v, str):
        return {"string"}
    return {"array"} if isinstance(v, list) else {"object"}


def _value_key(v: Any) -> str:
    """Equal JSON values (``1 == 1.0``, key order) have equal keys; ``true`` and ``1`` do not."""
    def norm(x):
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        if isinstance(x, list):
            return [norm(y) for y in x]
        return x
    return json.dumps(norm(v), sort_keys=True)


class _SchemaTranslator:
    def __init__(self, root: Any, any_depth: int):
        self.root = root
        self.any_depth = any_depth
        self.unsupported: list[tuple[str, str]] = []
        self.stack: list[str] = []  # $ref targets being expanded (recursion detection)

    # ---- helpers

    def fail(self, message: str, ptr: str, help: Optional[str] = None):
        raise StructureError(message, ptr, help)

    def unsupported_kw(self, kw: str, ptr: str):
        if (kw, ptr) not in self.unsupported:
            self.unsupported.append((kw, ptr))

    def resolve(self, ref: Any, ptr: str) -> tuple[Any, str]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.fail(f"$ref {ref!r} is not supported: only references inside the schema file (#/...) are", ptr)
        node = self.root
        parts = [p for p in ref[1:].split("/")][1:] if ref not in ("#", "#/") else []
        for raw in parts:
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                self.fail(f"$ref {ref!r} points to nothing in the schema", ptr)
        return node, "#" + ("/" + "/".join(parts) if parts else "")

    # ---- schemas

    def schema(self, s: Any, ptr: str) -> Optional[str]:
        """The regex of schema ``s`` at JSON pointer ``ptr`` (None: no value validates)."""
        if s is True or s == {}:
            return _any_json(self.any_depth)
        if s is False:
            return None
        if not isinstance(s, dict):
            self.fail(f"a schema must be an object or a boolean, not {json.dumps(s)[:40]}", ptr)
        for kw in s:
            if kw not in SUPPORTED and kw not in ANNOTATIONS:
                self.unsupported_kw(kw, ptr)
        if s.get("uniqueItems") not in (None, False):
            self.unsupported_kw("uniqueItems", ptr)
        if "$ref" in s:
            target, tptr = self.resolve(s["$ref"], ptr)
            if tptr in self.stack:
                cycle = self.stack[self.stack.index(tptr):] + [tptr]
                raise context_free("schema", cycle, ptr)
            self.stack.append(tptr)
            try:
                ref = self.schema(target, tptr)
            finally:
                self.stack.pop()
            rest = {k: v for k, v in s.items() if k not in ("$ref", "$defs", "definitions") and k not in ANNOTATIONS}
            if rest:
                self.fail("a schema with $ref and other keywords is not supported (" + ", ".join(rest) + ")", ptr,
                          "move the other keywords into the referenced schema, or use allOf with one item")
            return ref
        if "allOf" in s:
            items = s["allOf"]
            if not isinstance(items, list) or len(items) != 1:
                self.fail("allOf is supported with exactly one schema (intersections are not)", ptr + "/allOf")
            rest = {k: v for k, v in s.items() if k not in ("allOf", "$defs", "definitions") and k not in ANNOTATIONS}
            if rest:
                self.fail("allOf with other keywords beside it is not supported", ptr)
            return self.schema(items[0], ptr + "/allOf/0")
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self.alternatives(s, key, ptr)
        if "enum" in s or "const" in s:
            return self.enum(s, ptr)
        return self.typed(s, ptr)

    def alternatives(self, s: dict, key: str, ptr: str) -> Optional[str]:
        items = s[key]
        if not isinstance(items, list) or not items:
            self.fail(f"{key} must be a non-empty list of schemas", ptr + "/" + key)
        rest = {k: v for k, v in s.items() if k not in (key, "$defs", "definitions") and k not in ANNOTATIONS}
        if rest:
            self.fail(f"{key} with other keywords beside it ({', '.join(rest)}) is not supported", ptr,
                      f"move them into every alternative of {key}")
        if key == "oneOf":
            for i in range(len(items)):
                for j in range(i + 1, len(items)):
                    if not self.disjoint(items[i], items[j]):
                        self.fail(f"oneOf: alternatives {i} and {j} may both match a value, and oneOf then rejects "
                                  "it; only alternatives that are evidently disjoint (different types, different "
                                  "const/enum values, or a required property with different const/enum values) "
                                  "are supported", f"{ptr}/oneOf", "use anyOf if a value may match several")
        return _alt([self.schema(x, f"{ptr}/{key}/{i}") for i, x in enumerate(items)])

    def _deref(self, s: Any) -> Any:
        seen = 0
        while isinstance(s, dict) and "$ref" in s and seen < 64:
            s, _ = self.resolve(s["$ref"], "#")
            seen += 1
        return s

    def _values(self, s: Any) -> Optional[list]:
        s = self._deref(s)
        if isinstance(s, dict):
            if "const" in s:
                return [s["const"]]
            if isinstance(s.get("enum"), list):
                return list(s["enum"])
        return None

    def _type_set(self, s: Any) -> Optional[set[str]]:
        s = self._deref(s)
        if not isinstance(s, dict):
            return None
        values = self._values(s)
        if values is not None:
            return set().union(*(_types_of(v) for v in values)) if values else set()
        t = s.get("type")
        if t is None:
            inferred = self._inferred_types(s)
            return set(inferred) if inferred else None
        out = set(t if isinstance(t, list) else [t])
        if "number" in out:
            out.add("integer")
        if "integer" in out:
            out.add("number")
        return out

    def disjoint(self, a: Any, b: Any) -> bool:
        """A sufficient condition for no value to validate against both ``a`` and ``b``."""
        ta, tb = self._type_set(a), self._type_set(b)
        if ta is not None and tb is not None and not ta & tb:
            return True
        va, vb = self._values(a), self._values(b)
        if va is not None and vb is not None and not {_value_key(v) for v in va} & {_value_key(v) for v in vb}:
            return True
        a, b = self._deref(a), self._deref(b)
        if isinstance(a, dict) and isinstance(b, dict):
            pa, pb = a.get("properties") or {}, b.get("properties") or {}
            both_required = set(a.get("required") or []) & set(b.get("required") or [])
            for name in both_required:
                if name in pa and name in pb and self.disjoint(pa[name], pb[name]):
                    return True
        return False

    def enum(self, s: dict, ptr: str) -> Optional[str]:
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list):
            self.fail("enum must be a list", ptr + "/enum")
        if "const" in s and "enum" in s:
            keep = {_value_key(v) for v in s["enum"]}
            values = [v for v in values if _value_key(v) in keep]
        rest = {k: v for k, v in s.items() if k not in ("enum", "const", "$defs", "definitions")
                and k not in ANNOTATIONS}
        lits = [_literal(v) for v in values]
        if rest:  # every other keyword filters the values: keep those whose text the rest of the schema accepts
            from lmprog.compiler.bytedfa import regex_fullmatch

            other = self.schema(rest, ptr)
            lits = [lit for lit, v in zip(lits, values)
                    if other is not None and regex_fullmatch(other, json.dumps(v, ensure_ascii=False,
                                                                               separators=(",", ":")))]
        return _alt(lits)

    def _inferred_types(self, s: dict) -> list[str]:
        kws = set(s)
        return [t for t, group in (("object", _OBJECT_KW), ("array", _ARRAY_KW - {"uniqueItems"}),
                                   ("string", _STRING_KW), ("number", _NUMBER_KW)) if kws & group]

    def typed(self, s: dict, ptr: str) -> Optional[str]:
        t = s.get("type")
        if t is None:
            # No type: read it from the keywords present (a schema with only "properties" is read as an
            # object), else any value.
            types = self._inferred_types(s)
            if not types:
                return _any_json(self.any_depth)
        else:
            types = t if isinstance(t, list) else [t]
            for x in types:
                if x not in TYPES:
                    self.fail(f"unknown type {json.dumps(x)} (expected one of {', '.join(TYPES)})", ptr + "/type")
            if "integer" in types and "number" in types:
                types = [x for x in types if x != "integer"]
        return _alt([self.one_type(x, s, ptr) for x in dict.fromkeys(types)])

    def one_type(self, t: str, s: dict, ptr: str) -> Optional[str]:
        if t == "null":
            return "null"
        if t == "boolean":
            return "(?:true|false)"
        if t == "string":
            return self.string(s, ptr)
        if t in ("integer", "number"):
            return self.number(s, ptr, t == "integer")
        if t == "array":
            return self.array(s, ptr)
        return self.object(s, ptr)

    # ---- strings

    def _count(self, s: dict, kw: str, ptr: str) -> Optional[int]:
        v = s.get(kw)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (isinstance(v, float) and
                                                                                not v.is_integer()):
            self.fail(f"{kw} must be a non-negative integer, not {json.dumps(v)}", f"{ptr}/{kw}")
        return int(v)

    def string(self, s: dict, ptr: str) -> Optional[str]:
        lo, hi = self._count(s, "minLength", ptr) or 0, self._count(s, "maxLength", ptr)
        fmt, pattern = s.get("format"), s.get("pattern")
        if hi is not None and hi < lo:
            return None
        if fmt is not None:
            if fmt not in FORMATS:
                self.fail(f"string format {json.dumps(fmt)} is not supported (supported: {', '.join(FORMATS)})",
                          ptr + "/format")
            if pattern is not None or "minLength" in s or "maxLength" in s:
                self.fail("format with pattern, minLength or maxLength is not supported", ptr)
            return f'"{FORMATS[fmt]}"'
        if pattern is not None:
            if "minLength" in s or "maxLength" in s:
                self.fail("pattern with minLength/maxLength is not supported", ptr,
                          "put the length into the pattern (e.g. ^[a-z]{2,10}$)")
            return '"' + self.pattern(pattern, ptr + "/pattern") + '"'
        rep = f"{{{lo},}}" if hi is None else (f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}")
        return f'"{STRING_CHAR}{rep}"' if rep != "{0,}" else STRING

    def pattern(self, p: Any, ptr: str) -> str:
        """A ``pattern`` (searched for in the string, as JSON Schema says) as a regex of the string's JSON text.
        The pattern's matches must be JSON-safe characters: ``.`` and negated classes are narrowed to them;
        any other character that JSON writes escaped (``"``, ``\\``, control characters) is an error."""
        from lmprog.compiler.bytedfa import ByteDFA
        from lmprog.compiler.regex_compile import RegexError

        if not isinstance(p, str):
            self.fail("pattern must be a string", ptr)
        body, start, end = p, False, False
        if _top_level_alternation(body):
            body = f"(?:{body})"
        if body.startswith("^"):
            body, start = body[1:], True
        if body.endswith("$") and not body.endswith("\\$"):
            body, end = body[:-1], True
        body = _narrow(body)
        try:
            dfa = ByteDFA.from_regex(body)
            if not dfa.intersect(ByteDFA.from_regex(f"{SAFE_CHAR}*").complement()).is_empty:
                self.fail(f"pattern {p!r} matches characters a JSON string must escape (\", \\ or control "
                          "characters); this is not supported", ptr, 'exclude them, e.g. [^"\\\\] instead of \\S')
        except RegexError as e:
            self.fail(f"pattern {p!r}: {e}", ptr)
        return ("" if start else f"{STRING_CHAR}*") + f"(?:{body})" + ("" if end else f"{STRING_CHAR}*")

    # ---- numbers

    def _bound(self, s: dict, kw: str, ptr: str):
        v = s.get(kw)
        if v is None or isinstance(v, bool) and kw.startswith("exclusive"):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(f"{kw} must be a number, not {json.dumps(v)}", f"{ptr}/{kw}")
        return v

    def number(self, s: dict, ptr: str, integer: bool) -> Optional[str]:
        lo, hi = self._bound(s, "minimum", ptr), self._bound(s, "maximum", ptr)
        lo_x, hi_x = False, False
        if s.get("exclusiveMinimum") is True:  # draft 4: a boolean beside minimum
            lo_x = lo is not None
        if s.get("exclusiveMaximum") is True:
            hi_x = hi is not None
        xlo, xhi = self._bound(s, "exclusiveMinimum", ptr), self._bound(s, "exclusiveMaximum", ptr)
        if xlo is not None and (lo is None or xlo >= lo):
            lo, lo_x = xlo, True
        if xhi is not None and (hi is None or xhi <= hi):
            hi, hi_x = xhi, True
        if integer:
            ilo = None if lo is None else (math.floor(lo) + 1 if lo_x else math.ceil(lo))
            ihi = None if hi is None else (math.ceil(hi) - 1 if hi_x else math.floor(hi))
            if lo is None and hi is None:
                return INTEGER
            return int_range(ilo, ihi)
        if lo is None and hi is None:
            return NUMBER
        for kw, v in (("minimum", lo), ("maximum", hi)):
            if v is not None and not float(v).is_integer():
                self.fail(f"a bound of a number must be an integer here ({kw} {v}); non-integer bounds are not "
                          "supported", ptr, "use an integer bound, or \"type\": \"integer\"")
        return number_range(None if lo is None else int(lo), lo_x, None if hi is None else int(hi), hi_x)

    # ---- arrays

    def array(self, s: dict, ptr: str) -> Optional[str]:
        lo, hi = self._count(s, "minItems", ptr) or 0, self._count(s, "maxItems", ptr)
        items = s.get("items", True)
        prefix = s.get("prefixItems", [])
        if isinstance(items, list):  # draft 4-2019: items as a list is a tuple
            prefix, items = items, s.get("additionalItems", True)
            if "additionalItems" in s:
                self.unsupported = [u for u in self.unsupported if u != ("additionalItems", ptr)]
        if not isinstance(prefix, list):
            self.fail("prefixItems must be a list of schemas", ptr + "/prefixItems")
        elems = [self.schema(x, f"{ptr}/prefixItems/{i}") for i, x in enumerate(prefix)]
        tail = self.schema(items, ptr + "/items")
        if tail is None:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and hi < lo:
            return None
        # Elements 0..k-1 use prefixItems, later ones items; the first `lo` are required.
        k = len(prefix)

        def rest(i: int) -> Optional[str]:
            """The regex of elements i.. (each after a comma), given i elements so far; None: impossible."""
            if i >= k:
                if tail is None:
                    return "" if i >= lo else None
                need = max(0, lo - i)
                more = None if hi is None else hi - i
                if more is not None and more < need:
                    return None
                rep = f"{{{need},}}" if more is None else f"{{{need},{more}}}"
                return "" if more == 0 else f"(?:,{WS}{tail}){rep}"
            if hi is not None and i >= hi:
                return "" if i >= lo else None
            e = elems[i]
            after = rest(i + 1)
            if e is None or after is None:
                return "" if i >= lo else None
            one = f",{WS}{e}{after}"
            return one if i < lo else f"(?:{one})?"

        if k == 0:
            if tail is None:
                return r"\[\]" if lo == 0 else None
            after = rest(1)
            first = None if after is None or (hi is not None and hi < 1) else f"{tail}{after}"
        else:
            after = rest(1)
            first = None if elems[0] is None or after is None or (hi is not None and hi < 1) else f"{elems[0]}{after}"
        if first is None:
            return r"\[\]" if lo == 0 else None
        return r"\[" + (f"{first}" if lo >= 1 else f"(?:{first})?") + r"\]"

    # ---- objects

    def object(self, s: dict, ptr: str) -> Optional[str]:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            self.fail("properties must be an object", ptr + "/properties")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(x, str) for x in required):
            self.fail("required must be a list of strings", ptr + "/required")
        missing = [r for r in required if r not in props]
        if missing and s.get("additionalProperties", not props) is False:
            return None
        if missing:
            self.fail(f"required properties that are not in properties are not supported ({', '.join(missing)})",
                      ptr + "/required", "list them under properties")
        # Absent additionalProperties: extra properties are not generated when properties are listed (every
        # value generated still validates); with no properties, any object.
        extra = s.get("additionalProperties", not props)
        extra_value = self.schema(extra, ptr + "/additionalProperties") if extra is not False else None
        members = []
        for name, sub in props.items():
            v = self.schema(sub, f"{ptr}/properties/{_pointer_escape(name)}")
            if v is None:
                if name in required:
                    return None
                continue
            members.append((f"{escape_regex(json.dumps(name, ensure_ascii=False))}:{WS}{v}", name in required))
        extra_member = None
        if extra_value is not None:
            key = _string_not_in(list(props))
            extra_member = f"{key}:{WS}{extra_value}"

        def tail(i: int) -> str:  # members i.., each after a comma
            out = ""
            for text, req in members[i:]:
                out += f",{WS}{text}" if req else f"(?:,{WS}{text})?"
            if extra_member is not None:
                out += f"(?:,{WS}{extra_member})*"
            return out

        # The first member present decides where the commas go: alternatives over which member comes first.
        firsts = []
        for i, (text, req) in enumerate(members):
            firsts.append(f"{text}{tail(i + 1)}")
            if req:
                break
        else:
            if extra_member is not None:
                firsts.append(f"{extra_member}(?:,{WS}{extra_member})*")
            firsts.append("")
        body = _alt([f for f in firsts if f]) or ""
        if "" in firsts and body:
            body = f"(?:{body})?"
        return r"\{" + body + r"\}"


def _pointer_escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _string_not_in(names: list[str]) -> str:
    """The regex of JSON strings written without escapes whose value is none of ``names`` (the keys of extra
    properties: never a declared property, so no duplicate key can override it)."""
    if not names:
        return STRING
    trie: dict = {}
    for n in names:
        node = trie
        for ch in n:
            node = node.setdefault(ch, {})
        node[""] = {}

    def other(node: dict) -> str:
        # strings (of safe characters) that are not in the trie below `node`, the empty one included unless
        # it is a word
        kids = [c for c in node if c]
        parts = [escape_regex(c) + other(node[c]) for c in kids]
        excl = "".join(escape_regex(c) for c in kids)
        parts.append(f'[^"\\\\\\x00-\\x1f{excl}]{SAFE_CHAR}*' if kids else f"{SAFE_CHAR}+")
        if "" not in node:
            parts.append("")
        body = "|".join(parts)
        return f"(?:{body})"

    return f'"{other(trie)}"'


def _top_level_alternation(p: str) -> bool:
    depth, i, cls = 0, 0, False
    while i < len(p):
        ch = p[i]
        if ch == "\\":
            i += 2
            continue
        if cls:
            cls = ch != "]"
        elif ch == "[":
            cls = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return True
        i += 1
    return False


def _narrow(p: str) -> str:
    """``.`` outside classes -> a JSON-safe character; negated classes exclude ``"``, ``\\`` and controls."""
    out, i, cls = [], 0, False
    while i < len(p):
        ch = p[i]
        if ch == "\\":
            out.append(p[i:i + 2])
            i += 2
            continue
        if cls:
            if ch == "]" and not (out and out[-1] in ("[", "[^")):
                cls = False
        elif ch == "[":
            cls = True
            if p.startswith("[^", i):
                out.append('[^"\\\\\\x00-\\x1f')
                i += 2
                if i < len(p) and p[i] == "]":  # []...] : a literal ]
                    out.append("\\]")
                    i += 1
                continue
        elif ch == ".":
            out.append(SAFE_CHAR)
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------------ number ranges


def _same_length(a: str, b: str) -> str:
    """Decimal strings of ``len(a) == len(b)`` digits between ``a`` and ``b`` (leading zeros allowed)."""
    if a == b:
        return a
    n = len(a) - 1
    if a[0] == b[0]:
        return a[0] + _same_length(a[1:], b[1:])
    if n == 0:
        return f"[{a}-{b}]"
    if a[1:] == "0" * n and b[1:] == "9" * n:
        return f"[{a[0]}-{b[0]}][0-9]{{{n}}}"
    parts = []
    lo_d, hi_d = int(a[0]), int(b[0])
    if a[1:] == "0" * n:
        lo_d -= 1  # the whole block of a[0] goes into the middle
    else:
        parts.append(a[0] + _same_length(a[1:], "9" * n))
    top = b[1:] == "9" * n
    mid_lo, mid_hi = lo_d + 1, hi_d if top else hi_d - 1
    if mid_lo <= mid_hi:
        d = str(mid_lo) if mid_lo == mid_hi else f"[{mid_lo}-{mid_hi}]"
        parts.append(f"{d}[0-9]{{{n}}}")
    if not top:
        parts.append(b[0] + _same_length("0" * n, b[1:]))
    return "(?:" + "|".join(parts) + ")"


def _positive_range(a: int, b: Optional[int]) -> Optional[str]:
    """Canonical decimals of the integers in ``[a, b]`` (``1 <= a``; ``b`` None: unbounded)."""
    if b is not None and b < a:
        return None
    parts = []
    top = len(str(b)) if b is not None else len(str(a))
    for length in range(len(str(a)), top + 1):
        lo = max(a, 10 ** (length - 1))
        hi = min(b, 10 ** length - 1) if b is not None else 10 ** length - 1
        if lo <= hi:
            parts.append(_same_length(str(lo), str(hi)))
    if b is None:
        parts.append(f"[1-9][0-9]{{{len(str(a))},}}")
    return _alt(parts)


def int_range(lo: Optional[int], hi: Optional[int]) -> Optional[str]:
    """The regex of the canonical JSON integers ``n`` with ``lo <= n <= hi`` (None: unbounded); ``-0`` is not
    written. None when the range is empty."""
    if lo is not None and hi is not None and lo > hi:
        return None
    parts = []
    if (lo is None or lo <= 0) and (hi is None or hi >= 0):
        parts.append("0")
    pos = _positive_range(max(lo, 1) if lo is not None else 1, hi) if hi is None or hi >= 1 else None
    neg = _positive_range(max(-hi, 1) if hi is not None else 1, -lo if lo is not None else None) \
        if lo is None or lo <= -1 else None
    if neg is not None:
        parts.append("-" + neg)
    if pos is not None:
        parts.append(pos)
    return _alt(parts)


def _magnitude(a: int, a_x: bool, b: Optional[int], b_x: bool) -> Optional[str]:
    """Decimals ``I(.F)?`` (no exponent) whose value ``m`` has ``a <(=) m <(=) b`` (``0 <= a``, integers)."""
    frac, zero, nonzero = r"(?:\.[0-9]+)?", r"(?:\.0+)?", r"\.[0-9]*[1-9][0-9]*"
    if b is not None and (b < a or (b == a and (a_x or b_x))):
        return None
    if b is not None and b == a:
        return f"{a}{zero}"
    parts = [f"{a}{nonzero}" if a_x else f"{a}{frac}"]
    middle = int_range(a + 1, None if b is None else b - 1)
    if middle is not None:
        parts.append(f"{middle}{frac}")
    if b is not None and not b_x:
        parts.append(f"{b}{zero}")
    return _alt(parts)


def number_range(lo: Optional[int], lo_x: bool, hi: Optional[int], hi_x: bool) -> Optional[str]:
    """The regex of JSON numbers without exponent in the range (integer bounds, ``*_x``: exclusive)."""
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_x):
        if lo is not None and lo >= 0:
            parts.append(_magnitude(lo, lo_x, hi, hi_x))
        else:
            parts.append(_magnitude(0, False, hi, hi_x))
    if lo is None or lo < 0:
        a, a_x = (0, True) if hi is None or hi >= 0 else (-hi, hi_x)
        m = _magnitude(a, a_x, None if lo is None else -lo, lo_x)
        parts.append(None if m is None else "-" + m)
    return _alt(parts)


# ============================================================================================== Lark grammars


_LARK_OVERRIDES = {
    # common.lark's string terminals use a lookbehind, which no automaton has; these are the same languages.
    "ESCAPED_STRING": r'"(?:[^"\\\n]|\\[^\n])*"',
    "_STRING_ESC_INNER": r'(?:[^"\\\n]|\\[^\n])*',
}


def grammar_regex(text: str, filename: str = "<grammar>", import_paths: Optional[list[str]] = None) -> str:
    """The regex of the sentences of a Lark grammar's ``start`` rule, read scannerless: terminals are regexes
    over characters, ``%ignore`` terminals may occur before, between and after terminals (what Lark's Earley
    parser with ``lexer="dynamic_complete"`` accepts). Rules must not be recursive (:func:`context_free`).

    Raises :class:`StructureError` with a :class:`GrammarLocation` (``where``) for errors in the file."""
    return _grammar_regex_cached(text, filename, tuple(import_paths or ()))


@lru_cache(maxsize=64)
def _grammar_regex_cached(text: str, filename: str, import_paths: tuple) -> str:
    from lark.exceptions import GrammarError, LarkError, UnexpectedInput
    from lark.load_grammar import load_grammar

    try:
        grammar, _ = load_grammar(text, filename, list(import_paths) or None, False)
    except UnexpectedInput as e:
        raise StructureError(f"invalid grammar: {_first_line(str(e))}",
                             GrammarLocation(max(e.line, 1), max(e.column, 1))) from None
    except (GrammarError, LarkError) as e:
        raise StructureError(f"invalid grammar: {_first_line(str(e))}", _guess_location(text, str(e))) from None
    return _LarkTranslator(grammar, text).run()


def _first_line(msg: str) -> str:
    msg = re.sub(r"\s+in \S+\s*:?\s*$", "", msg.strip().split("\n")[0])
    return msg.rstrip(": ")


def _guess_location(text: str, msg: str) -> GrammarLocation:
    m = re.search(r"line (\d+),? column (\d+)", msg)
    if m:
        return GrammarLocation(int(m.group(1)), int(m.group(2)))
    m = re.search(r"(?:Rule|Terminal|Using an undefined rule:|Using an undefined terminal:) '?([A-Za-z_][\w.]*)", msg)
    name = m.group(1) if m else None
    m2 = re.search(r"'([A-Za-z_]\w*)' defined more than once", msg)
    if m2:
        hits = [x for x in re.finditer(rf"^[?!]?{re.escape(m2.group(1))}\b", text, re.M)]
        if len(hits) > 1:
            return _loc_of(text, hits[1].start(), len(m2.group(1)))
    if name:
        hits = list(re.finditer(rf"(?<![\w.]){re.escape(name)}\b", text))
        uses = [h for h in hits if not re.match(rf"[?!]?{re.escape(name)}\s*[.:]", text[h.start():])]
        hit = (uses or hits or [None])[0]
        if hit is not None:
            return _loc_of(text, hit.start(), len(name))
    return GrammarLocation(1, 1)


def _loc_of(text: str, offset: int, length: int = 1) -> GrammarLocation:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return GrammarLocation(line, col, max(1, length))


class _LarkTranslator:
    def __init__(self, grammar, text: str):
        self.text = text
        self.terms = {str(name): tree for name, (tree, _prio) in grammar.term_defs}
        self.rules = {}
        self.where = {}
        for name, params, tree, _opts in grammar.rule_defs:
            self.rules[str(name)] = (params, tree)
            line, col = getattr(name, "line", None), getattr(name, "column", None)
            self.where[str(name)] = GrammarLocation(line, col, len(str(name))) if line else self.find(str(name))
        self.ignore = [str(x) for x in grammar.ignore]
        self.stack: list[str] = []
        self.term_cache: dict[str, str] = {}
        self.ign = ""

    def find(self, name: str) -> GrammarLocation:
        m = re.search(rf"^[?!]?{re.escape(name)}\b", self.text, re.M) or \
            re.search(rf"(?<![\w.]){re.escape(name.split('__')[-1])}\b", self.text)
        return _loc_of(self.text, m.start(), len(name)) if m else GrammarLocation(1, 1)

    def run(self) -> str:
        if "start" not in self.rules:
            raise StructureError("the grammar has no 'start' rule", GrammarLocation(1, 1),
                                 "the hole's value is a sentence of the rule named start")
        if self.ignore:
            self.ign = "(?:" + "|".join(f"(?:{self.terminal(n)})" for n in self.ignore) + ")*"
        return self.rule("start") + self.ign

    def rule(self, name: str) -> str:
        if name in self.stack:
            raise context_free("grammar", self.stack[self.stack.index(name):] + [name], self.where.get(name))
        if name not in self.rules:
            raise StructureError(f"rule '{name}' is used but not defined", self.find(name))
        params, tree = self.rules[name]
        if params:
            raise StructureError(f"rule '{name}' is a template; templates are not supported", self.where[name])
        self.stack.append(name)
        try:
            return self.tree(tree, in_rule=True, owner=name)
        finally:
            self.stack.pop()

    def terminal(self, name: str) -> str:
        if name in self.term_cache:
            return self.term_cache[name]
        short = name.split("__")[-1] if name not in _LARK_OVERRIDES else name
        if short in _LARK_OVERRIDES or name in _LARK_OVERRIDES:
            out = _LARK_OVERRIDES.get(name) or _LARK_OVERRIDES[short]
        else:
            if name not in self.terms:
                raise StructureError(f"terminal '{name}' is used but not defined", self.find(name))
            out = self.tree(self.terms[name], in_rule=False, owner=name)
        self.term_cache[name] = out
        return out

    def token(self, regex: str, in_rule: bool) -> str:
        return f"{self.ign}(?:{regex})" if in_rule else f"(?:{regex})"

    def tree(self, t, in_rule: bool, owner: str) -> str:
        from lark import Token, Tree
        from lark.grammar import NonTerminal, Terminal

        if isinstance(t, NonTerminal):
            return self.rule(t.name) if in_rule else self.unsupported("a rule inside a terminal", owner)
        if isinstance(t, Terminal):
            return self.token(self.terminal(t.name), in_rule)
        if isinstance(t, Token):
            return self.unsupported(f"the token {t!s}", owner)
        assert isinstance(t, Tree)
        d, ch = t.data, t.children
        if d == "expansions":
            return "(?:" + "|".join(self.tree(c, in_rule, owner) for c in ch) + ")"
        if d in ("expansion", "value"):
            return "".join(self.tree(c, in_rule, owner) for c in ch)
        if d == "alias":
            return self.tree(ch[0], in_rule, owner)
        if d == "maybe":
            return f"(?:{self.tree(ch[0], in_rule, owner)})?"
        if d == "expr":
            inner = self.tree(ch[0], in_rule, owner)
            op = str(ch[1])
            if op == "~":
                lo, hi = int(ch[2]), int(ch[3]) if len(ch) > 3 else int(ch[2])
                return f"(?:{inner}){{{lo},{hi}}}" if lo != hi else f"(?:{inner}){{{lo}}}"
            if op in ("*", "+", "?"):
                return f"(?:{inner}){op}"
            return self.unsupported(f"the operator {op}", owner)
        if d == "literal":
            return self.token(self.literal(ch[0], owner), in_rule)
        if d == "range":
            a, b = (self.literal(x, owner, raw=True) for x in ch)
            return self.token(f"[{_class_char(a)}-{_class_char(b)}]", in_rule)
        if d == "template_usage":
            return self.unsupported("templates", owner)
        return self.unsupported(f"'{d}'", owner)

    def literal(self, tok, owner: str, raw: bool = False) -> str:
        from lark.load_grammar import _literal_to_pattern
        from lark.lexer import PatternStr

        pattern = _literal_to_pattern(tok)
        flags = set(pattern.flags)
        if raw:
            return pattern.value
        if isinstance(pattern, PatternStr):
            body = escape_regex(pattern.value)
        else:
            body = pattern.value
        bad = flags - {"i", "s"}
        if bad:
            self.unsupported(f"the regex flag{'s' if len(bad) > 1 else ''} {''.join(sorted(bad))}", owner)
        for f in sorted(flags):
            body = f"(?{f}:{body})"
        return body

    def unsupported(self, what: str, owner: str):
        raise StructureError(f"{what} in '{owner}' is not supported", self.where.get(owner) or self.find(owner))


def _class_char(ch: str) -> str:
    return escape_regex(ch) if len(ch) == 1 else ch


def resolve_path(base: str, path: str) -> str:
    """``path`` relative to the folder ``base`` (absolute paths as they are)."""
    return path if os.path.isabs(path) else os.path.join(base, path)


# ================================================================================= IR constraints -> regexes


def schema_error_text(schema_path: str, e: StructureError) -> str:
    """The message of a schema error: which file, what, and where in the schema (its JSON pointer)."""
    where = f" (at {e.where})" if isinstance(e.where, str) and e.where not in e.message else ""
    name = f"JSON schema '{schema_path}'" if schema_path else "json()"
    return f"{name}: {e.message}{where}"


def grammar_span(file: str, text: str, where: Any):
    """The :class:`~lmprog.dsl.source.Span` of a :class:`GrammarLocation` in the grammar file ``file``."""
    from lmprog.dsl.source import Span

    loc = where if isinstance(where, GrammarLocation) else GrammarLocation(1, 1)
    return Span(file, loc.line, loc.col, loc.line, loc.col + loc.length)


def grammar_line(text: str, line: int) -> Optional[str]:
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[line - 1] if 1 <= line <= len(lines) else None


def constraint_regex(c) -> str:
    """The regex of a ``JsonSchema`` or ``Grammar`` IR constraint; a
    :class:`~lmprog.compiler.constraint_ir.ConstraintError` located at the ``json()`` call (schemas: the JSON
    pointer in the message) or in the grammar file (grammars)."""
    from lmprog.compiler.constraint_ir import ConstraintError, Grammar, JsonSchema

    if isinstance(c, JsonSchema):
        try:
            doc = load_schema(c.text) if c.schema else True
        except ValueError as e:
            raise ConstraintError(f"JSON schema file '{c.schema}' is not valid JSON: {e}", c.loc) from None
        try:
            return schema_regex(doc)
        except StructureError as e:
            raise ConstraintError(schema_error_text(c.schema, e), c.loc) from None
    if isinstance(c, Grammar):
        try:
            return grammar_regex(c.text, c.file or c.path)
        except StructureError as e:
            span = grammar_span(c.file or c.path, c.text, e.where) if c.file else c.loc
            raise ConstraintError(f"grammar '{c.path}': {e.message}", span) from None
    raise TypeError(f"not a json()/grammar() constraint: {c!r}")
