"""Unit tests of the front end's small pieces: spans, rendering, escapes, classification, printing, folding."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmprog.compiler.bytedfa import ByteDFA
from lmprog.compiler.check_regex import fullmatch, regex_problem
from lmprog.dsl import ast as A
from lmprog.dsl.constraints import classify
from lmprog.dsl.errors import Diagnostic, LmpError, did_you_mean
from lmprog.dsl.parser import parse, parse_expression
from lmprog.dsl.printer import constraint_to_source, expr_to_source, to_source
from lmprog.dsl.source import SourceFile, Span
from lmprog.dsl.static import NotStatic, StaticError, static_value
from lmprog.dsl.templates import decode_escape

# ------------------------------------------------------------------------------------------- source & render


def test_line_col_and_spans():
    src = SourceFile("f", "ab\ncd\r\nef")
    assert src.text == "ab\ncd\nef"
    assert src.line_col(0) == (1, 1) and src.line_col(3) == (2, 1) and src.line_col(7) == (3, 2)
    assert src.span(3, 5) == Span("f", 2, 1, 2, 3)
    assert src.span(4, 4) == Span("f", 2, 2, 2, 3)  # empty ranges still get one caret
    assert src.line_text(3) == "ef" and src.line_text(9) == ""


def test_caret_under_tabs_and_wide_characters():
    d = Diagnostic(Span("f", 1, 3, 1, 5), "m", None, "\tx漢字y")
    lines = d.render().splitlines()
    assert lines[1] == "        x漢字y"
    assert lines[2] == "    " + " " * 5 + "^^^^"  # the tab is 4 columns, each CJK character 2


def test_render_without_position_and_with_help():
    assert Diagnostic(Span("f.lmp", 0, 0, 0, 0), "file not found").render() == "f.lmp: file not found"
    text = Diagnostic(Span("f", 1, 1, 1, 2), "m", "one\ntwo", "x").render()
    assert text.splitlines()[-2:] == ["    help: one", "          two"]


def test_lmp_error_sorts_and_deduplicates():
    a = Diagnostic(Span("f", 2, 1, 2, 2), "b")
    b = Diagnostic(Span("f", 1, 5, 1, 6), "a")
    err = LmpError([a, b, a])
    assert err.diagnostics == (b, a)
    assert str(err).endswith("2 errors")


def test_did_you_mean():
    assert did_you_mean("maches", ["matches", "in"]) == "matches"
    assert did_you_mean("SMC", ["smc"]) == "smc"
    assert did_you_mean("zzz", ["matches"]) is None


# ------------------------------------------------------------------------------------------------- strings


@pytest.mark.parametrize("text, value", [
    (r"\n", "\n"), (r"\\", "\\"), (r"\x41", "A"), (r"\u00e9", "é"), (r"\U0001F600", "\U0001F600"),
    (r"\N{BULLET}", "•"), (r"\101", "A"), (r"\d", "\\d"), ("\\\n", ""),
])
def test_escapes(text, value):
    decoded, length, err = decode_escape(text, 0)
    assert err is None and decoded == value and length == len(text)


@pytest.mark.parametrize("text", [r"\x4", r"\ud800", r"\U00110000", r"\N{NOPE}", r"\N"])
def test_bad_escapes(text):
    assert decode_escape(text, 0)[2] is not None


def test_interpolation_spans_inside_triple_quoted_templates():
    module = parse('"""line one\n  {name + 1} and [hole]"""\n')
    interp, hole = module.body[0].parts[1], module.body[0].parts[3]
    assert interp.span == Span("<string>", 2, 3, 2, 13)
    assert interp.expr.span == Span("<string>", 2, 4, 2, 12)
    assert hole.span == Span("<string>", 2, 18, 2, 24)


def test_raw_template_keeps_backslashes_but_interpolates():
    parts = parse('r"\\d {x} [y]"\n').body[0].parts
    assert parts == (A.Text("\\d "), A.Interp(A.Name("x")), A.Text(" "), A.Hole("y"))


def test_plain_strings_are_not_templates():
    assert parse_expression('"[a-z]{3}"') == A.Str("[a-z]{3}")
    assert parse_expression('f"{x}[y]"') == A.FString((A.Interp(A.Name("x")), A.Text("[y]")))


def test_where_continuation_lines_join_with_and():
    one = parse('"[x]" where x matches "a" and len(x) < 3 and tokens(x) <= 2\n')
    two = parse('"[x]"\n    where x matches "a"\n    and len(x) < 3\n    where tokens(x) <= 2\n')
    three = parse('"[x]" where x matches "a"\n    and (len(x) < 3 and\n         tokens(x) <= 2)\n')
    assert one == two == three


# ----------------------------------------------------------------------------------------------- constraints


def _c(text):
    return classify(parse_expression(text))


def test_classification_normalises_forms():
    x = A.Name("x")
    assert _c("5 >= len(x)") == A.CountBound(x, "len", "<=", A.Int(5))
    assert _c("2 <= words(x) < 4") == A.And((A.CountBound(x, "words", ">=", A.Int(2)),
                                             A.CountBound(x, "words", "<", A.Int(4))))
    assert _c('"ab" in x') == A.Contains(x, A.Str("ab"))
    assert _c('x not in ["a"]') == A.Not(A.InChoices(x, A.ListExpr((A.Str("a"),))))
    assert _c("h.f(x, 1, k=2, prefix=true)") == A.PyPredicate(
        A.Attribute(A.Name("h"), "f"), x, (A.Int(1),), (A.Keyword("k", A.Int(2)),), True)
    assert _c('a matches "x" and (b in ["y"] and is_int(c))') == A.And(
        (A.Matches(A.Name("a"), A.Str("x")), A.InChoices(A.Name("b"), A.ListExpr((A.Str("y"),))), A.IsInt(A.Name("c"))))
    assert isinstance(_c('x == "yes"'), A.InvalidConstraint)
    assert isinstance(_c("len(x) != 2"), A.InvalidConstraint)


def test_constraint_printing():
    assert constraint_to_source(_c('x not in ["a"] or "b" in x')) == 'x not in ["a"] or contains(x, "b")'
    assert constraint_to_source(_c('not (x matches r"\\d" or is_int(x))')) == 'not (x matches r"\\d" or is_int(x))'


# -------------------------------------------------------------------------------------------------- printing


@pytest.mark.parametrize("text", [
    "-x ** 2", "(-x) ** 2", "2 ** -1", "(a < b) < c", "a < b < c", "not a == b", "(not a) == b", "a - (b - c)",
    "(a ** b) ** c", "(a if b else c) if d else e", "a if b else c if d else e", "f(x)[1:2].y", "(1).real",
    "[1, {2: 3}][0]", 'f"{ {1: 2}[1]} {x!=y}"', "x in [1] and not y in z",
])
def test_printer_keeps_structure(text):
    expr = parse_expression(text)
    assert parse_expression(expr_to_source(expr)) == expr


def test_canonical_strings():
    assert expr_to_source(A.Str("\\d+")) == 'r"\\d+"'
    assert expr_to_source(A.Str('a"b\\')) == '"a\\"b\\\\"'
    assert expr_to_source(A.Str("tab\there")) == '"tab\\there"'
    assert expr_to_source(A.Float(float("inf"))) == "1e999"
    module = A.Module((A.Template((A.Text("{x} [y]\n"), A.Interp(A.Str('q"'), ">3"), A.Hole("h"))),))
    assert to_source(module) == '"{{x}} [[y]]\\n{\'q\\"\':>3}[h]"\n'
    assert parse(to_source(module)) == module


# --------------------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("text, value", [
    ("1 + 2 * 3", 7), ("7 // 2", 3), ("2 ** 10", 1024), ('"ab" * 2', "abab"), ("[1, 2] + [3]", [1, 2, 3]),
    ('len("abc")', 3), ('upper("a") + lower("B")', "Ab"), ('split("a,b", ",")', ["a", "b"]),
    ('join(["a", "b"], "-")', "a-b"), ("min(3, 1, 2)", 1), ("max([1, 5])", 5), ('words("a b  c")', 3),
    ("1 < 2 < 3", True), ('"a" if false else "b"', "b"), ('"abc"[1:]', "bc"), ('f"{1 + 1:>3}"', "  2"),
    ('"ab" matches "[a-z]+"', True), ("x + 1", None),
])
def test_static_values(text, value):
    expr = parse_expression(text)
    if value is None:
        with pytest.raises(NotStatic):
            static_value(expr)
    else:
        assert static_value(expr) == value


@pytest.mark.parametrize("text", ["1 / 0", 'int("x")', "exp(1000)", '"a" - 1', "log(0)"])
def test_static_errors(text):
    with pytest.raises(StaticError):
        static_value(parse_expression(text))


@pytest.mark.parametrize("text", ["2 ** 10 ** 10", '"a" * 10 ** 8', "[[[0] * 1000] * 1000] * 1000",
                                  'tokens("a")', 'logprob(x)', '"a" * 30 matches "(a|a)*b"'])
def test_static_refuses_costly_or_dynamic_values(text):
    start = time.perf_counter()
    with pytest.raises(NotStatic):
        static_value(parse_expression(text))
    assert time.perf_counter() - start < 2


# ---------------------------------------------------------------------------------------------------- regexes


@pytest.mark.parametrize("pattern, fragment", [
    ("(", "invalid regex"), ("a(?=b)", "lookahead"), ("(a)\\1", "backreference"), ("^a", "anchors"),
    ("a\\b", "word boundaries"), ("a++", "possessive"), ("[[:digit:]]", "unsupported regex"),
    ("[^\\s\\S]", "matches no string"), ("a{,2}", "not supported by the constraint compiler"),
])
def test_regex_problems(pattern, fragment):
    problem = regex_problem(pattern)
    assert problem is not None and fragment in problem[0]


@pytest.mark.parametrize("pattern", ["[A-Z][a-z]+( [A-Z][a-z]+)*", "\\d{4}-\\d{2}-\\d{2}", "(?i)yes|no", "é+",
                                     ".{0,100}"])
def test_good_regexes(pattern):
    assert regex_problem(pattern) is None


@pytest.mark.parametrize("pattern, text, expected", [
    ("a|ab", "ab", True), ("a(bx)?", "abx", True), ("a(bx)?", "ab", False), ("[a-z]{0,30}", "", True),
    ("é|x", "é", True), ("\\d+", "٣", True), ("\\d+", "", False),
])
def test_checker_regexes_agree_with_the_compiler(pattern, text, expected):
    """The checker reads regexes through the compiler's byte DFA (outlines-core's own index, which the checker
    used before, loses "ab" in a|ab and "abx" in a(bx)?)."""
    assert fullmatch(pattern, text) is expected
    assert ByteDFA.from_regex(pattern).accepts(text) is expected


def test_constraint_regex_matching_is_linear():
    start = time.perf_counter()
    assert fullmatch("(a|a)*b", "a" * 40) is False
    assert fullmatch("(a|a)*b", "a" * 40 + "b") is True
    assert fullmatch("é|x", "é") is True
    assert time.perf_counter() - start < 2


def test_parser_tables_come_from_the_disk_cache_and_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    from lmprog.dsl import syntax

    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    source = (Path(__file__).resolve().parents[1] / "examples" / "capital.lmp").read_text(encoding="utf-8")
    stale = tmp_path / "grammar" / "0123.lark"  # an entry of an older grammar or lmprog
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    writing = tmp_path / "grammar" / ".tmp-another-process.lark"  # another process's entry being written
    writing.write_bytes(b"half")
    syntax._lark.cache_clear()
    try:
        built = syntax._lark()
        assert writing.read_bytes() == b"half" and not stale.exists()
        entries = [p for p in (tmp_path / "grammar").iterdir() if p != writing]
        assert len(entries) == 1 and entries[0].stat().st_size > 0
        syntax._lark.cache_clear()
        loaded = syntax._lark()
        assert loaded is not built
        assert loaded.parse(source, start="start") == built.parse(source, start="start")
        with pytest.raises(LmpError, match="unexpected indentation|expected"):
            parse("  x = 1\n")  # the loaded parser keeps the postlexer's errors
        entries[0].write_bytes(b"not a parser")
        syntax._lark.cache_clear()
        rebuilt = syntax._lark()
        assert rebuilt.parse(source, start="start") == built.parse(source, start="start")
        assert entries[0].read_bytes() != b"not a parser"
    finally:
        syntax._lark.cache_clear()
