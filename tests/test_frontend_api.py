"""The Python API (lmprog.compile / load / Program) and `lmprog check`."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import lmprog
from lmprog.cli import main as cli_main
from lmprog.dsl import ast as A
from lmprog.dsl.errors import LmpError
from lmprog.program import check_files

LMP = Path(__file__).parent / "lmp"
SAMPLES = sorted(LMP.glob("*.lmp"))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_programs_check_clean(path):
    program = lmprog.load(path)
    assert program.filename == str(path)
    assert program.source == path.read_text()
    assert isinstance(program.ast, A.Module)


def test_lazy_reexports():
    assert lmprog.compile is lmprog.program.compile
    assert lmprog.load is lmprog.program.load
    assert lmprog.Program is lmprog.program.Program
    with pytest.raises(AttributeError):
        lmprog.no_such_thing  # noqa: B018


def test_inputs_types_defaults_and_required():
    p = lmprog.compile('input a: int = 3\ninput b = 2.5\ninput c\ninput d: list = ["x"]\ninput e: float = 1\n'
                       'input f: bool\n')
    assert [(s.name, s.type, s.default, s.required) for s in p.inputs.values()] == [
        ("a", "int", 3, False), ("b", "float", 2.5, False), ("c", "str", None, True), ("d", "list", ["x"], False),
        ("e", "float", 1.0, False), ("f", "bool", None, True)]
    assert isinstance(p.inputs["e"].default, float)
    assert p.required_inputs == ["c", "f"]


def test_holes_with_constraints_loops_and_branches():
    p = lmprog.compile(
        '"[a] and [b]" where a in ["x", "y"] and tokens(b) <= 3 and len(b) > 1\n'
        "for i in range(2):\n"
        '    gen c where is_int(c)\n'
        "if true:\n"
        '    "[d]"\n'
        "else:\n"
        '    "[d]" where stop_at(d, ".")\n')
    assert list(p.holes) == ["a", "b", "c", "d"]
    assert p.holes["a"].constraint == A.InChoices(A.Name("a"), A.ListExpr((A.Str("x"), A.Str("y"))))
    assert p.holes["b"].constraint == A.And((A.CountBound(A.Name("b"), "tokens", "<=", A.Int(3)),
                                             A.CountBound(A.Name("b"), "len", ">", A.Int(1))))
    assert p.holes["c"].loop_depth == 1 and not p.holes["c"].conditional
    assert p.holes["d"].conditional and p.holes["d"].constraint is None
    assert [h.name for h in p.hole_definitions] == ["a", "b", "c", "d", "d"]
    assert p.hole_definitions[-1].constraint == A.StopAt(A.Name("d"), A.Str("."), True)
    # No return statement: every hole is reported.
    assert [key for key, _ in p.returns] == ["a", "b", "c", "d"]


def test_returns_keys():
    p = lmprog.compile('"[x]"\nreturn x, len(x)\n')
    assert [k for k, _ in p.returns] == ["x", "len(x)"]
    p = lmprog.compile('"[x]"\nreturn {"answer": x, "n": 1}\n')
    assert [k for k, _ in p.returns] == ["answer", "n"]


def test_strategy_and_model():
    p = lmprog.compile('model "tiny.gguf"\ninfer smc(64, resample="residual", seed=3)\n"[x]"\n')
    assert p.model == "tiny.gguf"
    assert p.strategy.name == "smc" and p.strategy.properly_weighted
    assert p.strategy.args == {"particles": 64, "resample": "residual", "seed": 3}
    p = lmprog.compile('infer best_of(4, score=len(x))\n"[x]"\n')
    assert p.strategy.args["n"] == 4 and isinstance(p.strategy.args["score"], A.Call)
    assert not p.strategy.properly_weighted
    p = lmprog.compile('"[x]"\n')
    assert p.strategy is None and p.model is None
    assert p.default_strategy == "smc" and p.default_model == "smollm2-135m"


def test_functions_are_known_to_the_checker():
    def short(s, limit=5):
        return len(s) <= limit

    p = lmprog.compile('"[x]" where short(x, limit=3)\nfactor score(x)\n',
                       functions={"short": short, "score": lambda s: 0.0})
    assert set(p.functions) == {"short", "score"}
    assert isinstance(p.holes["x"].constraint, A.PyPredicate)
    with pytest.raises(LmpError) as err:
        lmprog.compile('"[x]" where short(x)\n')
    assert "unknown constraint 'short'" in str(err.value)
    with pytest.raises(LmpError) as err:
        lmprog.compile('"[x]" where short(x, 1, 2, 3)\n', functions={"short": short})
    assert "bad call of short()" in str(err.value)


@pytest.mark.parametrize("functions, error", [
    ({"len": len}, ValueError), ({"if": len}, ValueError), ({"1x": len}, ValueError), ({"f": 3}, TypeError),
    ([("f", len)], TypeError),
])
def test_functions_argument_is_validated(functions, error):
    with pytest.raises(error):
        lmprog.compile('"[x]"\n', functions=functions)


def test_source_must_be_text():
    with pytest.raises(TypeError):
        lmprog.compile(b'"[x]"')


def test_relative_imports_follow_the_file(tmp_path):
    (tmp_path / "h.py").write_text("def ok(s):\n    return True\n")
    (tmp_path / "p.lmp").write_text('import "h.py" as h\n"[x]" where h.ok(x)\n')
    program = lmprog.load(tmp_path / "p.lmp")
    assert program.imports["h"].path == str(tmp_path / "h.py")
    assert program.imports["h"].names == frozenset({"ok"})
    with pytest.raises(LmpError):  # the same text as a string resolves against the current directory
        lmprog.compile((tmp_path / "p.lmp").read_text())


def test_load_errors_are_lmp_errors(tmp_path):
    with pytest.raises(LmpError, match="file not found"):
        lmprog.load(tmp_path / "missing.lmp")
    with pytest.raises(LmpError, match="directory"):
        lmprog.load(tmp_path)
    bad = tmp_path / "bad.lmp"
    bad.write_bytes(b'"ok"\n"\xff"\n')
    with pytest.raises(LmpError) as err:
        lmprog.load(bad)
    assert err.value.diagnostics[0].span.line == 2 and "UTF-8" in err.value.diagnostics[0].message


def test_crlf_and_bom_are_normalised():
    p = lmprog.compile('\ufeffinput x = "a"\r\n"[y]"\r\n')
    assert p.source == 'input x = "a"\n"[y]"\n'


def test_error_object_carries_sorted_diagnostics():
    with pytest.raises(LmpError) as err:
        lmprog.compile('let b = zz\nlet a = yy\n', "two.lmp")
    diags = err.value.diagnostics
    assert [(d.file, d.line, d.col) for d in diags] == [("two.lmp", 1, 9), ("two.lmp", 2, 9)]
    assert str(err.value).endswith("2 errors")
    assert diags[0].render().splitlines() == [
        "two.lmp:1:9: name 'zz' is not defined", "    let b = zz", "            ^^"]


# ------------------------------------------------------------------------------------------------------- CLI


def test_check_files_status_and_output(tmp_path):
    good = tmp_path / "good.lmp"
    good.write_text('"[x]"\n')
    bad = tmp_path / "bad.lmp"
    bad.write_text('"[x]" where x maches r"a"\n')
    out = io.StringIO()
    assert check_files([str(good)], out) == 0 and out.getvalue() == ""
    out = io.StringIO()
    assert check_files([str(good), str(bad), str(tmp_path / "none.lmp")], out) == 2
    text = out.getvalue()
    assert f"{bad}:1:15: unknown constraint 'maches' — did you mean 'matches'?" in text
    assert f"{tmp_path / 'none.lmp'}: file not found" in text
    assert "Traceback" not in text


def test_check_files_survives_an_ascii_stream(tmp_path):
    bad = tmp_path / "bad.lmp"
    bad.write_text('"[x]" where x maches r"é"\n')
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    assert check_files([str(bad)], stream) == 2
    stream.flush()
    assert b"did you mean" in raw.getvalue()


def test_cli_main_check(tmp_path, capsys):
    good = tmp_path / "good.lmp"
    good.write_text('"[x]"\n')
    assert cli_main(["check", str(good)]) == 0
    bad = tmp_path / "bad.lmp"
    bad.write_text('let x = (\n')
    assert cli_main(["check", str(bad)]) == 2
    assert "'(' was never closed" in capsys.readouterr().out


def test_cli_subprocess_never_shows_a_traceback(tmp_path):
    bad = tmp_path / "bad.lmp"
    bad.write_text('"[x]" where x matches r"(?=a)"\nlet y = undefined_name\n')
    done = subprocess.run([sys.executable, "-m", "lmprog.cli", "check", str(bad), str(tmp_path / "nope.lmp")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "lookahead" in done.stdout and "undefined_name" in done.stdout and "file not found" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
