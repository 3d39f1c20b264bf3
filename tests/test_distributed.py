"""Batch rows over processes (:mod:`lmprog.distributed`): ``lmprog batch`` in two processes joined by
``jax.distributed`` on localhost, each running every other row of a tiny model, process 0 merging the parts;
a process killed mid-batch has its rows reported, not lost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmprog import distributed
from lmprog.backends.tiny import tiny_model
from lmprog.distributed import Processes

from model_files import write_gguf

PROGRAM = '''infer smc(particles=4, ess=0.5, resample="systematic")
input name: str
"Hi {name}: [a]\\n"
    where a matches r"[a-z]+" and tokens(a) <= 4
return a
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def batch_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    src = tiny_model(seed=5, intermediate_size=64)
    write_gguf(d / "tiny.gguf", src.config, src.params, src.tokenizer)
    (d / "p.lmp").write_text(PROGRAM)
    return d


def _inputs(d: Path, rows: list[str]) -> Path:
    path = d / f"in{len(rows)}.jsonl"
    path.write_text("".join(r + "\n" for r in rows))
    return path


def _start(d: Path, inputs: Path, out: Path, port: int, i: int, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmprog.cli", "batch", str(d / "p.lmp"), str(inputs), "--out", str(out),
           "--model", str(d / "tiny.gguf"), "--coordinator", f"localhost:{port}", "--num-processes", "2",
           "--process-id", str(i)]
    return subprocess.Popen(cmd, cwd=d, env=dict(os.environ, JAX_PLATFORMS="cpu", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def test_two_processes_write_every_row_once_in_order(batch_files):
    d = batch_files
    rows = [json.dumps({"name": f"n{i}"}) for i in range(5)]
    rows[3] = "not json"  # an input error, reported in its place by the process that owns the row
    inputs, out = _inputs(d, rows), d / "out.jsonl"
    port = _free_port()
    procs = [_start(d, inputs, out, port, i) for i in (0, 1)]
    outs = [p.communicate(timeout=1200) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [2, 2], outs  # every process (process 0 for the whole batch) reports the bad input row
    recs = _records(out)
    assert [r["row"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[3]["error_kind"] == "input" and "not valid JSON" in recs[3]["error"]
    for k in (0, 1, 2, 4):
        assert recs[k]["inputs"] == {"name": f"n{k}"}
        assert recs[k]["stats"]["processes"] == 2 and recs[k]["stats"]["devices"] == 1
        assert all(s["text"].startswith(f"Hi n{k}: ") for s in recs[k]["samples"])
    assert not list(d.glob("out.jsonl.part*"))  # merged, then removed
    assert "4/5 rows ok over 2 processes" in outs[0][1]


def test_a_killed_process_has_its_rows_reported(batch_files):
    d = batch_files
    inputs, out = _inputs(d, [json.dumps({"name": f"m{i}"}) for i in range(9)]), d / "killed.jsonl"
    port = _free_port()
    procs = [_start(d, inputs, out, port, i, LMPROG_HEARTBEAT_S="5") for i in (0, 1)]
    part = Path(distributed.part_path(str(out), Processes(2, 1)))
    deadline = time.monotonic() + 600
    while not part.exists() and procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    procs[1].kill()  # its part file is open: it is running its rows
    _, err = procs[0].communicate(timeout=1200)
    procs[1].communicate()
    assert procs[0].returncode == 1, err
    recs = _records(out)
    assert [r["row"] for r in recs] == list(range(9))  # every row once, in order
    lost = [r for r in recs if "error" in r]
    assert lost and all(r["row"] % 2 == 1 for r in lost)  # only process 1's rows
    assert all("process 1 of 2, which ran this row, died" in r["error"] for r in lost)
    assert all(r["inputs"] == {"name": f"m{r['row']}"} for r in recs if r["row"] % 2 == 0)


# ------------------------------------------------------------------------------------------------------
# The pieces
# ------------------------------------------------------------------------------------------------------


def test_rows_are_dealt_out_in_turn():
    p = [Processes(3, i) for i in range(3)]
    assert [[n for n in range(8) if q.mine(n)] for q in p] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert Processes().mine(5) and Processes(3, 0).owner(7) == 1


def test_options_come_from_flags_then_the_environment():
    assert distributed.resolve(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert distributed.resolve(environ=env) == ("h:1", 4, 2)
    assert distributed.resolve("x:9", 2, 1, environ=env) == ("x:9", 2, 1)
    assert distributed.initialize(environ={}) == Processes(1, 0)  # nothing set: one process, no runtime


@pytest.mark.parametrize("args, env, message", [
    ((None, 2, 0), {}, "--num-processes 2 needs --coordinator HOST:PORT"),
    (("h:1", 2, 2), {}, "--process-id 2 is out of range: processes are numbered 0 to 1"),
    (("h", 2, 0), {}, "expected HOST:PORT"),
    ((None, None, None), {"JAX_NUM_PROCESSES": "two", "JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES='two'"),
    (("h:1", 0, 0), {}, "at least 1"),
])
def test_bad_options_are_clear_errors(args, env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.resolve(*args, environ=env)


def test_merge_puts_rows_in_input_order_and_reports_missing_ones(tmp_path):
    out = str(tmp_path / "o.jsonl")
    procs = Processes(2, 0)
    Path(distributed.part_path(out, procs)).write_text('{"row": 2, "x": 1}\n{"row": 0, "x": 0}\n')
    Path(distributed.part_path(out, Processes(2, 1))).write_text('{"row": 1, "x": 2}\n{"row": 3, "x"')  # cut short
    missing = distributed.merge_parts(out, procs, {0: 1, 1: 2, 2: 4, 3: 5, 4: 6}, live={0, 1})
    assert missing == [3, 4]
    recs = _records(Path(out))
    assert [r["row"] for r in recs] == [0, 1, 2, 3, 4] and [r.get("x") for r in recs[:3]] == [0, 2, 1]
    assert recs[3]["line"] == 5 and "process 1 of 2, which ran this row, stopped before writing it" in recs[3]["error"]
    assert "process 0 of 2" in recs[4]["error"] and recs[4]["error_kind"] == "run"
    assert not list(tmp_path.glob("o.jsonl.part*"))


def test_several_processes_need_an_output_file(tmp_path, capsys):
    from lmprog.cli import main

    (tmp_path / "p.lmp").write_text(PROGRAM)
    (tmp_path / "in.jsonl").write_text('{"name": "a"}\n')
    code = main(["batch", str(tmp_path / "p.lmp"), str(tmp_path / "in.jsonl"), "--coordinator", "localhost:1",
                 "--num-processes", "2", "--process-id", "0"])
    assert code == 2 and "several processes (--num-processes) need --out" in capsys.readouterr().err
