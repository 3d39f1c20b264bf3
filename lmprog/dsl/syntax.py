"""Text -> lark parse tree: the lark parser for ``grammar.lark``, the indentation postlexer, syntax errors.

:func:`parse_tree` runs lark on a program or on one expression (template interpolations are parsed on their
own, at their offset in the file) and turns every syntax error into an :class:`~lmprog.dsl.errors.LmpError` with
one located diagnostic. The AST is built from the tree by :mod:`lmprog.dsl.builder`; the entry points that do
both are in :mod:`lmprog.dsl.parser`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import lark
from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from lmprog.dsl.catalog import BUILTINS, CONSTRAINT_WORDS, KEYWORDS, STATEMENT_KEYWORDS
from lmprog.dsl.errors import Diagnostic, LmpError, did_you_mean, one_of
from lmprog.dsl.source import SourceFile
from lmprog.paths import cache_dir, write_atomic

#: Deepest nesting of the parse tree accepted (blocks and expressions); deeper input gets a clear error instead
#: of exhausting Python's recursion limit in the later passes.
MAX_DEPTH = 100

TAB_SIZE = 8  # Python's rule for tabs in indentation

_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}


class _IndentError(Exception):
    """Raised by the postlexer for indentation that matches no block."""

    def __init__(self, token: Token, message: str = "unindent does not match any outer indentation level",
                 help: str = "indent the line as far as the block it belongs to"):
        super().__init__(message)
        self.token, self.message, self.help = token, message, help


class _Indenter:
    """Postlexer: emits ``_INDENT`` / ``_DEDENT`` around blocks and drops newlines inside brackets.

    Lark's own ``Indenter`` asserts on an unmatched closing bracket and counts tabs crudely; this one leaves
    unmatched brackets to the parser (which reports them) and expands tabs to multiples of 8 as Python does.
    """

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        levels = [0]
        paren = 0
        last: Optional[Token] = None
        for tok in stream:
            last = tok
            if tok.type == "_NL":
                if paren > 0:
                    continue
                yield tok
                indent = tok.value.rsplit("\n", 1)[1] if "\n" in tok.value else ""
                width = len(indent.expandtabs(TAB_SIZE))
                if width > levels[-1]:
                    levels.append(width)
                    yield Token.new_borrow_pos("_INDENT", indent, tok)
                    continue
                while width < levels[-1]:
                    levels.pop()
                    yield Token.new_borrow_pos("_DEDENT", indent, tok)
                if width != levels[-1]:
                    raise _IndentError(Token.new_borrow_pos("_NL", tok.value, tok))
                continue
            if tok.type in _OPEN:
                paren += 1
            elif tok.type in _CLOSE:
                paren = max(0, paren - 1)
            yield tok
        while len(levels) > 1:
            levels.pop()
            yield Token.new_borrow_pos("_DEDENT", "", last) if last else Token("_DEDENT", "")


_LARK_OPTIONS = dict(parser="lalr", lexer="contextual", start=["start", "expr_only"], propagate_positions=True,
                     maybe_placeholders=True)


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    """The parser of ``grammar.lark``. Its LALR tables take ~0.1 s to build (a warm ``lmprog run`` takes a few
    seconds), so they are kept on disk (``cache_dir()/grammar/``, ``Lark.save``), keyed by the grammar, the
    options, this module and the lark and Python versions; a missing or damaged entry is built again."""
    grammar = resources.files("lmprog").joinpath("grammar.lark").read_text(encoding="utf-8")
    # The entry pickles the postlexer (an _Indenter): this module's source is part of the key.
    key = repr((grammar, sorted(_LARK_OPTIONS.items()), lark.__version__, sys.version_info[:2],
                hashlib.sha256(Path(__file__).read_bytes()).hexdigest()))
    path = cache_dir() / "grammar" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.lark"
    try:
        with open(path, "rb") as f:
            return Lark.load(f)
    except Exception:
        pass
    parser = Lark(grammar, postlex=_Indenter(), **_LARK_OPTIONS)
    if write_atomic(path, parser.save):
        for old in path.parent.glob("*.lark"):  # entries of other grammars or code: one is kept
            if old != path and not old.name.startswith(".tmp-"):  # not another process's entry being written
                old.unlink(missing_ok=True)
    return parser


# ---------------------------------------------------------------------------------------------- parse trees


def check_first_line(source: SourceFile) -> None:
    """The first statement starts at column 1 (later indentation is the postlexer's business)."""
    m = re.match(r"(?:[ \t\f]*(?:#[^\n]*)?\n)*([ \t\f]+)(?=[^\s#])", source.text)
    if m:
        raise LmpError([_diag(source, m.end(1), m.end(1) + 1, "unexpected indentation",
                              "the first statement starts at column 1")])


def parse_tree(source: SourceFile, text: str, base: int, start: str) -> Tree:
    """Run lark on ``text`` (which sits at offset ``base`` of ``source``); syntax errors become ``LmpError``."""
    try:
        tree = _lark().parse(text, start=start)
    except _IndentError as exc:
        tok = exc.token
        offset = base + (tok.end_pos if tok.type == "_NL" and tok.end_pos is not None else tok.start_pos or 0)
        raise LmpError([_diag(source, offset, offset + 1, exc.message, exc.help)]) from None
    except UnexpectedInput as exc:
        raise LmpError([syntax_diagnostic(exc, source, text, base, start)]) from None
    except LarkError as exc:  # anything else lark raises is still a syntax problem of this text
        raise LmpError([_diag(source, base, base + 1, f"syntax error: {exc}")]) from None
    depth = tree_depth(tree)
    if depth > MAX_DEPTH:
        offset = base + _too_deep_offset(tree)
        raise LmpError([_diag(source, offset, offset + 1,
                              f"the program is nested too deeply ({depth} levels; at most {MAX_DEPTH})",
                              "split the expression with let statements")])
    return tree


def _too_deep_offset(tree: Tree) -> int:
    """Offset in the parsed text of the first token below the first node deeper than ``MAX_DEPTH`` (where the
    nesting goes too deep), found without recursion; 0 if no token is there."""
    stack = [(tree, 1, 0)]
    while stack:
        node, depth, near = stack.pop()
        here = getattr(node.meta, "start_pos", None) if not node.meta.empty else None
        near = near if here is None else here  # an empty node (like `[]`) has no position: use its parent's
        if depth > MAX_DEPTH:
            return here if here is not None else (_first_token_offset(node) or near)
        stack.extend((c, depth + 1, near) for c in reversed(node.children) if isinstance(c, Tree))
    return 0


def _first_token_offset(node: Tree) -> int:
    """Start offset of the leftmost token under ``node`` (0 if it has none)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Token):
            if n.start_pos is not None:
                return n.start_pos
            continue
        if isinstance(n, Tree):  # (lark's placeholders for absent optional parts are None)
            stack.extend(reversed(n.children))
    return 0


def tree_depth(tree: Tree) -> int:
    """Depth of a lark tree, computed without recursion."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in node.children:
            if isinstance(child, Tree):
                stack.append((child, depth + 1))
    return deepest


def _diag(source: SourceFile, start: int, end: int, message: str, help: Optional[str] = None) -> Diagnostic:
    span = source.span(start, end)
    return Diagnostic(span, message, help, source.line_text(span.line))


# ---------------------------------------------------------------------------------------------- syntax errors

_NICE = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "the end of the line",
    "_INDENT": "an indented block", "_DEDENT": "the end of the block", "$END": "the end of the file",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '//' or '%'", "POW_OP": "'**'",
}
_EXPR_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "LBRACE", "TRUE", "FALSE", "NOT", "ADD_OP"}
_OPERATORS = {"ADD_OP", "MUL_OP", "POW_OP", "LESSTHAN", "MORETHAN", "__ANON_0", "__ANON_1", "__ANON_2",
              "__ANON_3", "IN", "NOT", "MATCHES", "AND", "OR", "IF", "LPAR", "LSQB", "DOT"}
