"""Issue 13 (runtime hardening): each reproducer of the issue as a regression test. Guarded user code (located
errors, a time limit, SystemExit never success), batch output that is never lost (rows written as they finish,
the output path checked first, Ctrl-C and --resume, every input line accounted for, exit 2 for bad rows only),
strict JSON (no NaN anywhere), resource pre-flights (context, seed range, host memory) and API argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmprog
from lmprog import cli
from lmprog.compiler.errors import HostError, OptionError, RunError
from lmprog.dsl.errors import LmpError
from test_lower import toy_lm

ROOT = Path(__file__).resolve().parent.parent

HELPERS = '''import sys
def hang(x):
    while True:
        pass
def leave(x):
    sys.exit(0)
def boom(x):
    raise ValueError("bad value " + x)
def maybe(x):
    if x == "a":
        return True
def nan(x):
    return float("nan")
def text(x):
    return "high"
def stop(x):
    raise KeyboardInterrupt
'''

PROGRAM = '''infer smc(particles=16)
input n: int = 1
input t: float = 0.5
input who: str = "Q"
"{who}: [x]\\n" where x in ["a", "b", "ab"]
return x, n, t
'''


@pytest.fixture
def toy(monkeypatch):
    import lmprog.runner as runner

    monkeypatch.setattr(runner, "get_model", lambda name: toy_lm())


def predicate_program(tmp_path, fn: str) -> Path:
    (tmp_path / "helpers.py").write_text(HELPERS)
    path = tmp_path / f"{fn}.lmp"
    path.write_text(f'import "helpers.py" as h\ninfer smc(particles=8)\n'
                    f'"Q: [x]\\n" where x in ["a", "b", "ab"] and h.{fn}(x)\nreturn x\n')
    return path


def factor_program(tmp_path, fn: str) -> Path:
    (tmp_path / "helpers.py").write_text(HELPERS)
    path = tmp_path / f"f_{fn}.lmp"
    path.write_text(f'import "helpers.py" as h\ninfer smc(particles=8)\n'
                    f'"Q: [x]\\n" where x in ["a", "b", "ab"]\nfactor h.{fn}(x)\nreturn x\n')
    return path


# ------------------------------------------------------------------------------------------ guarded user code


def test_a_hanging_predicate_stops_at_the_host_timeout_with_a_located_error(tmp_path):
    # before: `while True:` in a predicate hung the run forever (the subprocess timeout turns a hang into a failure)
    path = predicate_program(tmp_path, "hang")
    code = ("import sys; sys.path[:0] = [%r, %r]\n"
            "import lmprog.runner as r; from test_lower import toy_lm; r.get_model = lambda n: toy_lm()\n"
            "from lmprog import cli; sys.exit(cli.main(['run', %r, '--host-timeout', '1']))\n"
            % (str(ROOT / "tests"), str(ROOT), str(path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr
    assert "hang.lmp:3:44: h.hang() did not return within 1 s" in proc.stderr
    assert "(it was running helpers.py:" in proc.stderr and ", in hang)" in proc.stderr  # the loop's line
    assert "--host-timeout" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_time_limit_also_holds_off_the_main_thread():
    # the worker-thread fallback: the hung call is abandoned and the caller gets HostTimeout
    import threading
    import time

    from lmprog.compiler.runtime_eval import HostTimeout, call_limited

    got = []

    def caller():
        try:
            call_limited(time.sleep, (60,), seconds=0.2)
        except HostTimeout as exc:
            got.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    t.join(30)
    assert got and got[0].seconds == 0.2
    assert call_limited(lambda a, b=0: a + b, (1,), {"b": 2}, seconds=5) == 3


def test_sys_exit_in_a_predicate_is_a_located_error_never_success(tmp_path, toy, capsys):
    # before: SystemExit(0) made `lmprog run` exit 0 with empty output
    path = predicate_program(tmp_path, "leave")
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "leave.lmp:3:44: h.leave() raised SystemExit(0)" in err and "helpers.py:6, in leave" in err
    assert "^^^^" in err and "Traceback" not in err


def test_keyboard_interrupt_in_user_code_is_the_users_ctrl_c(tmp_path, toy, capsys):
    path = predicate_program(tmp_path, "stop")
    assert cli.main(["run", str(path)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_raising_predicate_names_the_function_and_its_call_site(tmp_path, toy, capsys):
    path = predicate_program(tmp_path, "boom")
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "boom.lmp:3:44" in err and "ValueError: bad value" in err
    assert "raised by h.boom() called at " in err and "helpers.py:8, in boom" in err
    assert "^" in err and "Traceback" not in err


def test_a_predicate_that_returns_none_is_a_located_error(tmp_path, toy, capsys):
    # before: bool(None) silently killed the particles whose value made the function fall off its end
    path = predicate_program(tmp_path, "maybe")
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "maybe.lmp:3:44: the predicate h.maybe() returned None for x = " in err and "not a bool" in err


@pytest.mark.parametrize("fn, message", [("nan", "the factor h.nan(x) is NaN"),
                                         ("text", "the factor h.text(x) is str 'high', not a number")])
def test_a_factor_that_is_no_finite_number_is_a_located_error(tmp_path, toy, capsys, fn, message):
    # before: "lmprog: error: factor is NaN" / "could not convert string to float", without a location
    path = factor_program(tmp_path, fn)
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"f_{fn}.lmp:4:8: {message}" in err and "^^^^" in err and "Traceback" not in err


def test_program_run_raises_the_located_host_error(tmp_path):
    path = predicate_program(tmp_path, "leave")
    with pytest.raises(HostError, match=r"leave\.lmp:3:44: h\.leave\(\) raised SystemExit\(0\)"):
        lmprog.load(path).run(lm=toy_lm())


def test_functions_in_expressions_are_guarded_too():
    def half(s):
        return 1 / 0 if s == "ab" else 0.5

    prog = lmprog.compile('"Q: [x]\\n" where x in ["a", "b", "ab"]\nfactor half(x)\n', "t.lmp",
                          functions={"half": half})
    result = prog.run(lm=toy_lm(), particles=16)  # ZeroDivisionError kills the "ab" particles only
    assert {v["x"] for v, _ in result.posterior} <= {"a", "b"}


def test_a_factor_is_checked_by_its_own_lowering_not_by_ast_identity():
    # the factor check lives in the lowering of `factor` (check_factor), not in an AST-identity hook of
    # eval_for: a factor statement the runtime has never seen (here a copy) is still checked (+inf was added)
    import copy
    import math

    from lmprog.compiler.errors import HostAbort
    from lmprog.compiler.lower import Lowering
    from lmprog.compiler.runtime_eval import Ref
    from lmprog.dsl import ast as A

    prog = lmprog.compile('"Q: [x]\\n" where x in ["a", "b"]\nfactor big(x)\n', "t.lmp",
                          functions={"big": lambda x: math.inf})
    stmt = copy.deepcopy(next(s for s in prog.ast.body if isinstance(s, A.Factor)))
    low = Lowering(prog, toy_lm().tokenizer, {}, 0, 16)
    low.s_Factor(stmt, {"x": Ref("hole", "x")}, (), ())

    class View:
        alive, values, data = [True], [{"x": "a"}], [{}]

        def __len__(self):
            return 1

    with pytest.raises(HostAbort) as info:
        low.segments[-1].fn(View())
    assert "t.lmp:2:8: the factor big(x) is +inf" in str(info.value.error)


def test_matches_at_run_time_never_backtracks(tmp_path):
    # before: re.fullmatch backtracked exponentially on nested quantifiers (30 "a"s: effectively forever); the
    # subprocess timeout turns a hang into a failure
    source = ('"Q: [x]\\n" where x in ["a", "b"]\n'
              'let ok = "' + "a" * 30 + '" + x matches r"(((a+)+)+)+b"\nreturn x, ok\n')
    code = ("import sys, json; sys.path[:0] = [%r, %r]\n"
            "import lmprog; from test_lower import toy_lm\n"
            "r = lmprog.compile(%r, 't.lmp').run(lm=toy_lm(), particles=16)\n"
            "print(json.dumps(sorted({(v['x'], v['ok']) for v, _ in r.posterior})))\n"
            % (str(ROOT / "tests"), str(ROOT), source))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pairs and all(ok == (x == "b") for x, ok in pairs), pairs


def test_a_run_time_regex_without_an_automaton_is_a_located_error(tmp_path, toy, capsys):
    # the DFA has bounds and no backreferences: a regex known only at run time that it cannot compile stops
    # the run with an error at the regex (not a traceback, not a silent particle death)
    path = tmp_path / "rx.lmp"
    path.write_text('input p: str = "a"\n"Q: [x]\\n" where x in ["a", "b"]\nlet ok = x matches p\nreturn x, ok\n')
    assert cli.main(["run", str(path), "--set", "p=.*a.{30}"]) == 1
    err = capsys.readouterr().err
    assert "rx.lmp:3:20: cannot match against the regex '.*a.{30}': this regex needs more than" in err, err
    assert "counter constraint" in err and "^" in err and "Traceback" not in err
    assert cli.main(["run", str(path), "--set", r"p=(a)\1"]) == 1
    assert "rx.lmp:3:20: cannot match against the regex '(a)\\\\1': backreferences are not supported" in \
        capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ batch


@pytest.fixture
def prog(tmp_path, toy):
    path = tmp_path / "p.lmp"
    path.write_text(PROGRAM)
    return path


def test_batch_out_in_a_missing_folder_is_refused_before_any_work(prog, tmp_path, capsys, engine_calls):
    # before: discovered after every row ran ("internal error: FileNotFoundError", exit 1, every result lost)
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"n": 1}\n')
    assert cli.main(["batch", str(prog), str(rows), "--out", str(tmp_path / "nope" / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err and engine_calls == []


def test_run_out_in_a_missing_folder_is_refused_before_the_run(prog, tmp_path, capsys, engine_calls):
    assert cli.main(["run", str(prog), "--out", str(tmp_path / "nope" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err and engine_calls == []


def test_batch_out_equal_to_the_input_is_refused(prog, tmp_path, capsys):
    # before: it silently overwrote the input rows
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"n": 1}\n')
    assert cli.main(["batch", str(prog), str(rows), "--out", str(rows)]) == 2
    assert "same file" in capsys.readouterr().err and rows.read_text() == '{"n": 1}\n'


def test_every_input_line_is_accounted_for_and_bad_rows_alone_exit_2(prog, tmp_path, capsys):
    # before: blank lines vanished without a word (24 lines in, 22 out) and bad rows exited 1
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"n": 1}\n\n{"n": 2}\n   \nnot json\n{"t": NaN}\n{"t": 1e999}\n[1]\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())  # (rich wraps long lines)
    assert "skipped 2 blank lines" in err and "(lines 2, 4)" in err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in records] == [0, 1, 2, 3, 4, 5]  # in input order once the batch finished
    assert [r["line"] for r in records] == [1, 3, 5, 6, 7, 8]
    assert [r.get("error_kind") for r in records] == [None, None, "input", "input", "input", "input"]
    assert "NaN is not valid JSON" in records[3]["error"] and "in.jsonl:6" in records[3]["error"]
    assert "1e999 is too large for a float" in records[4]["error"]
    assert "NaN" not in out.read_text().replace("NaN is not", "").replace("no NaN", "")


def test_batch_rows_are_written_as_they_finish_and_ctrl_c_keeps_them(prog, tmp_path, capsys, monkeypatch):
    # before: Ctrl-C exited 130 and wrote nothing (no row was written until every row was done)
    import lmprog.runner as runner

    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(f'{{"n": {i}}}\n' for i in range(4)))
    out = tmp_path / "out.jsonl"
    real = runner.iter_batch

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(runner, "iter_batch", interrupted)
    # one row per engine call, so that rows finish one by one
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out), "--strategy", "greedy"]) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted: 2 rows written" in err and "--resume" in err
    done = [json.loads(x)["row"] for x in out.read_text().splitlines()]
    assert len(done) == 2

    monkeypatch.setattr(runner, "iter_batch", real)
    seen = []

    def counting(*args, **kwargs):
        seen.append(len(args[1]))
        yield from real(*args, **kwargs)

    monkeypatch.setattr(runner, "iter_batch", counting)
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out), "--strategy", "greedy", "--resume"]) == 0
    assert seen == [2]  # only the rows not yet in the output ran
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in records] == [0, 1, 2, 3]
    assert [r["inputs"]["n"] for r in records] == [0, 1, 2, 3]


def test_resume_drops_a_line_cut_short_and_refuses_another_inputs_output(prog, tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"n": 1}\n{"n": 2}\n')
    out = tmp_path / "out.jsonl"
    out.write_text('{"row": 0, "line": 1, "inputs": {"n": 1}, "strategy": "smc"}\n{"row": 1, "li')
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out), "--resume"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["row"] for r in records] == [0, 1] and "incomplete last line" in capsys.readouterr().err
    out.write_text('{"row": 0, "line": 1, "inputs": {"n": 7}}\n')
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out), "--resume"]) == 2
    assert "other inputs" in capsys.readouterr().err


def test_run_out_also_prints_the_table(prog, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["run", str(prog), "--out", str(out)]) == 0
    assert "probability" in capsys.readouterr().out and json.loads(out.read_text())["strategy"] == "smc"


# ------------------------------------------------------------------------------------------------ strict JSON


def test_set_nan_is_a_located_input_error(prog, capsys):
    # before: --set t=nan ran and wrote NaN into the JSON
    assert cli.main(["run", str(prog), "--set", "t=nan", "--json"]) == 2
    cap = capsys.readouterr()
    assert "p.lmp:3:1: bad value for input 't' (float): nan is not a finite number" in cap.err and cap.out == ""


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1.0, float("-inf")], 10**400])
def test_program_run_refuses_non_finite_inputs(value):
    src = 'input t: float = 0.5\ninput l: list = []\n"Q: [x]\\n" where x in ["a", "b"]\n'
    prog = lmprog.compile(src, "t.lmp")
    kw = {"l": value} if isinstance(value, list) else {"t": value}
    with pytest.raises(LmpError, match="bad value for input"):
        prog.run(lm=toy_lm(), **kw)


def test_result_json_is_strict_and_encodes_non_finite_values_explicitly():
    prog = lmprog.compile('"Q: [x]\\n" where x in ["a", "b"]\nreturn {"x": x, "v": inf_of(x)}\n', "t.lmp",
                          functions={"inf_of": lambda s: float("-inf") if s == "a" else float("nan")})
    result = prog.run(lm=toy_lm(), particles=8)
    text = result.to_json()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert {p["value"]["v"] for p in d["posterior"]} <= {"-Infinity", "NaN"}
    assert all(isinstance(s["log_weight"], float) for s in d["samples"])


# -------------------------------------------------------------------------------------- resource pre-flights


def test_a_loop_bound_beyond_the_models_context_is_refused_before_lowering(toy, capsys):
    # before: examples/shopping_list.lmp --set n=100000 ran 117 s, then "MemoryError: 18.3 GiB"
    path = str(ROOT / "examples" / "shopping_list.lmp")
    assert cli.main(["run", path, "--set", "n=100000"]) == 2
    err = capsys.readouterr().err
    assert "shopping_list.lmp:7:1: this loop runs 100000 times (range(n), n = 100000)" in err
    assert "reads at most 4096" in err and "at most 4096 iterations fit" in err


@pytest.mark.parametrize("seed", [str(2**70), "-1", str(2**32)])
def test_a_seed_outside_the_valid_range_exits_2(prog, capsys, seed):
    # before: --seed 2**70 gave "internal error: OverflowError"; 2**32 silently ran as seed 0
    assert cli.main(["run", str(prog), "--seed", seed]) == 2
    assert "seed must be from 0 to 2**32-1" in capsys.readouterr().err


def test_samples_that_cannot_fit_in_host_memory_are_refused_before_the_run(prog, capsys, engine_calls):
    # before: --particles 10000000 ran, then failed building ten million samples ("MemoryError" / exit 1)
    assert cli.main(["run", str(prog), "--particles", "100000000", "--memory-limit", "2G"]) == 2
    err = capsys.readouterr().err
    assert "of host memory" in err and "particles fit" in err and engine_calls == []


# ---------------------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("kwargs, message", [
    (dict(particles=2.5), "particles must be an integer, not 2.5"),
    (dict(particles=True), "particles must be an integer"),
    (dict(particles=0), "particles must be at least 1"),
    (dict(strategy=5), "strategy must be a strategy name"),
    (dict(strategy="smcc"), "unknown strategy 'smcc' — did you mean 'smc'?"),
    (dict(strategy="greedy", particles=4), "particles= does not apply to greedy()"),
    (dict(seed=2**70), "seed must be from 0 to 2**32-1"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(host_timeout=-1), "host_timeout must be a number of seconds"),
    (dict(lm="toy"), "lm must be a loaded language model"),
])
def test_program_run_validates_its_arguments_with_option_errors(kwargs, message):
    # before: particles=2.5 ran with 2, strategy=5 was ignored, seed=2**70 raised OverflowError
    prog = lmprog.compile(PROGRAM, "t.lmp")
    kwargs = {"lm": toy_lm(), **kwargs}
    with pytest.raises(OptionError) as info:
        prog.run(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_the_docstring_names_the_errors_run_raises():
    doc = lmprog.Program.run.__doc__
    for name in ("OptionError", "LmpError", "MemoryPlanError", "InferenceError", "RunError", "HostError"):
        assert name in doc
    assert issubclass(HostError, RunError)
