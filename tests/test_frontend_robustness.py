"""Robustness: for any text at all, the front end either accepts it or raises LmpError — nothing else.

Inputs: arbitrary Unicode (surrogates and control characters included), token soup from the language's own
vocabulary, and random mutations (deletions, insertions of language fragments, duplications, swaps) of the
sample and golden programs. Every error must carry located diagnostics that render, and none may be an
"internal error". CI runs a few hundred examples per test; set ``LMPROG_HYPOTHESIS_EXAMPLES`` for a long run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmprog.dsl.errors import LmpError
from lmprog.dsl.parser import parse_expression
from lmprog.program import Program

EXAMPLES = int(os.environ.get("LMPROG_HYPOTHESIS_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

TESTS = Path(__file__).parent
SEEDS = [p.read_text(encoding="utf-8") for p in sorted((TESTS / "lmp").glob("*.lmp"))
         + sorted((TESTS / "golden" / "parse").glob("*.lmp"))
         + sorted((TESTS / "golden" / "errors").glob("*.lmp"))[:20]]

FRAGMENTS = [
    '"', "'", '"""', "'''", 'r"', 'f"', "{", "}", "{{", "}}", "[", "]", "[[", "]]", "(", ")", "\\", "\\n", "\n",
    "    ", "\t", " ", ":", ",", ".", "=", "==", "~", "#", "**", "//", "-", "+", "<=", ">", "!", "!=", "&", "|",
    "where ", " and ", " or ", "not ", " in ", " matches ", "if ", "elif ", "else:", "for i in ", "range(3)",
    "let x = ", "gen y", "sample z ~ ", "normal(0, 1)", "observe ", "condition ", "factor ", "return ", "input ",
    "model ", "infer smc(", "import ", '"h.py"', " as h", "h.f(x)", "tokens(x) <= ", "len(", "words(",
    "stop_at(x, ", "json(", "grammar(", "is_int(x)", "prefix=true", "[x]", "{x}", "{x:>4}", "x", "y", "0",
    "1e999", "0x", "9" * 50, "1_000", "true", "false", "None", "é", "\u3000", "\x00", "\ud800", "\x0c", "\r",
    "\ufeff", "(?=a)", "^", "$", "(a|a)*", "\\1", "[^\\s\\S]", "*" * 3,
]


def check(source: str) -> None:
    """Compile; only LmpError may escape, with rendered, located, non-internal diagnostics."""
    try:
        Program(source, "fuzz.lmp", base_dir=TESTS / "lmp")
    except LmpError as err:
        assert err.diagnostics
        text = err.render()
        assert "internal error" not in text
        for d in err.diagnostics:
            assert d.span.line >= 0 and d.message


@SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text(source):
    check(source)


@SETTINGS
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_token_soup(source):
    check(source)


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        i = draw(st.integers(0, len(text)))
        op = draw(st.integers(0, 3))
        if op == 0:
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        elif op == 1:
            text = text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[i:]
        elif op == 2:
            j = draw(st.integers(0, len(text)))
            text = text[:i] + text[j:j + draw(st.integers(1, 40))] + text[i:]
        else:
            j = draw(st.integers(0, len(text)))
            a, b = sorted((i, j))
            text = text[:a] + text[b:b + 1] + text[a + 1:b] + text[a:a + 1] + text[b + 1:]
    return text


@SETTINGS
@given(mutated())
def test_mutated_programs(source):
    check(source)


@SETTINGS
@given(st.text(max_size=80))
def test_parse_expression_raises_only_lmp_error(text):
    try:
        parse_expression(text)
    except LmpError as err:
        assert err.diagnostics


@pytest.mark.parametrize("source", [
    "let x = " + "(" * 500 + "1" + ")" * 500,
    "let x = " + "-" * 2000 + "1",
    "let x = " + "[" * 300 + "]" * 300,
    "if true:\n" + "".join("    " * i + "if true:\n" for i in range(1, 120)) + "    " * 120 + "let x = 1\n",
    '"' + "{" * 200 + "x" + "}" * 200 + '"',
    "let x = " + " + ".join(["1"] * 3000),
    "let x = 2 ** 10 ** 10 ** 10\ncondition x > 0\n",
    'let s = "a" * 10 ** 9\n',
    'let l = [[[0] * 1000] * 1000] * 1000\nlet t = str(l)\n',
    '"[x]" where x in ["' + "a" * 30 + '"] and x matches r"(a|a)*b"\n',
    '"[x]" where x matches r"' + "(" * 300 + "a" + ")" * 300 + '"\n',
    '"[x]" where x matches r"(((a{9}){9}){9}){9}"\n',
    'let f = f"{1:999999999}"\n',
])
def test_pathological_inputs_are_errors_or_fast(source):
    check(source)
