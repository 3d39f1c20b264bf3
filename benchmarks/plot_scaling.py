"""Plots of memory and throughput against the particle count and against the prompt length (issue 12).

    python benchmarks/plot_scaling.py [--particles 16 250 1000 2000 5000 10000] [--prompts 10 250 500 1000]
                                      [--prompt-particles 256] [--out docs/img]

Runs ``bench_memory.py --json`` (the four-way choice after a 13-token prompt, ``smc(ess=0.5)``, a fresh process
per particle count) and ``bench_prompt_memory.py --json --modes shared`` (``importance`` with
``--prompt-particles`` particles after prompts of about ``--prompts`` tokens), and draws from their rows:

* ``scaling_particles.png``: peak RSS (GiB) and throughput (particles per second of wall time, lowering and
  engine, model load excluded) against particles, log-log;
* ``scaling_prompt.png``: peak RSS and throughput (generated tokens per second of a second, compiled run)
  against the shared prompt's length.

``--only particles`` / ``--only prompt`` draws one of the two.

Figures are what this machine measured in this run; the script prints the rows it plotted. Needs matplotlib
(``pip install matplotlib``; not a dependency of lmprog).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _last_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    print(out.stdout)
    text = out.stdout.strip()
    start = text.rfind("\n{")  # bench_memory prints indented JSON after its table
    return json.loads(text[start + 1:] if start >= 0 else text[text.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, nargs="+", default=[16, 250, 1000, 2000, 5000, 10000])
    ap.add_argument("--prompts", type=int, nargs="+", default=[10, 250, 500, 1000])
    ap.add_argument("--prompt-particles", type=int, default=256)
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "img"))
    ap.add_argument("--only", choices=("particles", "prompt"), default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    if args.only != "prompt":
        _plot_particles(plt, args, out, machine)
    if args.only != "particles":
        _plot_prompt(plt, args, out, machine)


def _plot_particles(plt, args, out: Path, machine: str) -> None:
    mem = _last_json([sys.executable, str(HERE / "bench_memory.py"), "--json", "--particles",
                      *map(str, args.particles)])
    rows = [r for r in mem["rows"] if "peak_rss" in r]
    n = [r["particles"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(n, [r["peak_rss"] / 2**30 for r in rows], "o-")
    a.set_xlabel("particles")
    a.set_ylabel("peak RSS (GiB, model included)")
    a.set_title("memory: four-way choice, smc(ess=0.5)")
    b.loglog(n, [r["particles"] / r["wall_s"] for r in rows], "o-")
    b.set_xlabel("particles")
    b.set_ylabel("particles / s (wall, first run)")
    b.set_title("throughput")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"lmprog, SmolLM2-135M, {machine}")
    fig.tight_layout()
    fig.savefig(out / "scaling_particles.png", dpi=110)
    print(f"wrote {out / 'scaling_particles.png'}")


def _plot_prompt(plt, args, out: Path, machine: str) -> None:
    pro = _last_json([sys.executable, str(HERE / "bench_prompt_memory.py"), "--json", "--modes", "shared",
                      "--particles", str(args.prompt_particles), "--prompts", *map(str, args.prompts)])
    prow = [r for r in pro["rows"] if "error" not in r]
    x = [r["prefix_tokens"] for r in prow]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["peak_kib"] / 2**20 for r in prow], "o-")
    a.set_ylabel("peak RSS (GiB, model included)")
    a.set_title(f"memory: {pro['particles']} particles, importance, short hole")
    b.plot(x, [r["warm_tokens"] / r["warm_wall_s"] for r in prow], "o-")
    b.set_ylabel("generated tokens / s (second run, wall)")
    b.set_title("throughput")
    for ax in (a, b):
        ax.set_xlabel("shared prompt tokens")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"lmprog, SmolLM2-135M, {machine}")
    fig.tight_layout()
    fig.savefig(out / "scaling_prompt.png", dpi=110)
    print(f"wrote {out / 'scaling_prompt.png'}")


if __name__ == "__main__":
    main()
