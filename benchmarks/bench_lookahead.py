"""Where the one-step lookahead (``lookahead=k``, lmprog/inference/lookahead.py) pays: spread over seeds, ESS, cost.

    python benchmarks/bench_lookahead.py capital [--particles 16 32 64] [--k 0 4] [--seeds 8]
    python benchmarks/bench_lookahead.py toy [--particles 16] [--k 0 1 2 4] [--groups 2000]

``capital``: ``examples/capital.lmp`` on SmolLM2-135M (its own ``smc(ess=0.5, systematic)``, with
``lookahead=k``), ``--seeds`` seeds per row: P(Paris) per seed, its mean and standard deviation over seeds,
the mean final ESS (of the returned weights), the mean and spread of ``log Z``, and cost: wall seconds,
LM forward calls and LM rows per run (medians; the first run of each row compiles and is not timed).

``toy``: the toy programs of ``tests/test_lookahead.py`` with ``--groups`` independent groups per row (one
compiled run): the mean ESS of a group's final weights, the standard deviation of ``log Z_hat`` over groups
and the relative error of the mean ``Z_hat`` against the exact ``Z`` (enumeration), for importance and SMC.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ess(log_w) -> float:
    lw = np.asarray(log_w, np.float64)
    lw = lw[np.isfinite(lw)]
    if lw.size == 0:
        return 0.0
    w = np.exp(lw - lw.max())
    return float(w.sum() ** 2 / (w ** 2).sum())


def capital(args) -> None:
    import lmprog
    from lmprog.inference import SMC

    prog = lmprog.load(os.path.join(ROOT, "examples", "capital.lmp"))
    print(f"# capital.lmp, smc(ess=0.5, systematic), {args.seeds} seeds; {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| particles | lookahead | P(Paris) per seed | mean | sd | ESS | log Z mean | log Z sd | wall s | "
          "LM calls | LM rows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.particles:
        for k in args.k:
            strategy = SMC(particles=n, ess=0.5, resample="systematic", lookahead=k)
            prog.run(strategy=strategy, seed=10_000)  # compile
            paris, ess, logz, wall, calls, rows = [], [], [], [], [], []
            for seed in range(args.seeds):
                t = time.perf_counter()
                r = prog.run(strategy=strategy, seed=seed)
                wall.append(time.perf_counter() - t)
                paris.append(r.probability(answer="Paris"))
                ess.append(_ess([s.log_weight for s in r.samples]))
                logz.append(r.log_evidence)
                calls.append(r.stats["forward_passes"])
                rows.append(r.stats.get("decode_rows", 0))
            print(f"| {n} | {k} | {' '.join(f'{p:.2f}' for p in paris)} | {statistics.mean(paris):.3f} | "
                  f"{statistics.stdev(paris):.3f} | {statistics.mean(ess):.1f} | {statistics.mean(logz):.3f} | "
                  f"{statistics.stdev(logz):.3f} | {statistics.median(wall):.2f} | {statistics.median(calls):.0f} | "
                  f"{statistics.median(rows):.0f} |", flush=True)


def toy(args) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_lookahead import myopic_case, terminator_case

    from lmprog.inference import SMC, Importance, run
    from lmprog.inference.exact import enumerate_program

    print(f"# toy programs, {args.groups} groups of {args.particles} particles; enumerate=False")
    print("| case | strategy | lookahead | ESS | sd log Z | mean Z / Z - 1 | LM calls | LM rows |")
    print("|---|---|---|---|---|---|---|---|")
    for name, case in (("terminator", terminator_case), ("myopic", myopic_case)):
        lm, prog = case()
        z = enumerate_program(lm, prog).z
        for sname in ("importance", "smc"):
            for k in args.k:
                cls = Importance if sname == "importance" else SMC
                r = run(lm, prog, cls(particles=args.particles, lookahead=k, enumerate=False), seed=1,
                        groups=args.groups)
                ess = np.mean([_ess(row) for row in r.log_weights])
                print(f"| {name} | {sname} | {k} | {ess:.1f} | {np.std(r.log_z):.3f} | "
                      f"{np.mean(np.exp(r.log_z)) / z - 1:+.3f} | {r.stats['forward_passes']} | "
                      f"{r.stats.get('decode_rows', 0)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("capital", "toy"))
    parser.add_argument("--particles", type=int, nargs="+", default=None)
    parser.add_argument("--k", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2000)
    args = parser.parse_args()
    if args.what == "capital":
        args.particles = args.particles or [16, 32, 64]
        args.k = args.k or [0, 4]
        capital(args)
    else:
        args.particles = (args.particles or [16])[0]
        args.k = args.k or [0, 1, 2, 4]
        toy(args)


if __name__ == "__main__":
    main()