_STATEMENT_TOKENS = {kw.upper() for kw in STATEMENT_KEYWORDS}
_PUNCTUATION_HINTS = {
    "&": "use 'and'", "|": "use 'or'", "!": "use 'not' (or '!=' for inequality)", ";": "write one statement per line",
    "$": None, "`": None, "?": "for a conditional write: a if condition else b", "@": None,
}
_PYTHON_STATEMENTS = {"def", "while", "print", "class", "with", "try", "lambda", "pass", "break", "continue",
                      "yield", "from", "global", "assert", "del", "raise"}


def _describe_terminal(name: str) -> str:
    if name in _NICE:
        return _NICE[name]
    for term in _lark().terminals:
        if term.name == name:
            value = getattr(term.pattern, "value", name)
            return f"'{value}'"
    return name.lower()


def _describe_expected(expected: set[str]) -> str:
    """A short human list of what the parser would have accepted."""
    items = set(expected)
    words: list[str] = []
    if {"NAME", "NUMBER", "STRING"} <= items:
        words.append("an expression")
        items -= _EXPR_START
    if {"ADD_OP", "MUL_OP"} <= items:
        words.append("an operator")
        items -= _OPERATORS
    if _STATEMENT_TOKENS & items and len(_STATEMENT_TOKENS & items) > 3:
        words.append("a statement")
        items -= _STATEMENT_TOKENS | {"STRING", "_NL"}
    rest = sorted(_describe_terminal(t) for t in items)
    if len(rest) > 6:
        rest = rest[:6] + ["..."]
    return one_of(words + rest)


