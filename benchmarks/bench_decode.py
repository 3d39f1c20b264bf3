"""Decode throughput of the default model: tokens/s of batched sampling at several batch sizes.

    python benchmarks/bench_decode.py [--batches 1 16 64 256] [--tokens 64] [--model smollm2-135m]

Each measurement prefills a short prompt once, broadcasts it to the batch and samples ``--tokens``
tokens per row in one jitted ``lax.scan`` (LM forward + softmax + sampling per token, all on the device).
Reported: steady-state tokens/s (best of ``--repeats`` runs after a warm-up that compiles), the time per
decode step, and the compile time of the first run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from lmprog.backends import load_model
    from lmprog.backends.generate import _sample_loop, prefill

    t0 = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - t0
    prompt = lm.tokenizer.encode("Write a short story about a robot who learns to paint.\n")
    max_len = len(prompt) + args.tokens

    table = Table(title=f"decode throughput — {args.model}, {args.tokens} tokens/row, cache {max_len} slots")
    for col in ("batch", "tokens/s", "ms/step", "compile+first run s"):
        table.add_column(col, justify="right")

    for batch in args.batches:

        def run(seed):
            first, cache = prefill(lm, prompt, max_len, batch)
            toks, _ = _sample_loop(lm, lm.params, cache, first, len(prompt), jax.random.key(seed), batch, args.tokens, 1.0)
            return toks.block_until_ready()

        t = time.perf_counter()
        run(0)
        first_s = time.perf_counter() - t
        best = min(_timed(run, seed) for seed in range(1, args.repeats + 1))
        table.add_row(str(batch), f"{batch * args.tokens / best:.1f}", f"{1000 * best / args.tokens:.1f}", f"{first_s:.1f}")

    console = Console()
    console.print(table)
    console.print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; model load {load_s:.1f} s"
    )


def _timed(fn, seed) -> float:
    t = time.perf_counter()
    fn(seed)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
