"""Peak memory of many particles after a long prompt: the shared prefix stored once vs broadcast per particle.

    python benchmarks/bench_prompt_memory.py [--particles 256] [--prompts 10 1000] [--modes broadcast shared]
    python benchmarks/bench_prompt_memory.py --decode-step [--batches 16 64 256] [--prompts 10 1000]

Each configuration runs in a fresh subprocess (so peaks do not carry over): load the model, run
``importance(particles)`` on a program whose leading text is a prompt of about ``--prompts`` tokens followed by
a short hole (``tokens(x) <= 8``), and read the process's peak resident set (``VmHWM`` of
``/proc/self/status``) after the model is loaded and after the run. ``importance`` never resamples, so the
broadcast configuration's peak is its KV caches once (a resampling gather would double it). Modes:

* ``broadcast``: ``lmprog.inference.engine.SHARE_PREFIX = False``, the prompt's KV copied into every
  particle's cache (what the engine did before);
* ``shared``: the default, the prompt's KV stored once (``Consts.prefix``) and attended to by every particle.

Reported per configuration: the prompt's tokens, peak RSS after loading, peak RSS of the whole run, the run's
peak minus the loaded model's, wall seconds of the run (compilation included, persistent cache warm or not),
the particles' KV caches as allocated (own caches + prefix, from the engine's shapes), and the throughput of a
second, compiled run in the same process (generated tokens over its wall time; the peak is read before it).

``--decode-step`` times one jitted decode step of the model alone (``LanguageModel.apply`` with one token per
row, cache donated; best of 5 after a compiling call) for ``B`` rows after an ``S0``-token prompt with 48 own
slots: the prompt in every row's cache (broadcast) against ``prefix=Prefix(one row, S0)`` (shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field. "


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def child(args) -> None:
    import jax

    import lmprog
    from lmprog.inference import engine
    from lmprog.runner import get_model

    engine.SHARE_PREFIX = args.mode == "shared"
    lm = get_model(args.model)
    # A prompt of about `prompt` tokens: the sentence repeated, cut to length in tokens.
    words = []
    while len(lm.tokenizer.encode(" ".join(words))) < args.prompt:
        words += SENTENCE.split()
    ids = lm.tokenizer.encode(" ".join(words), add_bos=False)[: args.prompt - 1]
    prompt = lm.tokenizer.decode(ids).strip()
    source = (f'infer importance(particles={args.particles})\ninput prompt: str\n'
              '"{prompt}\\nAnswer: [x]\\n" where x matches r"[a-z]+( [a-z]+)*" and tokens(x) <= 8\n')
    program = lmprog.compile(source, "bench_prompt_memory.lmp")
    shapes = {}
    real_setup = engine.setup

    def spy(*a, **k):
        r, state, s = real_setup(*a, **k)
        size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
        shapes.update(prefix_tokens=len(s.prefix), own_bytes=size(state.cache),
                      prefix_bytes=size(r.consts.prefix) if r.consts.prefix is not None else 0)
        return r, state, s

    engine.setup = spy
    loaded = vm_hwm_kib()
    t0 = time.perf_counter()
    result = program.run({"prompt": prompt}, lm=lm, seed=0)
    wall = time.perf_counter() - t0
    peak = vm_hwm_kib()
    t0 = time.perf_counter()
    warm = program.run({"prompt": prompt}, lm=lm, seed=1)  # compiled: the run's own speed
    warm_wall = time.perf_counter() - t0
    print(json.dumps(dict(mode=args.mode, prompt=args.prompt, particles=args.particles, loaded_kib=loaded,
                          peak_kib=peak, wall_s=wall, warm_wall_s=warm_wall, warm_tokens=int(warm.stats["tokens"]),
                          values=sorted({str(s.values) for s in result.samples})[:3], **shapes)))


def decode_step_ms(lm, batch: int, s0: int, shared: bool, own_len: int = 48, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    from lmprog.backends.base import Prefix

    fn = jax.jit(lambda p, c, t, pos, pre: lm.apply(p, c, t, pos, prefix=pre), donate_argnums=(1,))
    if shared:
        cache, prefix = lm.init_cache(batch, own_len), Prefix(lm.init_cache(1, -(-s0 // 16) * 16), jnp.int32(s0))
    else:
        cache, prefix = lm.init_cache(batch, -(-(s0 + own_len) // 16) * 16), None
    tok, pos = jnp.zeros((batch, 1), jnp.int32), jnp.full((batch,), s0 + 8, jnp.int32)
    logits, cache = fn(lm.params, cache, tok, pos, prefix)
    logits.block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        logits, cache = fn(lm.params, cache, tok, pos, prefix)
        logits.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def decode_steps(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmprog.runner import get_model

    lm = get_model(args.model)
    table = Table(title=f"one decode step of {lm.name} (ms): prompt broadcast vs stored once")
    for col in ("rows", "prompt tokens", "broadcast ms", "shared ms", "broadcast / shared"):
        table.add_column(col, justify="right")
    for b in args.batches:
        for n in args.prompts:
            old, new = decode_step_ms(lm, b, n, False), decode_step_ms(lm, b, n, True)
            table.add_row(str(b), str(n), f"{old:.1f}", f"{new:.1f}", f"{old / new:.2f}")
    console = Console(width=150)
    console.print(table)
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--modes", nargs="+", default=["broadcast", "shared"], choices=["broadcast", "shared"])
    parser.add_argument("--decode-step", action="store_true", help="time one decode step instead (model alone)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="rows for --decode-step")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too (last line)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="shared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.decode_step:
        return decode_steps(args)

    from rich.console import Console
    from rich.table import Table

    rows = []
    for mode in args.modes:
        for n in args.prompts:
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--particles", str(args.particles),
                   "--prompt", str(n), "--mode", mode]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                rows.append(dict(mode=mode, prompt=n, error=f"exit {out.returncode}"))
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    gib = lambda kib: f"{kib / 2**20:.2f}"  # noqa: E731
    table = Table(title=f"peak RSS, {args.particles} particles, {args.model}: prompt stored once vs broadcast")
    for col in ("mode", "shared prefix tokens", "peak RSS loaded GiB", "peak RSS run GiB", "run - loaded GiB",
                "KV allocated MiB (own + prefix)", "wall s", "warm tokens/s"):
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["mode"], str(r["prompt"]), "-", r["error"], "-", "-", "-", "-")
            continue
        kv = (r["own_bytes"] + r["prefix_bytes"]) / 2**20
        table.add_row(r["mode"], str(r["prefix_tokens"]), gib(r["loaded_kib"]), gib(r["peak_kib"]),
                      gib(r["peak_kib"] - r["loaded_kib"]), f"{kv:.0f}", f"{r['wall_s']:.1f}",
                      f"{r['warm_tokens'] / r['warm_wall_s']:.0f}")
    console = Console(width=150)
    console.print(table)
    for mode in args.modes:
        peaks = {r["prompt"]: r["peak_kib"] for r in rows if r["mode"] == mode and "error" not in r}
        if len(peaks) >= 2:
            lo, hi = min(peaks), max(peaks)
            console.print(f"{mode}: peak at {hi} tokens / peak at {lo} tokens = {peaks[hi] / peaks[lo]:.2f}x")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {__import__('jax').__version__}")
    if args.json:
        print(json.dumps({"particles": args.particles, "rows": rows}))


if __name__ == "__main__":
    main()
