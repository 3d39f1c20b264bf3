"""Batch mode (``Program.run_batch`` / ``lmprog batch``) vs one run per row.

    python benchmarks/bench_batch.py [--model smollm2-135m] [--rows 8] [--particles 16] [--repeats 2]
                                     [--parts inprocess cli] [--cold-cache] [--strategy beam]

Runs a small program (one constrained hole, the row's input interpolated into the prompt) for ``--rows``
rows, four ways:

In process (each mode in a fresh Python process, the model loaded once before timing):

* ``batched``: ``program.run_batch(rows)``: one engine call with ``groups = rows`` (one compiled kernel set
  for ``rows x particles`` particles, a log Z per row).
* ``separate``: ``program.run(row)`` for each row in turn (kernels for ``particles`` particles, compiled by the
  first row, reused by the others).

  Reported: the first pass (cold: tracing and compiling, or loading from the persistent compilation cache)
  and the best warm pass over ``--repeats``, with the engine's compile seconds of the cold pass.

On the command line (what a user without batch mode would do; subprocess wall time, so model load and
compilation are included):

* ``lmprog run FILE --set country=... --json``, once per row (``--rows`` processes one after another);
* ``lmprog batch FILE rows.jsonl --out out.jsonl`` (one process).

``--cold-cache`` points every mode at a fresh, empty ``LMPROG_CACHE_DIR`` (persistent compilation cache and
constraint cache; one per mode, shared by that mode's processes), so cold figures include real XLA
compilation; by default the user's cache is used (warm once any run has compiled the same shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAM = '''infer smc(particles=16)
input country: str
"Q: What is the capital of {country}?\\nA: [city]\\n" where city matches r"[A-Z][a-z]+" and tokens(city) <= 6
return city
'''

COUNTRIES = ["France", "Japan", "Italy", "Spain", "Germany", "Canada", "Egypt", "Brazil", "Kenya", "Norway",
             "Chile", "India", "Peru", "Greece", "Poland", "Mexico"]


def _rows(n: int) -> list[dict]:
    return [{"country": COUNTRIES[i % len(COUNTRIES)]} for i in range(n)]


def worker(mode: str, args) -> dict:
    """One in-process mode, in this (fresh) process: cold pass, then ``repeats`` warm passes."""
    import lmprog
    from lmprog.runner import get_model

    prog = lmprog.compile(PROGRAM, "bench_batch.lmp")
    t = time.perf_counter()
    lm = get_model(args.model or prog.default_model)
    load_s = time.perf_counter() - t
    rows = _rows(args.rows)

    def once():
        if mode == "batched":
            out = prog.run_batch(rows, lm=lm, particles=args.particles, seed=0, strategy=args.strategy)
            return out, out[0].stats.get("compile_s", 0.0)
        out = [prog.run(row, lm=lm, particles=args.particles, seed=0, strategy=args.strategy) for row in rows]
        return out, sum(r.stats.get("compile_s", 0.0) for r in out)

    t = time.perf_counter()
    out, compile_s = once()
    cold = time.perf_counter() - t
    warm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        once()
        warm.append(time.perf_counter() - t)
    return {"mode": mode, "load_s": load_s, "cold_s": cold, "compile_s": compile_s, "warm_s": warm,
            "answers": [r.value for r in out], "log_z": [r.log_evidence for r in out], "model": lm.name}


def _top(record: dict):
    """The most probable value of a JSON result (``lmprog run --json`` / one ``lmprog batch`` line)."""
    post = record.get("posterior") or [{}]
    return post[0].get("value", record.get("error"))


def _env(cache: str | None) -> dict:
    env = dict(os.environ, LMPROG_NO_SERVER="1")  # every command in its own process, even if `lmprog serve` runs
    if cache:
        env["LMPROG_CACHE_DIR"] = cache
    return env


def _fresh_cache(args, tmp: Path, name: str) -> str | None:
    if not args.cold_cache:
        return None
    d = tmp / f"cache-{name}"
    d.mkdir()
    return str(d)


def inprocess(args, tmp: Path) -> list[dict]:
    out = []
    for mode in ("batched", "separate"):
        cmd = [sys.executable, __file__, "--worker", mode, "--rows", str(args.rows), "--particles",
               str(args.particles), "--repeats", str(args.repeats)] + (["--model", args.model] if args.model else []) \
            + (["--strategy", args.strategy] if args.strategy else [])
        proc = subprocess.run(cmd, env=_env(_fresh_cache(args, tmp, mode)), capture_output=True, text=True,
                              check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def cli(args, tmp: Path) -> list[dict]:
    exe = Path(sys.executable).with_name("lmprog")
    base = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from lmprog.cli import main; sys.exit(main())"]
    src = tmp / "bench_batch.lmp"
    src.write_text(PROGRAM)
    rows = _rows(args.rows)
    rows_file = tmp / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ["--particles", str(args.particles), "--seed", "0"] + (["--model", args.model] if args.model else []) \
        + (["--strategy", args.strategy] if args.strategy else [])
    results = []

    env = _env(_fresh_cache(args, tmp, "cli-separate"))
    t = time.perf_counter()
    answers = []
    for row in rows:
        proc = subprocess.run(base + ["run", str(src), "--set", f"country={row['country']}", "--json"] + opts,
                              env=env, capture_output=True, text=True, check=True)
        answers.append(_top(json.loads(proc.stdout)))
    results.append({"mode": f"{args.rows} x lmprog run --json", "wall_s": time.perf_counter() - t,
                    "answers": answers})

    env = _env(_fresh_cache(args, tmp, "cli-batch"))
    out_file = tmp / "out.jsonl"
    t = time.perf_counter()
    subprocess.run(base + ["batch", str(src), str(rows_file), "--out", str(out_file)] + opts, env=env,
                   capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    answers = [_top(json.loads(line)) for line in out_file.read_text().splitlines()]
    results.append({"mode": "lmprog batch (1 process)", "wall_s": wall, "answers": answers})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--strategy", default=None, help="instead of the program's smc, e.g. beam (--particles: its width)")
    ap.add_argument("--parts", nargs="+", choices=("inprocess", "cli"), default=["inprocess", "cli"])
    ap.add_argument("--cold-cache", action="store_true", help="a fresh, empty LMPROG_CACHE_DIR for every mode")
    ap.add_argument("--worker", choices=("batched", "separate"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    print(f"{args.strategy or 'smc'}: {args.rows} rows x {args.particles} particles; {platform.machine()}, {os.cpu_count()} CPUs; "
          f"{'fresh caches' if args.cold_cache else 'default caches'}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as d:
        tmp = Path(d)
        if "inprocess" in args.parts:
            table = inprocess(args, tmp)
            print(f"\nin process (model load {table[0]['load_s']:.1f} s, not included)")
            print(f"{'mode':<10} {'cold wall s':>12} {'compile s':>10} {'warm wall s':>12} {'warm s/row':>11}")
            for r in table:
                warm = min(r["warm_s"]) if r["warm_s"] else float("nan")
                print(f"{r['mode']:<10} {r['cold_s']:12.2f} {r['compile_s']:10.2f} {warm:12.2f} "
                      f"{warm / args.rows:11.3f}   (warm passes: {', '.join(f'{w:.2f}' for w in r['warm_s'])})")
            b, s = (min(r["warm_s"]) for r in table)
            print(f"warm speed-up {s / b:.2f}x; cold speed-up {table[1]['cold_s'] / table[0]['cold_s']:.2f}x")
            for r in table:
                print(f"  {r['mode']}: {r['answers']}")
        if "cli" in args.parts:
            table = cli(args, tmp)
            print("\ncommand line (subprocess wall time: model load, compilation and the run)")
            for r in table:
                print(f"{r['mode']:<28} {r['wall_s']:8.1f} s   {r['answers']}")
            print(f"speed-up {table[0]['wall_s'] / table[1]['wall_s']:.2f}x; load average now "
                  f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