def _token_text(tok: Token) -> str:
    if tok.type == "$END":
        return "the end of the file"
    if tok.type == "_NL":
        return "the end of the line"
    if tok.type == "_INDENT":
        return "an indented line"
    if tok.type == "_DEDENT":
        return "the end of the block"
    value = str(tok.value)
    if len(value) > 30:
        value = value[:27] + "..."
    if tok.type == "NAME":
        return f"name '{value}'"
    return f"'{value}'"


def syntax_diagnostic(exc: UnexpectedInput, source: SourceFile, text: str, base: int,
                      start: str = "start") -> Diagnostic:
    """Turn a lark exception into one located diagnostic with a helpful message."""
    if isinstance(exc, UnexpectedCharacters):
        return _unexpected_char(exc, source, text, base)
    if isinstance(exc, UnexpectedToken):
        at = len(text) if exc.token.type == "$END" or exc.token.start_pos is None else exc.token.start_pos
        unclosed = _unclosed_bracket(text, at)
        if unclosed is not None and (exc.token.type == "$END" or text.count("\n", unclosed, at) > 0):
            bracket = text[unclosed]
            return _diag(source, base + unclosed, base + unclosed + 1, f"'{bracket}' was never closed",
                         f"close it with '{_PAIRS[bracket]}'")
        return _unexpected_token(exc, source, text, base, start)
    pos = getattr(exc, "pos_in_stream", None) or 0
    return _diag(source, base + pos, base + pos + 1, "syntax error")


_PAIRS = {"(": ")", "[": "]", "{": "}"}
# A string literal or a comment (the STRING terminal of grammar.lark, and COMMENT), to skip when matching brackets.
_SKIP = re.compile(r'[rRfF]{0,2}(?:"""(?:[^\\]|\\[\s\S])*?"""|' r"'''(?:[^\\]|\\[\s\S])*?'''|"
                   r'"(?:[^"\\\n]|\\[\s\S])*"|' r"'(?:[^'\\\n]|\\[\s\S])*')|#[^\n]*")


def _unclosed_bracket(text: str, upto: int) -> Optional[int]:
    """Offset of the innermost bracket still open at ``upto`` (strings and comments skipped), or None."""
    stack: list[int] = []
    i = 0
    while i < upto:
        c = text[i]
        if c in "'\"#rRfF":
            m = _SKIP.match(text, i)
            if m and m.end() > i:
                i = m.end()
                continue
        if c in "([{":
            stack.append(i)
        elif c in ")]}" and stack:
            stack.pop()
        i += 1
    return stack[-1] if stack else None


def _unexpected_char(exc: UnexpectedCharacters, source: SourceFile, text: str, base: int) -> Diagnostic:
    pos = exc.pos_in_stream
    ch = text[pos] if pos < len(text) else ""
    if ch in "'\"" and text[max(pos - 2, 0):pos] == ch * 2:
        pos -= 2  # '"""abc' lexes as the empty string '""' followed by an unterminated '"abc'
    while pos > 0 and text[pos - 1] in "rRfF" and text[pos] in "'\"rRfF" and (pos < 2 or not text[pos - 2].isalnum()):
        pos -= 1
    at = base + pos
    prefix = re.match(r"[rRfF]{0,2}", text[pos:])
    plen = prefix.end() if prefix else 0
    if text[pos + plen:pos + plen + 1] in ("'", '"'):
        quote_at = pos + plen
        triple = text[quote_at:quote_at + 3] in ('"""', "'''")
        q = text[quote_at:quote_at + 3] if triple else text[quote_at]
        help = (f"close it with {q}" if triple else
                f"close it with {q} on the same line; for text over several lines use {q * 3}...{q * 3}")
        return _diag(source, at, at + plen + len(q), "unterminated string", help)
    shown = repr(ch) if not ch.isprintable() or ch.isspace() else f"'{ch}'"
    return _diag(source, at, at + 1, f"unexpected character {shown}", _PUNCTUATION_HINTS.get(ch))


def _expected(exc: UnexpectedToken) -> set[str]:
    """Terminals the parser could really take here (lark's own list also has what the lexer tried)."""
    try:
        accepted = set(exc.interactive_parser.accepts())
        if accepted:
            return accepted
    except Exception:  # accepts() replays the parser; fall back to lark's list if it cannot
        pass
    return set(exc.expected)


