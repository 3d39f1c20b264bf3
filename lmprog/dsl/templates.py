"""String literals: prefixes, quotes, backslash escapes, and the template language inside them.

A STRING token (see ``grammar.lark``) is split here into its prefix, quotes and body, then decoded in one of
three ways:

* a **plain string** (expressions, regexes, paths): backslash escapes as in Python unless the prefix has ``r``;
* an **f-string** in an expression (``f"...{x}..."``): as plain, plus ``{expr}`` / ``{expr:fmt}`` interpolation
  and ``{{`` / ``}}`` for literal braces;
* a **statement template** (a template statement or ``observe``): as an f-string (the ``f`` prefix is allowed
  and redundant), plus ``[name]`` holes and ``[[`` / ``]]`` for literal brackets.

Interpolated expressions are taken from the *source* text of the body (escapes are not applied inside
``{...}``, as in Python's f-strings), so their spans map one-to-one onto the file. A string nested inside an
interpolation must use the other quote character, as in Python before 3.12.

All problems are reported through ``ctx.report`` with exact offsets, and decoding carries on, so one template
with several mistakes yields several diagnostics.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from lmprog.dsl import ast as A
from lmprog.dsl.catalog import KEYWORDS

_SIMPLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t", "v": "\v"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


class Context(Protocol):
    """What decoding needs from the builder: located reports, spans, and the expression parser."""

    def report(self, start: int, end: int, message: str, help: Optional[str] = None) -> None: ...

    def span(self, start: int, end: int): ...

    def parse_expr(self, text: str, offset: int) -> Optional[A.Expr]: ...


@dataclass(frozen=True)
class StringToken:
    """A STRING token taken apart: lower-case prefix, quote (1 or 3 chars), body and the body's file offset."""

    prefix: str
    quote: str
    body: str
    body_offset: int

    @property
    def raw(self) -> bool:
        return "r" in self.prefix

    @property
    def is_f(self) -> bool:
        return "f" in self.prefix


def split_string_token(text: str, offset: int) -> StringToken:
    """Split the source text of a STRING token that starts at file offset ``offset``."""
    i = 0
    while i < len(text) and text[i] not in "'\"":
        i += 1
    prefix = text[:i].lower()
    quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else text[i]
    body = text[i + len(quote):len(text) - len(quote)]
    return StringToken(prefix, quote, body, offset + i + len(quote))


def decode_escape(body: str, i: int) -> tuple[Optional[str], int, Optional[str]]:
    """Decode the escape starting with the backslash at ``body[i]``.

    Returns (text, length consumed, error message or None). Unknown escapes keep the backslash, as Python does
    (so ``"\\d+"`` is the regex ``\\d+``).
    """
    if i + 1 >= len(body):
        return "\\", 1, None
    c = body[i + 1]
    if c == "\n":
        return "", 2, None  # backslash-newline continues the line
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], 2, None
    if c in "01234567":
        j = i + 1
        while j < len(body) and j < i + 4 and body[j] in "01234567":
            j += 1
        return chr(int(body[i + 1:j], 8)), j - i, None
    if c in _HEX_ESCAPES:
        n = _HEX_ESCAPES[c]
        digits = body[i + 2:i + 2 + n]
        if len(digits) < n or any(d not in "0123456789abcdefABCDEF" for d in digits):
            return None, 2 + len(digits.split(" ")[0]), f"invalid \\{c} escape: expected {n} hex digits"
        code = int(digits, 16)
        return _code_point(code, 2 + n, c)
    if c == "N":
        if body[i + 2:i + 3] != "{" or "}" not in body[i + 3:]:
            return None, 2, "invalid \\N escape: expected \\N{CHARACTER NAME}"
        end = body.index("}", i + 3)
        name = body[i + 3:end]
        try:
            return unicodedata.lookup(name), end + 1 - i, None
        except KeyError:
            return None, end + 1 - i, f"unknown Unicode character name {name!r} in \\N escape"
    return "\\" + c, 2, None


def _code_point(code: int, length: int, kind: str) -> tuple[Optional[str], int, Optional[str]]:
    if code > 0x10FFFF:
        return None, length, f"invalid \\{kind} escape: code point {code:#x} is beyond U+10FFFF"
    if 0xD800 <= code <= 0xDFFF:
        return None, length, f"invalid \\{kind} escape: surrogate code point {code:#x} is not a character"
    return chr(code), length, None


