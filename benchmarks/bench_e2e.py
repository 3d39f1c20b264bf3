"""End-to-end throughput: the lipogram example (exactly 32 tokens, no letter 'e', exact SMC, ESS 0.5).

    python benchmarks/bench_e2e.py [--particles 16 64 256] [--program examples/lipogram.lmp]

For each particle count the program runs twice in one process: the first run includes compiling the
kernels (from the persistent compilation cache when it is warm), the second is steady state. Reported:
steady-state particle-tokens/s (particles x generated tokens / (wall - compile)), total particle-tokens/s
(wall including compile, first run), and the compile seconds of both runs. The peer figure from the issue
(LLaMPPL 0.2.3, HF backend, PyTorch CPU, same task and weights, 2-core machine) is ~15.6 particle-tokens/s
at 16 particles.
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
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    import lmprog
    from lmprog.runner import get_model

    program = lmprog.load(args.program)
    t0 = time.perf_counter()
    lm = get_model(program.model or program.default_model)
    load_s = time.perf_counter() - t0

    table = Table(title=f"end to end — {Path(args.program).name} on {lm.name}")
    for col in ("particles", "steady particle-tok/s", "total particle-tok/s (1st run)", "wall s (2nd)",
                "compile s (1st / 2nd)", "log Z", "final ESS"):
        table.add_column(col, justify="right")
    for n in args.particles:
        first = program.run(particles=n, seed=args.seed, lm=lm)
        second = program.run(particles=n, seed=args.seed + 1, lm=lm)
        generated = n * 32
        steady = generated / max(second.stats["wall_s"] - second.stats["compile_s"], 1e-9)
        total = generated / first.stats["wall_s"]
        table.add_row(
            str(n), f"{steady:.1f}", f"{total:.1f}", f"{second.stats['wall_s']:.1f}",
            f"{first.stats['compile_s']:.1f} / {second.stats['compile_s']:.1f}",
            f"{second.log_evidence:.2f}", f"{second.ess[-1]:.1f}" if second.ess else "-",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; model load {load_s:.1f} s"
    )


if __name__ == "__main__":
    main()