def _unexpected_token(exc: UnexpectedToken, source: SourceFile, text: str, base: int, rule: str) -> Diagnostic:
    tok = exc.token
    expected = _expected(exc)
    if tok.type == "$END" or tok.start_pos is None:
        at = base + len(text.rstrip())
        if rule == "expr_only":
            return _diag(source, at, at + 1, "incomplete expression inside '{...}'",
                         f"expected {_describe_expected(expected)}")
        return _diag(source, at, at + 1, "unexpected end of file", f"expected {_describe_expected(expected)}")
    start = base + tok.start_pos
    end = base + (tok.end_pos if tok.end_pos is not None else tok.start_pos + 1)
    if tok.type in ("_NL", "_DEDENT"):
        # Point at the end of the offending line rather than at the newline's following indentation.
        if expected == {"_INDENT"}:
            return _diag(source, start, start + 1, "expected an indented block after ':'",
                         "indent the lines of the block (e.g. 4 spaces)")
        return _diag(source, start, start + 1, "unexpected end of the line",
                     f"expected {_describe_expected(expected)}")
    if tok.type == "_INDENT":
        start = base + tok.end_pos if tok.end_pos is not None else start
        word = re.match(r"\w+", text[(tok.end_pos or 0):])
        first = word.group(0) if word else ""
        help = ("a 'where' line must directly follow its template or gen" if first in ("where", "and") else
                "only the body of if/elif/else/for, and 'where'/'and' lines after a template or gen, are indented")
        return _diag(source, start, start + max(1, len(first)), "unexpected indentation", help)
    if expected == {"_INDENT"}:
        return _diag(source, start, end, "expected an indented block after ':'",
                     "put the block's statements on the following lines, indented (e.g. 4 spaces)")
    if tok.type == "NAME" or str(tok.value) in KEYWORDS:
        return _unexpected_word(tok, expected, source, text, start, end)
    if "COMMA" in expected and tok.type in ("NUMBER", "STRING"):
        return _diag(source, start, end, f"unexpected {_token_text(tok)}", "is a ',' missing before it?")
    return _diag(source, start, end, f"unexpected {_token_text(tok)}", f"expected {_describe_expected(expected)}")


def _unexpected_word(tok: Token, expected: set[str], source: SourceFile, text: str, start: int,
                     end: int) -> Diagnostic:
    """A name or keyword where it does not fit: misspelt keywords, Python habits, missing 'and' or ','."""
    word = str(tok.value)
    what = f"name '{word}'" if word not in KEYWORDS else f"'{word}'"
    keywords = sorted(t.lower() for t in expected if t.lower() in KEYWORDS)
    statements = "statements are: " + ", ".join(STATEMENT_KEYWORDS) + ", and templates"
    if len(_STATEMENT_TOKENS & expected) > 3:  # at the start of a statement
        if word in ("where", "and"):
            return _diag(source, start, end, f"'{word}' must follow a template or gen",
                         "write it on the same line, or on the next line indented below the template")
        if word in ("elif", "else"):
            return _diag(source, start, end, f"'{word}' without a matching 'if'",
                         "line it up with its 'if' (same indentation)")
        if word in KEYWORDS:
            return _diag(source, start, end, f"unexpected {what} at the start of a statement", statements)
        if re.match(r"[ \t]*=(?!=)", text[tok.end_pos:]):
            return _diag(source, start, end, f"assignment needs 'let': let {word} = ...")
        if word in _PYTHON_STATEMENTS:
            return _diag(source, start, end, f"'{word}' is not a statement of the language", statements)
        best = did_you_mean(word, STATEMENT_KEYWORDS)
        if best:
            return _diag(source, start, end, f"unknown statement '{word}' — did you mean '{best}'?")
        return _diag(source, start, end, f"unexpected {what} at the start of a statement", statements)
    if {"MATCHES", "AND", "OR"} & expected and word not in KEYWORDS:  # right after a complete operand
        best = did_you_mean(word, keywords)
        if best == "matches" or (best is None and did_you_mean(word, ["matches"], 0.5)):
            return _diag(source, start, end, f"unknown constraint '{word}' — did you mean 'matches'?",
                         'a regex constraint is written: X matches r"..."')
        if best:
            return _diag(source, start, end, f"unexpected {what} — did you mean '{best}'?")
        if "COMMA" in expected:
            return _diag(source, start, end, f"unexpected {what}", "is a ',' missing before it?")
        if word in CONSTRAINT_WORDS or word in BUILTINS:
            return _diag(source, start, end, f"unexpected '{word}' after a complete expression",
                         "join constraints (and conditions) with 'and'")
    if keywords and "NAME" not in expected and word not in KEYWORDS:
        best = did_you_mean(word, keywords)
        if best:
            return _diag(source, start, end, f"unexpected {what} — did you mean '{best}'?")
    return _diag(source, start, end, f"unexpected {what}", f"expected {_describe_expected(expected)}")
