"""``lmprog serve`` (:mod:`lmprog.server`): commands handed to a resident process give what they give in their
own process (output, exit codes, located errors), Ctrl-C interrupts the command and not the server, a busy server
or one started for another environment is bypassed, and a killed server's socket does not get in the way."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmprog import server
from lmprog.backends.tiny import tiny_model

from model_files import write_gguf

PROGRAM = '''infer smc(particles=8, ess=0.5)
input who: str = "Q"
"{who}: [x]\\n" where x matches r"[a-c]{1,3}" and tokens(x) <= 3
return x
'''

SLOW_PROGRAM = '''import "slow.py" as s
infer importance(particles=2)
"A: [x]\\n" where x in ["a", "b"]
let w = s.wait(x)
return x
'''

SLOW_PY = '''import time


def wait(x):
    time.sleep(120)
    return 0
'''

TIMING = {"wall_s", "engine_wall_s", "compile_s", "constraint_compile_s", "lower_s", "load_s"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a tiny GGUF model and programs, and the environment of a private cache (so no server the
    developer runs is found, and this module's server is found only by its own commands)."""
    d = tmp_path_factory.mktemp("serve")
    src = tiny_model(seed=7, intermediate_size=64)
    write_gguf(d / "tiny.gguf", src.config, src.params, src.tokenizer)
    (d / "p.lmp").write_text(PROGRAM)
    (d / "slow.lmp").write_text(SLOW_PROGRAM)
    (d / "slow.py").write_text(SLOW_PY)
    (d / "bad.lmp").write_text('infer smc(particles=4)\n"A: [x]" where x matches r"[a-"\nreturn x\n')
    env = {k: v for k, v in os.environ.items() if k != "LMPROG_NO_SERVER"}
    env.update(JAX_PLATFORMS="cpu", LMPROG_CACHE_DIR=str(d / "cache"))
    yield d, env
    server.request(server.socket_path(env), {"op": "stop"}, timeout=5.0)


def lmprog(d: Path, env: dict, *args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmprog.cli", *args], cwd=d, env=dict(env, **extra),
                          capture_output=True, text=True, timeout=600)


def ping(env: dict) -> dict | None:
    return server.request(server.socket_path(env), {"op": "ping"})


@pytest.fixture(scope="module")
def running(world):
    d, env = world
    out = lmprog(d, env, "serve", "--detach", "--idle-timeout", "300")
    assert out.returncode == 0, out.stderr
    assert "running on" in out.stdout and ping(env)["served"] == 0
    return d, env


def _without_timing(result: dict) -> dict:
    return {**result, "stats": {k: v for k, v in result["stats"].items() if k not in TIMING}}


def test_a_command_in_the_server_prints_what_it_prints_in_its_own_process(running):
    d, env = running
    args = ("run", "p.lmp", "--model", "tiny.gguf", "--json", "--seed", "3", "--set", "who=R")
    served = lmprog(d, env, *args)
    assert served.returncode == 0, served.stderr
    assert ping(env)["served"] == 1  # it ran there
    local = lmprog(d, env, *args, LMPROG_NO_SERVER="1")
    assert local.returncode == 0, local.stderr
    assert ping(env)["served"] == 1  # this one did not
    a, b = json.loads(served.stdout), json.loads(local.stdout)
    assert _without_timing(a) == _without_timing(b)
    assert a["posterior"] and all(re.fullmatch("[a-c]{1,3}", p["value"]["x"]) for p in a["posterior"])
    table = lmprog(d, env, "run", "p.lmp", "--model", "tiny.gguf", "--seed", "3", "--set", "who=R", "--out", "r.json")
    assert table.returncode == 0 and "probability" in table.stdout and ping(env)["served"] == 2
    assert json.loads((d / "r.json").read_text())["posterior"] == a["posterior"]  # --out: relative to the client


def test_errors_usage_and_help_through_the_server(running):
    d, env = running
    before = ping(env)["served"]
    bad = lmprog(d, env, "run", "bad.lmp", "--model", "tiny.gguf")
    assert bad.returncode == 2 and "bad.lmp:2:" in bad.stderr and "^" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    usage = lmprog(d, env, "run", "p.lmp", "--particles", "0")
    assert usage.returncode == 2 and "expected a positive integer" in usage.stderr
    helped = lmprog(d, env, "run", "--help")
    assert helped.returncode == 0 and "--memory-limit" in helped.stdout
    missing = lmprog(d, env, "run", "nope.lmp", "--model", "tiny.gguf")
    assert missing.returncode == 2 and "nope.lmp" in missing.stderr and "Traceback" not in missing.stderr
    assert ping(env)["served"] == before + 4