def decode_plain(tok: StringToken, ctx: Context) -> str:
    """The value of a plain (non-template) string literal."""
    if tok.raw:
        return tok.body
    out: list[str] = []
    i, body = 0, tok.body
    while i < len(body):
        if body[i] == "\\":
            text, length, err = decode_escape(body, i)
            if err:
                ctx.report(tok.body_offset + i, tok.body_offset + i + length, err)
            else:
                out.append(text)
            i += length
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def parse_parts(tok: StringToken, ctx: Context, holes: bool) -> tuple[A.Part, ...]:
    """Template parts of a string: Text, Interp and (when ``holes``) Hole, with spans; adjacent text merged."""
    parts: list[A.Part] = []
    buf: list[str] = []
    buf_start = -1
    body, base = tok.body, tok.body_offset

    def flush(end: int) -> None:
        nonlocal buf, buf_start
        if buf:
            parts.append(A.Text("".join(buf), span=ctx.span(base + buf_start, base + end)))
        buf, buf_start = [], -1

    def literal(text: str, at: int) -> None:
        nonlocal buf_start
        if buf_start < 0:
            buf_start = at
        buf.append(text)

    i = 0
    while i < len(body):
        c = body[i]
        nxt = body[i + 1:i + 2]
        if c == "\\" and not tok.raw:
            if nxt in ("{", "}") or (holes and nxt in ("[", "]")):
                double = nxt * 2
                ctx.report(base + i, base + i + 2, f"'\\{nxt}' is not an escape in a template",
                           f"write '{double}' for a literal '{nxt}'")
                literal(nxt, i)  # read it as the literal the writer meant, and go on
                i += 2
                continue
            text, length, err = decode_escape(body, i)
            if err:
                ctx.report(base + i, base + i + length, err)
            else:
                literal(text, i)
            i += length
        elif c == "{" and nxt == "{":
            literal("{", i)
            i += 2
        elif c == "}" and nxt == "}":
            literal("}", i)
            i += 2
        elif c == "{":
            flush(i)
            interp, i = _interpolation(tok, i, ctx)
            if interp is not None:
                parts.append(interp)
        elif c == "}":
            ctx.report(base + i, base + i + 1, "single '}' in a template", "write '}}' for a literal '}'")
            literal("}", i)
            i += 1
        elif holes and c == "[" and nxt == "[":
            literal("[", i)
            i += 2
        elif holes and c == "]" and nxt == "]":
            literal("]", i)
            i += 2
        elif holes and c == "[":
            flush(i)
            hole, i = _hole(tok, i, ctx)
            if hole is not None:
                parts.append(hole)
        elif holes and c == "]":
            ctx.report(base + i, base + i + 1, "single ']' in a template", "write ']]' for a literal ']'")
            literal("]", i)
            i += 1
        else:
            literal(c, i)
            i += 1
    flush(len(body))
    return tuple(parts)


def _hole(tok: StringToken, i: int, ctx: Context) -> tuple[Optional[A.Hole], int]:
    """``[name]`` starting at body index ``i``; returns the hole (or None after a report) and the next index."""
    body, base = tok.body, tok.body_offset
    end = i + 1
    while end < len(body) and body[end] not in "[]\n":
        end += 1
    if end >= len(body) or body[end] != "]":
        ctx.report(base + i, base + i + 1, "'[' starts a hole but is never closed",
                   "write [name] for a hole, or '[[' for a literal '['")
        return None, i + 1
    name = body[i + 1:end]
    if not name.isidentifier() or name in KEYWORDS:
        what = "a keyword" if name in KEYWORDS else "not a name"
        ctx.report(base + i, base + end + 1, f"invalid hole [{name}]: {what}" if name else "empty hole []",
                   "a hole is [name] with a plain name; write '[[' and ']]' for literal brackets")
        return None, end + 1
    return A.Hole(name, span=ctx.span(base + i, base + end + 1)), end + 1


