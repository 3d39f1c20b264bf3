"""MCMC speed: MH steps per second and time to reach TV < 0.05 on a toy case; on the default model, the cost
of one suffix move relative to one SMC token step.

    python benchmarks/bench_mcmc.py [--part toy|model|both] [--chains 2000] [--model smollm2-135m]

``toy``: two programs of ``tests/_inference_cases.py`` with exact posteriors by enumeration: ``bias_case``
(2 executions; the locally-constrained proposal gives the rarer one 50 % instead of 2.2 %, so chains start
far from the posterior) and ``length_case`` (364 executions of 1 to 6 tokens). For each strategy (suffix MH, independent MH with 2 particles per proposal,
particle Gibbs with 4 particles), ``--chains`` independent chains run ``s`` steps for growing ``s``; the
table gives the TV distance between their final states and the exact posterior, the wall time of the run
(compilation excluded: every configuration runs once to compile, then is timed), and MH steps/s
(``chains x steps / time``). The noise floor of TV with ``C`` draws is shown too.

``model``: a 24-token lipogram hole on the default model with 64 chains/particles: ms per suffix MH step
(all chains), decode steps per MH step, and ms per SMC token step at the same batch, warm.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _tv(draws, probs) -> float:
    counts: dict = {}
    for d in draws:
        counts[d] = counts.get(d, 0) + 1
    m = len(draws)
    return 0.5 * sum(abs(counts.get(k, 0) / m - probs.get(k, 0.0)) for k in set(counts) | set(probs))


def toy(chains: int) -> None:
    from _inference_cases import bias_case, length_case

    for name, case in (("bias_case", bias_case), ("length_case", length_case)):
        toy_case(name, *case(), chains)


def toy_case(case_name, lm, prog, chains: int) -> None:
    import numpy as np

    from lmprog.inference import run
    from lmprog.inference.exact import enumerate_program
    from lmprog.inference import MCMC, ParticleGibbs

    probs = enumerate_program(lm, prog).probs()
    keys = list(probs)
    rng = np.random.default_rng(0)
    floor = np.mean([_tv([keys[i] for i in rng.choice(len(keys), chains, p=[probs[k] for k in keys])], probs)
                     for _ in range(5)])
    print(f"\n{case_name}: {len(probs)} sequences; TV of {chains} exact draws (noise floor): {floor:.3f}")
    print(f"{'strategy':<24}{'steps':>6}{'TV':>8}{'time (s)':>10}{'MH steps/s':>12}")

    def finals(res):
        kept = int(res.extra["kept"])
        if res.extra["chains"] == 1:  # particle Gibbs: one chain per group
            return [res.sequences(g)[-1] for g in range(res.groups)]
        return [res.sequences(0)[c * kept + kept - 1] for c in range(chains)]

    configs = [
        ("mcmc suffix", lambda s: (MCMC(steps=s, chains=chains, burn_in=s - 1), 1)),
        ("mcmc independent (k=2)", lambda s: (MCMC(steps=s, chains=chains, burn_in=s - 1, move="independent",
                                                   particles=2), 1)),
        ("particle_gibbs (N=4)", lambda s: (ParticleGibbs(iterations=s, particles=4), chains)),
    ]
    for name, make in configs:
        reached = None
        for s in (1, 2, 4, 8, 16, 32):
            st, groups = make(s)
            run(lm, prog, st, seed=1, groups=groups)  # compile
            t = time.perf_counter()
            res = run(lm, prog, st, seed=2, groups=groups)
            dt = time.perf_counter() - t
            d = _tv(finals(res), probs)
            print(f"{name:<24}{s:>6}{d:>8.3f}{dt:>10.2f}{chains * s / dt:>12.0f}")
            if reached is None and d < 0.05:
                reached = (s, dt)
        print(f"  -> TV < 0.05 after {reached[0]} steps, {reached[1]:.2f} s" if reached else "  -> TV < 0.05 not reached")


def model(name: str | None, particles: int) -> None:
    import lmprog
    from lmprog.inference import MCMC, SMC
    from lmprog.runner import get_model

    src = '''infer smc(particles=64)
"Write a sentence without the letter e: [text]" where text matches r"[^eE]*" and tokens(text) == 24
return text
'''
    prog = lmprog.compile(src, "bench_mcmc.lmp")
    lm = get_model(name or prog.default_model)
    rows = []
    for label, st in (("smc (ess 0.5)", SMC(particles=particles)),
                      ("mcmc suffix, 4 steps", MCMC(steps=4, chains=particles))):
        prog.run(lm=lm, strategy=st, seed=0)  # compile
        t = time.perf_counter()
        res = prog.run(lm=lm, strategy=st, seed=1)
        dt = time.perf_counter() - t
        rows.append((label, dt, res.stats["forward_passes"], getattr(st, "steps", None)))
    smc_ms = rows[0][1] / rows[0][2] * 1e3
    print(f"{'run':<24}{'wall (s)':>10}{'LM calls':>10}{'ms/call':>10}{'ms/MH step':>12}{'x SMC step':>12}")
    for label, dt, calls, steps in rows:
        per_step = dt / steps * 1e3 if steps else None
        print(f"{label:<24}{dt:>10.2f}{calls:>10}{dt / calls * 1e3:>10.1f}"
              + (f"{per_step:>12.0f}{per_step / smc_ms:>12.1f}" if per_step else f"{'':>12}{'':>12}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("toy", "model", "both"), default="both")
    ap.add_argument("--chains", type=int, default=2000)
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if args.part in ("toy", "both"):
        toy(args.chains)
    if args.part in ("model", "both"):
        model(args.model, args.particles)


if __name__ == "__main__":
    main()
