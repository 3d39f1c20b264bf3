"""Semantic rules that must *accept* programs (and a few that must reject), beyond the golden diagnostics."""

from __future__ import annotations

import pytest

import lmprog
from lmprog.dsl.errors import LmpError


def ok(source: str, **kw):
    return lmprog.compile(source, "t.lmp", **kw)


def errors(source: str, **kw) -> list[str]:
    with pytest.raises(LmpError) as err:
        lmprog.compile(source, "t.lmp", **kw)
    return [d.message for d in err.value.diagnostics]


def test_let_can_be_reassigned_and_accumulate_in_loops():
    ok("let total = 0\nfor i in range(3):\n    let total = total + i\nfactor total\n")


def test_loop_holes_and_samples_are_lists_after_the_loop():
    p = ok('for i in range(2):\n    "[item]"\n    sample k ~ poisson(1.0)\n    condition len(item) > i\n'
           "condition len(item) == 2 and item[0] != item[1] and len(k) == 2\nreturn item, k\n")
    assert [key for key, _ in p.returns] == ["item", "k"]


def test_loop_locals_do_not_leak():
    assert "not defined here" in errors("for i in range(2):\n    let x = i\nfactor x\n")[0]
    assert "not defined here" in errors("for i in range(2):\n    let x = i\nfactor i\n")[0]


def test_names_set_in_every_branch_are_defined_after_the_if():
    ok('if true:\n    "[x]"\nelif false:\n    gen x\nelse:\n    "[x]" where x in ["a"]\ncondition len(x) > 0\n')
    assert "may be undefined" in errors('if true:\n    "[x]"\nelif false:\n    gen x\ncondition len(x) > 0\n')[0]


def test_holes_in_different_branches_are_not_duplicates_but_repeats_are():
    ok('if true:\n    "[x]"\nelse:\n    "[x]"\n')
    assert "already defined" in errors('if true:\n    "[x]"\n"[x]"\n')[0]


def test_constraint_arguments_may_come_from_inputs_and_static_lets():
    ok('input options: list = ["a", "b"]\ninput pattern = "[a-z]+"\ninput n: int = 4\n'
       'let more = options + ["c"]\nlet limit = n * 2\n'
       '"[x] [y]" where x in more and y matches pattern and len(y) <= limit and startswith(y, options[0])\n')


def test_lets_inside_branches_or_of_holes_are_not_static():
    assert "known before the run" in errors('if true:\n    let n = 3\nelse:\n    let n = 4\nfor i in range(n):\n'
                                            '    "[x]"\n')[0]
    assert "known before the run" in errors('"[n]"\nlet m = len(n)\n"[x]" where len(x) <= m\n')[0]


def test_emptiness_sees_through_static_lets():
    message = errors('let choices = ["yes", "no"]\n"[x]" where x in choices and x matches r"maybe"\n')[0]
    assert "admit no string" in message


def test_emptiness_reads_regexes_as_the_compiler_does():
    ok('"[x]" where x in ["ab"] and x matches r"a|ab"\n')  # leftmost-first matching would lose "ab"
    ok('"[x]" where x in ["abx"] and x matches r"a(bx)?"\n')
    assert "admit no string" in errors('"[x]" where x in ["ab"] and x matches r"a(bx)?"\n')[0]


def test_inputs_make_emptiness_unknowable_so_no_error():
    ok('input choices: list = ["yes"]\n"[x]" where x in choices and x matches r"no"\n')


def test_a_hole_may_be_interpolated_later_in_its_own_template():
    ok('"[first] and again {first}"\n')
    assert "used before it is defined" in errors('"{later} [later]"\n')[0]


def test_strategy_expressions_see_every_program_name():
    p = ok('infer vote(n=4, key=lower(answer) + suffix)\n"[answer]"\nlet suffix = "!"\n')
    assert p.strategy.name == "vote"


def test_prefix_predicates_from_functions():
    def digits(s):
        return s.isdigit()

    p = ok('"[x]" where digits(x, prefix=true) and not contains(x, "0")\n', functions={"digits": digits})
    assert p.holes["x"].constraint.operands[0].prefix is True


def test_star_imports_disable_attribute_checks(tmp_path):
    (tmp_path / "h.py").write_text("from os.path import *\n")
    (tmp_path / "p.lmp").write_text('import "h.py" as h\n"[x]" where h.anything(x)\n')
    lmprog.load(tmp_path / "p.lmp")


def test_conditional_definitions_in_imported_files_count(tmp_path):
    (tmp_path / "h.py").write_text("try:\n    import json\nexcept ImportError:\n    pass\nif True:\n"
                                   "    def f(s):\n        return True\n")
    (tmp_path / "p.lmp").write_text('import "h.py" as h\n"[x]" where h.f(x)\nlet y = h.json\n')
    lmprog.load(tmp_path / "p.lmp")


def test_or_and_not_of_same_kind_are_accepted():
    ok('"[x]" where (x matches r"[0-9]+" or x in ["none"]) and not startswith(x, "0")\n')
    ok('"[x]" where tokens(x) < 3 or tokens(x) > 10\n')
    ok('"[x]" where not (len(x) < 2)\n')


def test_inputs_cannot_be_redefined_or_hidden():
    assert "already defined" in errors("input x = 1\ninput x = 2\n")[0]
    assert "built-in" in errors('input len = "a"\n')[0]
    assert "functions=" in errors('"[f]"\n', functions={"f": len})[0]


def test_every_error_is_reported_not_just_the_first():
    messages = errors('let a = zz1\n"[x]" where y in ["a"]\nsample s ~ nrmal(0, 1)\ninfer smc(particles=-1)\n')
    assert len(messages) == 4


def test_strategy_argument_relations_are_checked_before_the_run():
    assert "burn_in must be less than steps (5)" in errors('infer mcmc(steps=5, burn_in=5)\n"[x]"\n')[0]
    assert "burn_in must be less than steps (100)" in errors('infer mcmc(burn_in=100)\n"[x]"\n')[0]
    assert "at least 2 particles" in errors('infer particle_gibbs(3, 1)\n"[x]"\n')[0]
    ok('infer mcmc(steps=5, burn_in=4, move="independent", particles=2)\n"[x]"\n')
    ok('infer smc(particles=8, rejuvenate=2)\n"[x]"\n')