def _interpolation(tok: StringToken, i: int, ctx: Context) -> tuple[Optional[A.Interp], int]:
    """``{expr}`` / ``{expr:fmt}`` starting at body index ``i``; returns the part and the next index."""
    body, base = tok.body, tok.body_offset
    end, colon, problem = scan_interpolation(body, i + 1)
    if problem is not None:
        at, message, help = problem
        ctx.report(base + at, base + at + 1, message, help)
        return None, (end + 1 if end is not None else len(body))
    assert end is not None
    expr_end = colon if colon is not None else end
    text = body[i + 1:expr_end]
    if not text.strip():
        ctx.report(base + i, base + end + 1, "empty expression in '{}'",
                   "write {name} to interpolate a value, or '{{' for a literal '{'")
        return None, end + 1
    fmt = body[colon + 1:end] if colon is not None else None
    # Newlines (triple-quoted templates) are plain whitespace inside {...}; same length keeps offsets exact.
    expr = ctx.parse_expr(text.replace("\n", " "), base + i + 1)
    if expr is None:
        return None, end + 1
    return A.Interp(expr, fmt, span=ctx.span(base + i, base + end + 1)), end + 1


_OPEN, _CLOSE = "([{", ")]}"


def scan_interpolation(body: str, start: int) -> tuple[Optional[int], Optional[int], Optional[tuple]]:
    """Find the ``}`` closing an interpolation whose expression starts at ``start``.

    Returns (index of the closing brace, index of the format-spec colon or None, problem or None) where a
    problem is (index, message, help). Quotes and brackets inside the expression are skipped as Python does.
    """
    depth = 0
    colon: Optional[int] = None
    i = start
    while i < len(body):
        c = body[i]
        if colon is not None:  # inside the format spec: plain text up to '}'
            if c == "}":
                return i, colon, None
            if c in "{[]\\'\"\n":
                return i, colon, (i, f"{c!r} is not allowed in a format spec", "a format spec is plain text such as .2f")
            i += 1
            continue
        if c in "'\"":
            j = _skip_string(body, i)
            if j is None:
                return None, None, (i, "unterminated string inside '{...}'", None)
            i = j
            continue
        if c == "#":
            return None, None, (i, "'#' is not allowed inside '{...}'", None)
        if c == "\\":
            return None, None, (i, "backslash outside a string inside '{...}'", None)
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            if depth == 0:
                if c == "}":
                    return i, None, None
                return None, None, (i, f"unmatched {c!r} inside '{{...}}'", None)
            depth -= 1
        elif c == ":" and depth == 0:
            colon = i
        elif c == "!" and depth == 0 and body[i + 1:i + 2] != "=":
            return None, None, (i, "conversions such as !r are not supported in templates",
                                "write {str(x)} or {x}")
        i += 1
    return None, None, (start - 1, "'{' is never closed", "write '{{' for a literal '{'")


def _skip_string(body: str, i: int) -> Optional[int]:
    """Index just after the string literal starting at ``body[i]`` (a quote), or None if unterminated."""
    quote = body[i:i + 3] if body[i:i + 3] in ('"""', "'''") else body[i]
    j = i + len(quote)
    while j < len(body):
        if body[j] == "\\":
            j += 2
            continue
        if body.startswith(quote, j):
            return j + len(quote)
        if len(quote) == 1 and body[j] == "\n":
            return None
        j += 1
    return None


# --------------------------------------------------------------------------------------------------- printing


def quote_text(value: str, quote: str = '"', template: bool = False, holes: bool = False,
               avoid: str = "") -> str:
    """Escape ``value`` for the inside of a ``quote``-delimited, non-raw string (canonical form).

    ``template`` doubles braces; ``holes`` also doubles square brackets; characters in ``avoid`` (the quote of
    an enclosing string, for strings inside ``{...}``) are escaped too.
    """
    out: list[str] = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == quote or ch in avoid:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif template and ch in "{}":
            out.append(ch * 2)
        elif holes and ch in "[]":
            out.append(ch * 2)
        elif not ch.isprintable() or unicodedata.category(ch) in ("Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def string_literal(value: str, quote: str = '"', avoid: str = "") -> str:
    """Canonical source of a plain string: raw when that is exact (keeps regexes readable), else escaped."""
    if "\\" in value and _raw_ok(value, quote) and not any(c in value for c in avoid):
        return "r" + quote + value + quote
    return quote + quote_text(value, quote, avoid=avoid) + quote


def _raw_ok(value: str, quote: str) -> bool:
    """Whether ``r"value"`` denotes exactly ``value``."""
    if quote in value or value.endswith("\\"):
        return False
    if any(not ch.isprintable() or ch in "\n\r\t" for ch in value):
        return False
    # A backslash before the closing quote or another backslash pairs with it in the lexer; the value is still
    # the literal text then, so only a trailing backslash (checked above) is a problem.
    return True


Reporter = Callable[[int, int, str, Optional[str]], None]
