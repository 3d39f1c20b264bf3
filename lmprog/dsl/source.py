"""Source text, spans and the offset -> (line, column) mapping shared by the whole front end.

Conventions (used by every node and every diagnostic):

* ``line`` and ``col`` are 1-based; ``col`` counts characters (a tab is one character).
* A span is half-open: ``end_col`` is the column just *after* the last character, so a one-character token at
  column 5 has ``col=5, end_col=6``. Multi-line spans keep the end line/column of their last character.
* Source text is normalised before anything else reads it: a leading byte-order mark is dropped and ``\\r\\n`` /
  ``\\r`` become ``\\n`` (as Python does when it reads source), so offsets, lines and columns all refer to the
  same text.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Where a node or a diagnostic is in its file (1-based, end exclusive; see the module docstring)."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NO_SPAN = Span("<unknown>", 0, 0, 0, 0)


def normalize_source(text: str) -> str:
    """Drop a byte-order mark and turn every line ending into ``\\n``."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


class SourceFile:
    """A normalised program text with a line table, so any character offset maps to a :class:`Span`."""

    def __init__(self, name: str, text: str):
        self.name = name
        self.text = normalize_source(text)
        starts = [0]
        for i, ch in enumerate(self.text):
            if ch == "\n":
                starts.append(i + 1)
        self._line_starts = starts

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset (offsets past the end clamp to the end)."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self._line_starts, offset) - 1
        return line + 1, offset - self._line_starts[line] + 1

    def span(self, start: int, end: int) -> Span:
        """The span of ``text[start:end]`` (an empty range gets a one-column span for the caret)."""
        line, col = self.line_col(start)
        if end <= start:
            return Span(self.name, line, col, line, col + 1)
        end_line, end_col = self.line_col(end)
        return Span(self.name, line, col, end_line, end_col)

    def line_text(self, line: int) -> str:
        """The text of a 1-based line without its newline ('' for lines out of range)."""
        if line < 1 or line > len(self._line_starts):
            return ""
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start:] if end < 0 else self.text[start:end]
