"""Golden parse tests: every statement, constraint, strategy and escape of LANGUAGE.md parses to the expected AST.

Each ``tests/golden/parse/NAME.lmp`` is parsed (syntax only: no semantic checks) and its AST dump, spans
included, must equal ``NAME.ast``. The printed canonical source must equal ``NAME.canonical.lmp`` and parse back
to the same AST.
"""

from __future__ import annotations

import pytest

from lmprog.dsl.ast import dump
from lmprog.dsl.parser import parse
from lmprog.dsl.printer import to_source

from golden_check import GOLDEN, check_golden

CASES = sorted(p for p in (GOLDEN / "parse").glob("*.lmp") if not p.name.endswith(".canonical.lmp"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_parse_golden(path):
    module = parse(path.read_text(encoding="utf-8"), path.name)
    check_golden(dump(module), path.with_suffix(".ast"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_canonical_golden(path):
    module = parse(path.read_text(encoding="utf-8"), path.name)
    printed = to_source(module)
    check_golden(printed, path.with_name(path.stem + ".canonical.lmp"))
    assert parse(printed) == module


def test_cases_cover_every_statement_constraint_and_strategy():
    """The golden inputs mention every statement, constraint node, strategy and distribution."""
    from lmprog.dsl import ast as A
    from lmprog.dsl.ast import walk
    from lmprog.catalog import CATALOG as STRATEGIES
    from lmprog.dsl.catalog import DISTRIBUTIONS

    seen: set[type] = set()
    strategies, dists = set(), set()
    for path in CASES:
        for node in walk(parse(path.read_text(encoding="utf-8"), path.name)):
            seen.add(type(node))
            if isinstance(node, A.InferStmt):
                strategies.add(node.strategy)
            if isinstance(node, A.SampleStmt):
                dists.add(node.dist)
    wanted = {A.ModelStmt, A.InferStmt, A.InputStmt, A.ImportStmt, A.Template, A.Turn, A.Gen, A.Observe, A.SampleStmt,
              A.Let, A.Condition, A.Factor, A.If, A.For, A.Return, *A.CONSTRAINT_ATOMS, A.Not, A.And, A.Or,
              A.FString, A.Interp, A.Hole, A.Text, A.Slice, A.Index, A.Attribute, A.IfExp, A.Compare, A.BoolOp,
              A.DictExpr, A.ListExpr}
    assert wanted <= seen, wanted - seen
    assert strategies == set(STRATEGIES)
    assert dists == set(DISTRIBUTIONS)
