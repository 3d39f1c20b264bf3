"""Particle Gibbs: how its resampling threshold changes mixing, on a toy case with an exact posterior.

    python benchmarks/bench_pg_resampling.py [--thresholds 0 0.5 1] [--iterations 8 32 128] [--runs 500]

``tests/_inference_cases.py``'s ``rich_case`` (several holes, conditions, factors; posterior by enumeration).
For each ESS threshold (0: never resample, conditional importance sampling; 1: every decode step; between:
when the ESS falls under that share of the particles) and each iteration count, ``--runs`` independent particle
Gibbs runs of 4 particles; the chi-square p-value of their last references against the exact posterior (small:
not mixed yet; every threshold leaves the posterior invariant, so all of them grow with the iterations) and
the wall time (first configuration: compilation included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--particles", type=int, default=4)
    args = ap.parse_args()

    from _inference_cases import chi_square_pvalue, rich_case

    from lmprog.inference import run
    from lmprog.inference.exact import enumerate_program
    from lmprog.inference.strategies import ParticleGibbs

    lm, prog = rich_case()
    exact = enumerate_program(lm, prog).probs()
    default = ParticleGibbs.ess
    print(f"{'ESS threshold':>13} {'iterations':>10} {'p-value':>9} {'wall s':>7}")
    try:
        for thr in args.thresholds:
            ParticleGibbs.ess = thr  # the class constant the kernel reads (ParticleGibbs has no such option)
            for it in args.iterations:
                t = time.perf_counter()
                res = run(lm, prog, ParticleGibbs(iterations=it, particles=args.particles), seed=2, groups=args.runs)
                last = [res.sequences(g)[-1] for g in range(res.groups)]
                print(f"{thr:>13} {it:>10} {chi_square_pvalue(last, exact):>9.2g} {time.perf_counter() - t:>7.1f}",
                      flush=True)
    finally:
        ParticleGibbs.ess = default


if __name__ == "__main__":
    main()