def _wait_busy(env: dict, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = ping(env)
        if info and info["busy"]:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the server never took the command")


def test_ctrl_c_stops_the_command_not_the_server_and_a_busy_server_is_bypassed(running):
    d, env = running
    before = ping(env)["served"]
    slow = subprocess.Popen([sys.executable, "-m", "lmprog.cli", "run", "slow.lmp", "--model", "tiny.gguf",
                             "--host-timeout", "0"], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_busy(env, slow)
        # meanwhile another command runs in its own process, with the right result
        other = lmprog(d, env, "run", "p.lmp", "--model", "tiny.gguf", "--json", "--seed", "3")
        assert other.returncode == 0 and json.loads(other.stdout)["strategy"] == "smc"
        assert ping(env)["busy"] and ping(env)["served"] == before
        time.sleep(0.5)  # into the sleeping helper
        t0 = time.monotonic()
        slow.send_signal(signal.SIGINT)
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 30  # not the helper's 120 s
    after = lmprog(d, env, "run", "p.lmp", "--model", "tiny.gguf", "--json", "--seed", "3")
    assert after.returncode == 0 and ping(env)["served"] == before + 2 and not ping(env)["busy"]


@pytest.mark.parametrize("own_process", [True, False])
@pytest.mark.parametrize("command", ["run", "batch"])
def test_a_reader_that_goes_away_ends_the_command_quietly(running, own_process, command):
    """``lmprog run ... | head``: the pipe is closed before the result is printed; exit 1, no message."""
    d, env = running
    (d / "rows.jsonl").write_text('{"who": "A"}\n{"who": "B"}\n')
    args = ["run", "p.lmp"] if command == "run" else ["batch", "p.lmp", "rows.jsonl"]
    proc = subprocess.Popen([sys.executable, "-m", "lmprog.cli", *args, "--model", "tiny.gguf"], cwd=d,
                            env=dict(env, **({"LMPROG_NO_SERVER": "1"} if own_process else {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=600) == 1
    assert "internal error" not in err and "Traceback" not in err and "Exception" not in err, err


def test_a_server_for_another_environment_is_not_used(running):
    d, env = running
    before = ping(env)["served"]
    other = lmprog(d, env, "run", "p.lmp", "--model", "tiny.gguf", "--json", LMPROG_SOMETHING="1")
    assert other.returncode == 0 and json.loads(other.stdout)["strategy"] == "smc"
    assert ping(env)["served"] == before
    assert server.socket_path(dict(env, LMPROG_SOMETHING="1")) != server.socket_path(env)
    assert server.socket_path(dict(env, LMPROG_NO_SERVER="1")) == server.socket_path(env)


def test_stop_and_a_killed_servers_socket(world, running):
    d, env = world
    stopped = lmprog(d, env, "serve", "--stop")
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    path = server.socket_path(env)
    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists()
    assert lmprog(d, env, "serve", "--status").returncode == 1
    # a server killed without a chance to clean up leaves its socket: commands run here, a new server replaces it
    fg = subprocess.Popen([sys.executable, "-m", "lmprog.cli", "serve"], cwd=d, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while ping(env) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ping(env)["pid"] == fg.pid
    again = lmprog(d, env, "serve")
    assert again.returncode == 2 and "already running" in again.stderr
    fg.kill()
    fg.wait()
    assert path.exists()
    local = lmprog(d, env, "run", "p.lmp", "--model", "tiny.gguf", "--json")
    assert local.returncode == 0 and json.loads(local.stdout)["strategy"] == "smc"
    restarted = lmprog(d, env, "serve", "--detach", "--idle-timeout", "300")
    assert restarted.returncode == 0, restarted.stderr
    assert ping(env)["served"] == 0


def test_commands_that_are_never_forwarded():
    env = {"PATH": "/usr/bin"}
    assert not server._forwardable(["check", "p.lmp"], env)
    assert not server._forwardable(["batch", "p.lmp", "/dev/stdin"], env)
    assert not server._forwardable(["batch", "p.lmp", "in.jsonl", "--coordinator", "h:1"], env)
    assert not server._forwardable(["run", "p.lmp"], {"LMPROG_NO_SERVER": "1"})
    assert server._forwardable(["run", "p.lmp", "--json"], env)


def test_the_client_imports_no_jax(tmp_path):
    code = ("import sys; from lmprog import cli, server; "
            "print(server.forward(['run', 'p.lmp']), 'jax' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LMPROG_CACHE_DIR=str(tmp_path)))
    assert out.returncode == 0 and out.stdout.split() == ["None", "False", "False"], out


def test_a_server_that_cannot_listen_says_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = dict(os.environ, LMPROG_CACHE_DIR=str(blocker / "cache"))
    for args in (["serve"], ["serve", "--detach"]):
        out = subprocess.run([sys.executable, "-m", "lmprog.cli", *args], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 2 and "lmprog: error: cannot" in out.stderr and "Not a directory" in out.stderr
        assert "Traceback" not in out.stderr
