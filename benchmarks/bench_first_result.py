"""Time to the first result: ``lmprog run PROGRAM --json`` as a fresh process, warm caches.

    python benchmarks/bench_first_result.py [--program examples/capital.lmp] [--repeat 3]

Three configurations, alternated ``--repeat`` times so that machine load hits them alike:

* ``xla-cache-only``: the model file parsed again and every kernel traced and lowered, its executable from JAX's
  persistent compilation cache (what 0.1 did: ``LMPROG_NO_MODEL_CACHE=1 LMPROG_NO_KERNEL_CACHE=1``);
* ``model-cache``: the parsed model from lmprog's model cache, kernels as above;
* ``no-prefetch``: the model cache and the kernels' executables loaded from disk (no trace, no lowering), one
  after the other when the engine asks for them (the record of the last run's executables deleted first);
* ``all-caches``: as ``no-prefetch``, but the executables the last run of the same command used are
  deserialized in a background thread from the start of the process (``lmprog/inference/prefetch.py``);
* ``server``: the same command handed to a resident ``lmprog serve`` (``lmprog/server.py``), started before the
  runs and stopped after them: the client process imports no JAX, the server has the model and the kernels
  loaded (CPU time: the client's plus the server's during the command). The other configurations run with
  ``LMPROG_NO_SERVER=1``.

Every configuration runs once first to fill its caches (not timed). Reported per configuration (median over the
repeats): the process's wall time; inside the run (``stats``): the engine's compile time (tracing, lowering and
loading executables) and the run's wall time; outside the run: the rest (Python imports, parsing the program,
loading the model, printing). Also the CPU time of the process (user + system), which machine load disturbs
less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lmprog.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "xla-cache-only": {"LMPROG_NO_MODEL_CACHE": "1", "LMPROG_NO_KERNEL_CACHE": "1"},
    "model-cache": {"LMPROG_NO_KERNEL_CACHE": "1"},
    "no-prefetch": {},
    "all-caches": {},
    "server": {},
}
FORGET_RECENT = {"no-prefetch"}


def environment(name: str) -> dict:
    # PYTHONDONTWRITEBYTECODE (set on some CI machines) would make every run compile lmprog's sources again
    # (~0.3 s here); an installed lmprog has its bytecode, so it is dropped.
    e = {k: v for k, v in os.environ.items()
         if k not in ("LMPROG_NO_MODEL_CACHE", "LMPROG_NO_KERNEL_CACHE", "PYTHONDONTWRITEBYTECODE", "LMPROG_NO_SERVER")}
    e.update(CONFIGS[name])
    if name != "server":
        e["LMPROG_NO_SERVER"] = "1"
    return e


def lmprog(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmprog.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def server_pid() -> int | None:
    from lmprog import server

    info = server.request(server.socket_path(environment("server")), {"op": "ping"})
    return None if info is None else int(info["pid"])


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if there is none)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(program: str, name: str) -> dict:
    if name in FORGET_RECENT:
        shutil.rmtree(cache_dir() / "kernels" / "recent", ignore_errors=True)
    pid = server_pid() if name == "server" else None
    if name == "server" and pid is None:
        raise SystemExit("the server configuration needs a running server (main() starts one)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    served_before = process_cpu(pid)
    t = time.perf_counter()
    out = lmprog("run", program, "--json", env=environment(name))
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"lmprog run failed ({out.returncode}):\n{out.stderr[-2000:]}")
    stats = json.loads(out.stdout)["stats"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) + process_cpu(pid) - served_before
    return {"wall": wall, "cpu": cpu, "compile": stats["compile_s"], "run": stats["wall_s"],
            "outside": wall - stats["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", default="examples/capital.lmp")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; {args.program}")
    if "server" in args.configs:
        started = lmprog("serve", "--detach", "--idle-timeout", "3600", env=environment("server"))
        if started.returncode != 0:
            raise SystemExit(f"lmprog serve failed: {started.stderr.strip()}")
    try:
        for name in args.configs:  # fill the caches
            run_once(args.program, name)
        rows = {name: [] for name in args.configs}
        for _ in range(args.repeat):
            for name in args.configs:
                rows[name].append(run_once(args.program, name))
    finally:
        if "server" in args.configs:
            lmprog("serve", "--stop", env=environment("server"))
    print(f"{'configuration':<16} {'wall s':>7} {'cpu s':>7} {'compile s':>10} {'run s':>7} {'outside s':>10}")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:<16} {med['wall']:7.2f} {med['cpu']:7.2f} {med['compile']:10.2f} {med['run']:7.2f} "
              f"{med['outside']:10.2f}")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
