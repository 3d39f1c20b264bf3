"""``Program.run_batch`` (every row's particles in one engine call) vs one run per row.

    python benchmarks/bench_batch.py [--model smollm2-135m] [--rows 8] [--particles 16] [--repeats 2]

Runs a small program (one constrained hole, the row's input interpolated into the prompt) for ``--rows``
rows, both ways, on the same loaded model:

* ``batched``: ``program.run_batch(rows)``: one engine call with ``groups = rows`` (one compiled kernel set
  for ``rows x particles`` particles, a log Z per row).
* ``separate``: ``program.run(row)`` for each row in turn (kernels for ``particles`` particles, compiled by the
  first row, reused by the others).

Reported per mode: the first (cold: includes compiling) and the best warm wall time over ``--repeats``, and
the engine's compile seconds of the cold pass. The two modes compile different kernel shapes, so the cold
numbers do not share compilations (only the constraint automaton caches are shared).
"""

from __future__ import annotations

import argparse
import time

PROGRAM = '''infer smc(particles=16)
input country: str
"Q: What is the capital of {country}?\\nA: [city]\\n" where city matches r"[A-Z][a-z]+" and tokens(city) <= 6
return city
'''

COUNTRIES = ["France", "Japan", "Italy", "Spain", "Germany", "Canada", "Egypt", "Brazil", "Kenya", "Norway",
             "Chile", "India", "Peru", "Greece", "Poland", "Mexico"]


def main() -> None:
    import lmprog
    from lmprog.runner import get_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    prog = lmprog.compile(PROGRAM, "bench_batch.lmp")
    t = time.perf_counter()
    lm = get_model(args.model or prog.default_model)
    load_s = time.perf_counter() - t
    rows = [{"country": COUNTRIES[i % len(COUNTRIES)]} for i in range(args.rows)]

    def batched():
        out = prog.run_batch(rows, lm=lm, particles=args.particles, seed=0)
        return out, out[0].stats.get("compile_s", 0.0)

    def separate():
        out = [prog.run(row, lm=lm, particles=args.particles, seed=0) for row in rows]
        return out, sum(r.stats.get("compile_s", 0.0) for r in out)

    table = []
    for name, fn in (("batched", batched), ("separate", separate)):
        t = time.perf_counter()
        out, compile_s = fn()
        cold = time.perf_counter() - t
        warm = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            warm = min(warm, time.perf_counter() - t)
        answers = [r.value for r in out]
        table.append((name, cold, compile_s, warm, answers))

    print(f"model {getattr(lm, 'name', '?')} (load {load_s:.1f} s), {args.rows} rows x {args.particles} particles")
    print(f"{'mode':<10} {'cold wall s':>12} {'compile s':>10} {'warm wall s':>12} {'warm s/row':>11}")
    for name, cold, comp, warm, _ in table:
        print(f"{name:<10} {cold:12.2f} {comp:10.2f} {warm:12.2f} {warm / args.rows:11.3f}")
    for name, *_, answers in table:
        print(f"{name}: {answers}")


if __name__ == "__main__":
    main()
