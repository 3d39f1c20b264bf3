"""End-to-end throughput: the lipogram example (exactly 32 tokens, no letter 'e', exact SMC, ESS 0.5).

    python benchmarks/bench_e2e.py [--particles 16 64 256] [--program examples/lipogram.lmp] [--cold-cache]
                                   [--ess 0.5 1]

For each particle count the program runs twice in one process: the first run includes compiling the
kernels (from the persistent compilation cache when it is warm), the second is steady state. Reported:
steady-state particle-tokens/s (particles x generated tokens / (wall - compile)), total particle-tokens/s
(wall including compile, first run), and the compile seconds of both runs. The peer figure from the issue
(LLaMPPL 0.2.3, HF backend, PyTorch CPU, same task and weights, 2-core machine) is ~15.6 particle-tokens/s
at 16 particles.

``--cold-cache`` sets ``LMPROG_CACHE_DIR`` to a fresh, empty temporary folder (JAX's persistent compilation
cache and the constraint cache), so the first run of each particle count compiles everything from scratch;
without it the user's cache is used (warm once the same shapes have been compiled before).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", default=str(Path(__file__).resolve().parents[1] / "examples" / "lipogram.lmp"))
    parser.add_argument("--particles", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ess", type=float, nargs="+", default=None,
                        help="run smc(particles=N, ess=E) for each E instead of the program's own strategy")
    parser.add_argument("--cold-cache", action="store_true", help="a fresh, empty LMPROG_CACHE_DIR (cold compile)")
    args = parser.parse_args()
    if args.cold_cache:  # before lmprog turns the persistent compilation cache on (at model load)
        import tempfile

        os.environ["LMPROG_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmprog_cold_cache_")

    from rich.console import Console
    from rich.table import Table

    import lmprog
    from lmprog.runner import get_model

    program = lmprog.load(args.program)
    t0 = time.perf_counter()
    lm = get_model(program.model or program.default_model)
    load_s = time.perf_counter() - t0

    cache = "fresh (cold) cache" if args.cold_cache else "default cache"
    table = Table(title=f"end to end — {Path(args.program).name} on {lm.name}, {cache}")
    for col in ("particles", "ess", "steady particle-tok/s", "total particle-tok/s (1st run)", "wall s (2nd)",
                "compile s (1st / 2nd)", "constraints s (1st)", "log Z", "final ESS"):
        table.add_column(col, justify="right")
    from lmprog.inference import SMC

    for n in args.particles:
        for ess in args.ess or [None]:
            how = {} if ess is None else {"strategy": SMC(particles=n, ess=ess)}
            first = program.run(particles=n, seed=args.seed, lm=lm, **how)
            second = program.run(particles=n, seed=args.seed + 1, lm=lm, **how)
            generated = n * 32
            steady = generated / max(second.stats["wall_s"] - second.stats["compile_s"], 1e-9)
            total = generated / first.stats["wall_s"]
            table.add_row(
                str(n), "program" if ess is None else f"{ess:g}", f"{steady:.1f}", f"{total:.1f}",
                f"{second.stats['wall_s']:.1f}", f"{first.stats['compile_s']:.1f} / {second.stats['compile_s']:.1f}",
                f"{first.stats['constraint_compile_s']:.2f}",
                f"{second.log_evidence:.2f}", f"{second.ess[-1]:.1f}" if second.ess else "-",
            )  # fmt: skip
    console = Console(width=160)  # the whole table, also when the output is a file
    console.print(table)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; model load {load_s:.1f} s; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
