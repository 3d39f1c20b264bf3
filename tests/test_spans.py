"""Every AST node's span covers exactly its source text: closing brackets, leading keywords and parentheses
included (lark drops anonymous tokens from a rule's children, so spans must come from the rule's extent)."""

from __future__ import annotations

from typing import get_args

import pytest

from lmprog.dsl import ast as A
from lmprog.dsl.parser import parse
from lmprog.dsl.printer import constraint_to_source, expr_to_source

SRC = '''"Q: [x]\\n" where x in ["a", "b", "ab"]
"A: [y]" where stop_at(y, ".") and not contains(y, "zz") and len(y) <= 9
sample k ~ poisson(2.0)
let d = {"k": [1, 2], "s": f(x)}
let e = (k + 1) * 2
let g = h.f(x)[0][1:2]
condition not (x == "") and x in ["a"]
factor -abs(k) * 2 + logprob(drink)
return x, d
'''


def _slice(span, lines):
    if span.line == span.end_line:
        return lines[span.line - 1][span.col - 1 : span.end_col - 1]
    return "\n".join([lines[span.line - 1][span.col - 1 :]] + lines[span.line : span.end_line - 1]
                     + [lines[span.end_line - 1][: span.end_col - 1]])


def _nodes(module):
    return [n for n in A.walk(module) if getattr(n, "span", None) is not None and n.span.line > 0]


def test_expression_and_constraint_spans_slice_to_their_canonical_text():
    module = parse(SRC, "t.lmp")
    lines = SRC.split("\n")
    checked = set()
    for node in _nodes(module):
        if isinstance(node, get_args(A.Expr)):
            canon = expr_to_source(node)
        elif isinstance(node, get_args(A.Constraint)):
            canon = constraint_to_source(node)
        else:
            continue
        if isinstance(node, A.UnaryOp) and node.op == "not":
            continue  # the printer drops the redundant parentheses of `not (x == "")`
        if isinstance(node, A.BoolOp) and any(isinstance(v, A.UnaryOp) and v.op == "not" for v in node.values):
            continue
        assert _slice(node.span, lines) == canon, (type(node).__name__, node.span)
        checked.add(type(node).__name__)
    assert {"ListExpr", "DictExpr", "Call", "Index", "Slice", "BinOp", "UnaryOp", "Compare", "InChoices",
            "StopAt", "Not", "CountBound"} <= checked, checked


@pytest.mark.parametrize("kind, text", [
    ("Condition", 'condition not (x == "") and x in ["a"]'),
    ("Factor", "factor -abs(k) * 2 + logprob(drink)"),
    ("SampleStmt", "sample k ~ poisson(2.0)"),
    ("Let", "let e = (k + 1) * 2"),
    ("UnaryOp", 'not (x == "")'),
    ("BoolOp", 'not (x == "") and x in ["a"]'),
    ("BinOp", "(k + 1) * 2"),
    ("Template", '"Q: [x]\\n" where x in ["a", "b", "ab"]'),
    ("Return", "return x, d"),
])
def test_statement_and_operator_spans_cover_the_whole_text(kind, text):
    module = parse(SRC, "t.lmp")
    lines = SRC.split("\n")
    got = {_slice(n.span, lines) for n in _nodes(module) if type(n).__name__ == kind}
    assert text in got, got


def test_multi_line_list_ends_at_its_bracket():
    src = "let q = [\n    1,\n    2,\n]\n"
    module = parse(src, "t.lmp")
    (let,) = module.body
    assert (let.span.end_line, let.span.end_col) == (4, 2)
    assert (let.value.span.line, let.value.span.col) == (1, 9)
