"""``lmprog run`` and ``lmprog batch`` on a toy model: JSON output, exit codes, error lines, no tracebacks."""

from __future__ import annotations

import json

import pytest

from lmprog import cli
from test_lower import toy_lm

PROGRAM = '''infer smc(particles=16)
input n: int = 1
input who: str = "Q"
"{who}: [x]\\n" where x in ["a", "b", "ab"]
return x, n
'''


@pytest.fixture
def prog(tmp_path, monkeypatch):
    import lmprog.runner as runner

    monkeypatch.setattr(runner, "get_model", lambda name: toy_lm())
    path = tmp_path / "p.lmp"
    path.write_text(PROGRAM)
    return path


def test_run_json_prints_the_documented_object(prog, capsys):
    assert cli.main(["run", str(prog), "--set", "n=4", "--json", "--seed", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d) == {"strategy", "properly_weighted", "samples", "posterior", "log_evidence", "log_evidence_se", "ess",
                      "stats", "distributions"}  # the enumerated hole's table (docs/running.md)
    assert [e["value"] for e in d["distributions"]["x"]] and d["stats"]["enumerated"]["x"]["paths"] >= 3
    assert d["strategy"] == "smc" and d["properly_weighted"] is True
    assert abs(sum(p["probability"] for p in d["posterior"]) - 1) < 1e-6
    assert all(p["value"]["n"] == 4 for p in d["posterior"])
    assert len(d["samples"]) == 16


def test_run_table_and_out_file(prog, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["run", str(prog), "--particles", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "probability" in text and "log Z" in text and "ESS" in text and "compile" in text
    assert json.loads(out.read_text())["strategy"] == "smc"


@pytest.mark.parametrize("args, message", [
    (["--set", "n=x"], "bad value for input 'n'"),
    (["--set", "m=1"], "unknown input 'm'"),
    (["--set", "novalue"], "--set expects NAME=VALUE"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
])
def test_run_program_errors_exit_2(prog, capsys, args, message):
    assert cli.main(["run", str(prog), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_all_particles_dead_exits_1_naming_the_constraint(tmp_path, monkeypatch, capsys):
    import lmprog.runner as runner

    monkeypatch.setattr(runner, "get_model", lambda name: toy_lm())
    path = tmp_path / "dead.lmp"
    path.write_text('infer smc(particles=16)\n"Q: [x]\\n" where x in ["a", "b", "ab"]\ncondition x == "c"\n')
    assert cli.main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "every particle died" in err and 'dead.lmp:3:1: condition x == "c"' in err and "Traceback" not in err


def test_missing_file_exits_2(capsys):
    assert cli.main(["run", "/nonexistent/x.lmp"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_batch_one_line_per_row_in_order_bad_rows_do_not_stop_others(prog, tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"n": 1}\n{"n": "x"}\nnot json\n{"n": 3, "who": "Q"}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out)]) == 2  # only bad input rows failed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["row"] for x in lines] == [0, 1, 2, 3]
    assert lines[0]["posterior"][0]["value"]["n"] == 1 and lines[3]["posterior"][0]["value"]["n"] == 3
    assert "bad value for input 'n'" in lines[1]["error"] and "not valid JSON" in lines[2]["error"]
    assert "Traceback" not in capsys.readouterr().err


def test_batch_runs_rows_of_the_same_structure_in_one_engine_call(prog, tmp_path, engine_calls):
    groups = engine_calls
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"n": 1}\n{"n": 2}\n{"n": 3}\nnot json\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["batch", str(prog), str(rows), "--out", str(out)]) == 2  # the bad line: an input error
    assert groups == [3]  # the three good rows: one engine call, one group each
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["posterior"][0]["value"]["n"] for x in lines[:3]] == [1, 2, 3]
    assert "not valid JSON" in lines[3]["error"]


def test_no_enumerate_runs_every_hole_token_by_token(prog, capsys):
    assert cli.main(["run", str(prog), "--json", "--seed", "1"]) == 0
    assert "x" in json.loads(capsys.readouterr().out)["stats"]["enumerated"]  # the default
    assert cli.main(["run", str(prog), "--json", "--seed", "1", "--no-enumerate"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "enumerated" not in d["stats"] and "distributions" not in d
    assert cli.main(["run", str(prog), "--seed", "1"]) == 0
    assert "enumerated: x (" in capsys.readouterr().out
