"""The front end's one exception type, :class:`LmpError`, and its located :class:`Diagnostic` s.

Every problem the front end finds in a program (syntax, names, types, constraints, strategies, files) becomes a
``Diagnostic``; ``LmpError`` carries all of them, sorted by position, so one run reports everything at once.
Rendered form (what ``lmprog check`` prints)::

    capital.lmp:7:18: unknown constraint 'maches' — did you mean 'matches'?
        where answer maches r"[A-Z][a-z]+"
                     ^^^^^^
        help: a constraint is one of: X matches r"...", X in [...], ...

The source line is copied into the diagnostic when it is made, so rendering needs no file access.
"""

from __future__ import annotations

import difflib
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from lmprog.dsl.source import Span

TAB_WIDTH = 4
MAX_SHOWN = 100  # widest source excerpt shown under a message


@dataclass(frozen=True)
class Diagnostic:
    """One located problem: where, what, and (optionally) what would be valid."""

    span: Span
    message: str
    help: str | None = None
    source_line: str | None = None

    @property
    def file(self) -> str:
        return self.span.file

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def col(self) -> int:
        return self.span.col

    def render(self) -> str:
        """``FILE:LINE:COL: message``, the source line, a caret span, then the help line if any."""
        where = str(self.span) if self.span.line > 0 else self.span.file  # no position: a file-level problem
        out = [f"{where}: {one_line(self.message)}"]
        if self.source_line is not None and self.span.line > 0:
            shown, carets = _caret_line(self.source_line, self.span)
            out.append("    " + shown)
            out.append("    " + carets)
        if self.help:
            out.extend("    help: " + line if i == 0 else "          " + line
                       for i, line in enumerate(self.help.splitlines()))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class LmpError(Exception):
    """A program is invalid; ``diagnostics`` lists every problem found (sorted by file, line, column)."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        unique = list(dict.fromkeys(diagnostics))  # identical reports from two passes count once
        unique.sort(key=lambda d: (d.span.file, d.span.line, d.span.col, d.message))
        self.diagnostics: tuple[Diagnostic, ...] = tuple(unique)
        super().__init__(self.render())

    def render(self) -> str:
        """Every diagnostic, except that a message repeated more than :data:`MAX_REPEATS` times is shown that
        many times and then counted (``"[x]"`` on 1000 lines is one mistake, not 999 screens)."""
        n = len(self.diagnostics)
        body = "\n".join(_collapse(self.diagnostics))
        return body if n <= 1 else f"{body}\n{n} errors"

    def __str__(self) -> str:
        return self.render()


MAX_REPEATS = 3  # diagnostics with the same message and help shown before the rest are counted


def _collapse(diagnostics: Sequence[Diagnostic]) -> list[str]:
    """Rendered diagnostics, in order, with the repeats of a (file, message, help) past the first
    :data:`MAX_REPEATS` left out and summarised after the last shown one (with the lines they are on)."""
    groups: dict[tuple, list[Diagnostic]] = {}
    for d in diagnostics:
        groups.setdefault((d.span.file, d.message, d.help), []).append(d)
    out = []
    for d in diagnostics:
        group = groups[(d.span.file, d.message, d.help)]
        index = next(i for i, g in enumerate(group) if g is d)
        if index < MAX_REPEATS:
            out.append(d.render())
        if index == MAX_REPEATS - 1 and len(group) > MAX_REPEATS:
            rest = group[MAX_REPEATS:]
            lines = ", ".join(str(r.span.line) for r in rest[:5]) + (", ..." if len(rest) > 5 else "")
            out.append(f"... and {len(rest)} more like this (lines {lines})")
    return out


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``), so that a message quoting
    the user's text (a token with a newline in it) stays on its line."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch == "\t":  # a tab does not break the line
            out.append(ch)
        elif ch in "\n\r":
            out.append("\\n" if ch == "\n" else "\\r")
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def utf8_diagnostic(path: str, data: bytes, exc: UnicodeDecodeError) -> Diagnostic:
    """The located diagnostic for a program file that is not valid UTF-8: the position of the first bad byte,
    and the line it is on with the bad bytes shown as U+FFFD, so the caret has something to point at."""
    from lmprog.dsl.source import Span

    before = data[:exc.start]
    line = before.count(b"\n") + 1
    line_start = before.rfind(b"\n") + 1
    line_end = data.find(b"\n", exc.start)
    raw_line = data[line_start:] if line_end < 0 else data[line_start:line_end]
    col = len(data[line_start:exc.start].decode("utf-8", "replace")) + 1
    shown = raw_line.decode("utf-8", "replace").rstrip("\r")
    return Diagnostic(Span(path, line, col, line, col + 1), f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                      "save the program as UTF-8", shown)


def _width(ch: str) -> int:
    """Display columns of one character (tabs are expanded by the caller)."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _caret_line(line: str, span: Span) -> tuple[str, str]:
    """The line as displayed (tabs expanded) and a caret line under ``span``'s part of it."""
    shown: list[str] = []
    starts: list[int] = []  # display column where each character starts
    pos = 0
    for ch in line:
        starts.append(pos)
        if ch == "\t":
            step = TAB_WIDTH - pos % TAB_WIDTH
            shown.append(" " * step)
        elif not ch.isprintable():
            step = 1
            shown.append("?")  # control characters would garble the terminal
        else:
            step = _width(ch)
            shown.append(ch)
        pos += step
    starts.append(pos)
    first = min(max(span.col - 1, 0), len(line))
    if span.end_line == span.line:
        last = min(max(span.end_col - 1, first + 1), len(line))
    else:
        last = len(line)
    begin = starts[first]
    end = starts[last] if last > first else begin + 1
    text = "".join(shown).rstrip()
    if len(text) > MAX_SHOWN:  # show a window around the caret rather than a screenful of one line
        left = max(0, min(begin - 20, len(text) - MAX_SHOWN))
        right = left + MAX_SHOWN
        cut_left, cut_right = ("..." if left > 0 else ""), ("..." if right < len(text) else "")
        text = cut_left + text[left:right] + cut_right
        begin, end = begin - left + len(cut_left), min(end, right) - left + len(cut_left)
    return text, " " * begin + "^" * max(end - begin, 1)


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (difflib ratio >= cutoff, case-insensitive), or None."""
    pool = sorted(set(candidates))
    lowered = {c.lower(): c for c in pool}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[hits[0]] if hits else None


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """`` — did you mean 'x'?`` or '' (to append to a message)."""
    best = did_you_mean(word, candidates)
    return f" — did you mean '{best}'?" if best else ""


def one_of(names: Sequence[str]) -> str:
    """``a, b or c`` for help lines."""
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " or " + names[-1]
