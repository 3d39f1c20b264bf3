"""Particles sharded over (simulated) devices, and batch rows over processes: overhead and correctness.

    python benchmarks/bench_devices.py [--model smollm2-135m] [--particles 16] [--tokens 24] [--devices 1 2 4]
                                       [--repeats 1] [--batch-rows 4] [--warm-cache] [--quick]
                                       [--out benchmarks/results/devices.json]

**Particles over devices.** For each device count ``K`` of ``--devices``, a fresh Python process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=K JAX_PLATFORMS=cpu`` (``K`` CPU "devices" in one
process, all on the same cores) loads the model (timed apart) and runs :data:`PROGRAM` (SMC, one open hole of
exactly ``--tokens`` tokens, so every particle decodes that many tokens) with
``program.run(lm=lm, particles=P, seed=0, devices=K)``: a first run (tracing and compiling the sharded
kernels), then ``--repeats`` warm runs in the same process. Reported per ``K``: the first run's wall and the
engine's ``compile_s``, the best warm wall, warm tokens/s (``stats.tokens``, particles x hole tokens, over the
warm wall), ``stats.devices`` (where the run went), and whether the warm run's particles (their texts, in
particle order) equal those of the first device count (same seed: docs/devices.md promises the same particles
up to the order of float reductions), with the number of equal particles and the log Z difference.

By default each device count gets a fresh kernel cache (``LMPROG_CACHE_DIR`` a temporary folder whose
``jax/`` and ``kernels/`` are empty; the converted model, vocabulary index and automata are linked from the
user's cache), so the first run's figures are real compilation for every ``K``: one device would otherwise load
its kernels from lmprog's disk cache while sharded kernels are never kept there (``inference/aot.py``).
``--warm-cache`` uses the user's cache as it is.

**Batch rows over processes** (``--batch-rows R``, 0 to skip): ``lmprog batch`` of :data:`BATCH_PROGRAM` over
``R`` rows, once as one process and once as two (``--coordinator 127.0.0.1:PORT --num-processes 2
--process-id I``, both on this host, one CPU device each); the subprocess wall time of each (model load and
compilation included; for two processes: from the start of the first to the end of the last) and whether the
merged output's particles equal, row by row, the one-process output's and those of each process's rows run as
a one-process ``run_batch`` of their own (one more child process). The rows of one engine call are groups
drawn from one key, so a row's particles depend on its place in its call: only the second comparison is
expected to be all equal.

``--quick``: devices 1 2, 8 particles, 8 tokens, no batch part, no results file (a smoke test, about a
minute here). Results go to ``--out`` (default ``benchmarks/results/devices.json``; JSON: ``meta`` with the
machine and the command, ``devices`` and ``batch`` rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROGRAM = '''infer smc(particles=16, ess=0.5)
"Write a short story about a robot who learns to paint.\\nStory: [story]" where tokens(story) == {tokens}
return story
'''

BATCH_PROGRAM = '''infer smc(particles=16, ess=0.5)
input topic: str
"Write a short story about {{topic}}.\\nStory: [story]" where tokens(story) == {tokens}
return story
'''

TOPICS = ["a robot who learns to paint", "a cat", "the sea", "a lighthouse keeper", "a lost key", "a snowy town",
          "a dragon", "a clock"]

# Cache folders shared with the user's cache in a fresh one (what is not compiled code).
SHARED_CACHE = ("models", "vocab", "automata")


# ------------------------------------------------------------------------------------------------ worker


def worker(args) -> dict:
    """One device count, in this (fresh) process: model load, first run, warm runs."""
    import jax

    import lmprog
    from lmprog.runner import get_model

    k = args.worker
    prog = lmprog.compile(PROGRAM.format(tokens=args.tokens), "bench_devices.lmp")
    t = time.perf_counter()
    lm = get_model(args.model or prog.default_model)
    load_s = time.perf_counter() - t

    def once():
        t = time.perf_counter()
        r = prog.run(lm=lm, particles=args.particles, seed=0, devices=k)
        return r, time.perf_counter() - t

    first, first_s = once()
    warm_s, last = [], first
    for _ in range(args.repeats):
        last, w = once()
        warm_s.append(w)
    st = last.stats
    return {
        "requested": k, "local_devices": jax.local_device_count(), "platform": jax.devices()[0].platform,
        "model": lm.name, "load_s": load_s, "first_s": first_s, "first_compile_s": first.stats.get("compile_s"),
        "warm_s": warm_s, "warm_compile_s": st.get("compile_s"), "tokens": st.get("tokens"),
        "devices": st.get("devices"), "processes": st.get("processes"), "particles": st.get("particles"),
        "texts": [s.text for s in last.samples], "log_z": last.log_evidence,
        "first_equals_warm": [s.text for s in first.samples] == [s.text for s in last.samples],
    }


def batch_reference(args) -> dict:
    """Each process's share of the rows (rows ``n % 2 == i``) as a one-process ``run_batch`` of its own: what the
    two-process batch should reproduce row for row (a row's draws depend on its place in its engine call)."""
    import lmprog
    from lmprog.runner import get_model

    prog = lmprog.load(args.batch_ref[0])
    rows = [json.loads(line) for line in Path(args.batch_ref[1]).read_text(encoding="utf-8").splitlines()]
    lm = get_model(args.model or prog.default_model)
    texts = {}
    for i in range(2):
        share = list(range(i, len(rows), 2))
        for n, r in zip(share, prog.run_batch([rows[n] for n in share], lm=lm, particles=args.particles, seed=0)):
            texts[n] = [s.text for s in r.samples]
    return {"texts": [texts[n] for n in range(len(rows))]}


# ------------------------------------------------------------------------------------------------ parent


def _env(devices: int, cache: str | None) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    if cache:
        env["LMPROG_CACHE_DIR"] = cache
    return env


def _fresh_cache(args, tmp: Path, name: str) -> str | None:
    """A cache folder with no compiled kernels (``None`` with ``--warm-cache``: the user's cache)."""
    if args.warm_cache:
        return None
    from lmprog.paths import cache_dir

    d = tmp / f"cache-{name}"
    d.mkdir()
    for sub in SHARED_CACHE:
        if (cache_dir() / sub).is_dir():
            (d / sub).symlink_to(cache_dir() / sub, target_is_directory=True)
    return str(d)


def _run_child(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{shlex.join(cmd)} exited {proc.returncode}")
    return proc


def devices_part(args, tmp: Path) -> list[dict]:
    rows = []
    for k in args.devices:
        cmd = [sys.executable, __file__, "--worker", str(k), "--particles", str(args.particles), "--tokens",
               str(args.tokens), "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else [])
        t = time.perf_counter()
        proc = _run_child(cmd, _env(k, _fresh_cache(args, tmp, f"devices{k}")), args.timeout)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["process_s"] = time.perf_counter() - t
        r["load_after"] = os.getloadavg()[0]
        rows.append(r)
        print(f"  {k} device(s): first {r['first_s']:.1f} s, warm {min(r['warm_s']):.1f} s, "
              f"stats.devices {r['devices']} (process {r['process_s']:.0f} s)", flush=True)
    ref = rows[0]
    for r in rows:
        same = sum(a == b for a, b in zip(r["texts"], ref["texts"]))
        r["equal_to"] = ref["requested"]
        r["texts_equal"] = r["texts"] == ref["texts"]
        r["equal_particles"] = same
        r["log_z_diff"] = (None if r["log_z"] is None or ref["log_z"] is None else r["log_z"] - ref["log_z"])
        r["warm_tokens_per_s"] = r["tokens"] / min(r["warm_s"]) if r["warm_s"] else None
    return rows


def _lmprog_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("lmprog")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from lmprog.cli import main; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts(path: Path) -> list:
    """Per row of a batch output: its particles' texts (or its error)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        out.append([s["text"] for s in rec.get("samples", [])] if "error" not in rec else {"error": rec["error"]})
    return out


def batch_part(args, tmp: Path) -> dict:
    src = tmp / "bench_devices_batch.lmp"
    src.write_text(BATCH_PROGRAM.format(tokens=args.tokens))
    rows_file = tmp / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"topic": TOPICS[i % len(TOPICS)]}) + "\n"
                                 for i in range(args.batch_rows)))
    opts = ["--particles", str(args.particles), "--seed", "0"] + (["--model", args.model] if args.model else [])
    base = _lmprog_cmd() + ["batch", str(src), str(rows_file)]

    one = tmp / "one.jsonl"
    t = time.perf_counter()
    _run_child(base + ["--out", str(one)] + opts, _env(1, _fresh_cache(args, tmp, "batch1")), args.timeout)
    one_s = time.perf_counter() - t
    print(f"  1 process: {one_s:.1f} s", flush=True)

    two = tmp / "two.jsonl"
    coord = f"127.0.0.1:{_free_port()}"
    env = _env(1, _fresh_cache(args, tmp, "batch2"))  # one cache for both processes, as on one host
    procs, walls = [], [None, None]
    t = time.perf_counter()
    for i in range(2):
        cmd = base + ["--out", str(two), "--coordinator", coord, "--num-processes", "2", "--process-id", str(i)] + opts
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.perf_counter() + args.timeout
    errs = []
    for i, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"2-process batch: process {i} still running after {args.timeout:.0f} s")
        walls[i] = time.perf_counter() - t
        errs.append(err)
        if p.returncode != 0:
            sys.stderr.write(err[-4000:])
            raise SystemExit(f"2-process batch: process {i} exited {p.returncode}")
    two_s = max(walls)
    print(f"  2 processes: {two_s:.1f} s (process 0 done at {walls[0]:.1f} s, process 1 at {walls[1]:.1f} s)",
          flush=True)
    a, b = _texts(one), _texts(two)
    cmd = [sys.executable, __file__, "--batch-ref", str(src), str(rows_file), "--particles", str(args.particles)]
    t = time.perf_counter()
    proc = _run_child(cmd + (["--model", args.model] if args.model else []), env, args.timeout)
    ref_s = time.perf_counter() - t
    ref = json.loads(proc.stdout.strip().splitlines()[-1])["texts"]
    print(f"  reference (each process's rows as a 1-process run_batch): {ref_s:.1f} s", flush=True)
    return {"rows": args.batch_rows, "coordinator": coord, "one_process_s": one_s, "two_processes_s": two_s,
            "process_s": walls, "rows_equal": [x == y for x, y in zip(a, b)], "row_count": [len(a), len(b)],
            "rows_equal_share": [x == y for x, y in zip(ref, b)], "reference_s": ref_s,
            "summary": (errs[0].strip().splitlines() or [""])[-1]}


def _machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(), "mem_gib": mem,
            "python": platform.python_version()}


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def print_tables(data: dict) -> None:
    m = data["meta"]
    print(f"\n{m['model']}, smc, {m['particles']} particles, hole of {m['tokens']} tokens, seed 0; "
          f"{'user cache' if m['warm_cache'] else 'fresh kernel cache per device count'}")
    print("| devices (XLA_FLAGS count) | stats.devices | load s | first run s | compile s | warm s | warm tokens/s "
          f"| texts = {data['devices'][0]['requested'] if data['devices'] else 1}-device run | log Z diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in data["devices"]:
        eq = "equal" if r["texts_equal"] else f"differ ({r['equal_particles']}/{len(r['texts'])} equal)"
        print(f"| {r['requested']} | {r['devices']} | {r['load_s']:.1f} | {r['first_s']:.1f} | "
              f"{_fmt(r['first_compile_s'])} | {min(r['warm_s']):.2f} | {_fmt(r['warm_tokens_per_s'])} | {eq} | "
              f"{_fmt(r['log_z_diff'], '.2g')} |")
    b = data.get("batch")
    if b:
        eq = sum(b["rows_equal"])
        print(f"\nlmprog batch, {b['rows']} rows x {m['particles']} particles (subprocess wall: start-up, model load, "
              "compilation, rows)")
        n = len(b["rows_equal"])
        print("| processes | wall s | rows' particles = 1-process batch | = each process's rows batched alone |")
        print("|---:|---:|---|---|")
        print(f"| 1 | {b['one_process_s']:.1f} | - | - |")
        print(f"| 2 (`--coordinator {b['coordinator']} --num-processes 2`) | {b['two_processes_s']:.1f} "
              f"| {eq}/{n} rows equal | {sum(b['rows_equal_share'])}/{n} rows equal |")
    print(f"\nload average {m['load_before']} before, {m['load_after']} after; {m['machine']['cpu']}, "
          f"{m['machine']['cores']} cores, {m['machine']['mem_gib']} GiB; jax {m['jax']}")
    print(f"command: {m['command']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name (default: the programs' default, smollm2-135m)")
    ap.add_argument("--particles", type=int, default=None, help="particles (default 16; a multiple of every count)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens of the hole (default 24)")
    ap.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default 1 2 4)")
    ap.add_argument("--repeats", type=int, default=1, help="warm runs per device count (the best is reported)")
    ap.add_argument("--batch-rows", type=int, default=None, help="rows of the process part (default 4; 0: skip)")
    ap.add_argument("--warm-cache", action="store_true", help="use the user's kernel cache (default: a fresh one)")
    ap.add_argument("--quick", action="store_true", help="devices 1 2, 8 particles, 8 tokens, no batch part")
    ap.add_argument("--timeout", type=float, default=900, help="seconds each child process may take")
    ap.add_argument("--out", default=None,
                    help="results file (default: benchmarks/results/devices.json, none with --quick; '': none)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch-ref", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.batch_ref:
        print(json.dumps(batch_reference(args)))
        return
    q = args.quick
    args.particles = args.particles or (8 if q else 16)
    args.tokens = args.tokens or (8 if q else 24)
    args.devices = args.devices or ([1, 2] if q else [1, 2, 4])
    args.batch_rows = args.batch_rows if args.batch_rows is not None else (0 if q else 4)
    if args.out is None:
        args.out = "" if q else str(HERE / "results" / "devices.json")
    bad = [k for k in args.devices if k < 1 or args.particles % k]
    if bad:
        ap.error(f"--particles {args.particles} must be a multiple of every device count (not of {bad})")

    import jax  # only its version: the children run the models

    command = "python benchmarks/bench_devices.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {"model": args.model or "smollm2-135m", "particles": args.particles, "tokens": args.tokens,
            "repeats": args.repeats, "warm_cache": args.warm_cache, "machine": _machine(), "jax": jax.__version__,
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": command.strip()}
    print(f"{args.particles} particles x {args.tokens} tokens over devices {args.devices}; "
          f"{meta['machine']['cpu']}, {meta['machine']['cores']} cores; load average {meta['load_before']}", flush=True)
    t0 = time.perf_counter()
    data = {"meta": meta, "devices": [], "batch": None}
    with tempfile.TemporaryDirectory(prefix="bench_devices_") as d:
        tmp = Path(d)
        data["devices"] = devices_part(args, tmp)
        if args.batch_rows > 0:
            data["batch"] = batch_part(args, tmp)
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["total_s"] = time.perf_counter() - t0
    if data["devices"]:
        meta["model"] = data["devices"][0]["model"]
    print_tables(data)
    print(f"total {meta['total_s']:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
