"""SMC step overhead over raw batched decoding (same model, batch, cache length and number of tokens).

    python benchmarks/bench_smc.py [--model smollm2-135m] [--particles 64] [--tokens 32] [--repeats 2]

Rows (each: one prompt prefill shared by the batch, then ``--tokens`` decode steps for every row):

* ``raw decode``: the baseline — forward + log-softmax + sampling (inverse CDF, one uniform per row) per
  token in one jitted ``lax.while_loop`` with the cache donated: no constraint, no weights, no resampling.
* ``generate._sample_loop``: the backends' plain sampler (``lax.scan``, Gumbel-max ``categorical``), for
  reference.
* ``smc ...``: ``lmprog.inference.run`` with a fixed-length hole of ``--tokens`` tokens (so every particle
  takes exactly that many steps): the masked proposal, allowed-mass weights, ESS, automaton/counter update,
  resampling under ``lax.cond`` and the token buffers, looping on the device in chunks of 32 steps.
  ``free``: any text (``tokens(X) == N``); ``regex``: ``X matches r"[a-z ,.]+"`` as well;
  ``ess=1``: resample (and reorder the KV cache) at every step.

Reported: best wall time over ``--repeats`` warm runs, ms per decode step, and the overhead of each row
relative to ``raw decode``. Rows are timed round-robin (best of ``--repeats``) so that load from other
processes spreads over all of them. The SMC rows include everything ``run`` does (prefill, host syncs per chunk,
assembling the result), so the overhead is an upper bound on the step's own.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=["raw-decode", "raw-sample", "free", "regex", "free-ess1"])
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from lmprog.backends import load_model
    from lmprog.backends.generate import _sample_loop, prefill
    from lmprog.compiler.automaton import stack_holes
    from lmprog.compiler.constraint_ir import Count, Regex
    from lmprog.compiler.constraints import compile_hole
    from lmprog.inference import SMC, Hole, SegmentProgram, Text, run
    from lmprog.inference.kernel import sample_masked

    lm = load_model(args.model)
    tok = lm.tokenizer
    prompt = tok.encode("Write a short story about a robot who learns to paint.\n")
    p, n = args.particles, args.tokens

    holes = {
        "free": compile_hole([Count("tokens", "==", n)], tok, name="story"),
        "regex": compile_hole([Regex("[a-z ,.]+"), Count("tokens", "==", n)], tok, name="story"),
    }
    programs = {}
    for name, h in holes.items():
        table, offs = stack_holes([h])
        programs[name] = SegmentProgram([Text(tuple(prompt)), Hole("story", start=offs[0], max_tokens=n)], table)

    max_len = -(-(len(prompt) + n + 2) // 16) * 16  # what run() allocates for these programs (engine.cache_len)
    rows: dict[str, tuple] = {}  # name -> (callable, note)

    def smc_row(name: str, prog_name: str, ess: float):
        strategy = SMC(particles=p, ess=ess, resample="systematic")
        info = {}

        def go(seed=1):
            r = run(lm, programs[prog_name], strategy, seed=seed)
            assert r.ess.shape[0] == n, (r.ess.shape, n)
            info["note"] = f"{int(r.resampled.sum())}/{n} steps resampled"
            info.setdefault("tokens", np.asarray(r.tokens[0, :, :n]))
            return r

        rows[name] = (go, info)

    if "free" in args.rows:
        smc_row("smc free (ess=0.5)", "free", 0.5)
    if "regex" in args.rows:
        smc_row("smc regex (ess=0.5)", "regex", 0.5)
    if "free-ess1" in args.rows:
        smc_row("smc free (ess=1: resample every step)", "free", 1.0)

    @jax.jit
    def decode_loop(params, cache, first_tok, key):
        """Raw decoding: forward, softmax, inverse-CDF sampling (one uniform per row), in a while_loop."""

        def body(c):
            i, tok, cache, key, out = c
            key, sub = jax.random.split(key)
            logits, cache = lm.apply(params, cache, tok[:, None], len(prompt) - 1 + i + jnp.zeros((p,), jnp.int32))
            logp = jax.nn.log_softmax(logits[:, 0, : len(tok_table)], axis=-1)
            nxt, _ = sample_masked(sub, logp)
            return i + 1, nxt, cache, key, out.at[:, i].set(nxt)

        init = (jnp.int32(0), first_tok, cache, key, jnp.zeros((p, n), jnp.int32))
        return jax.lax.while_loop(lambda c: c[0] < n, body, init)[4]

    tok_table = tok.token_bytes

    def raw_decode(seed=1):
        _, cache = prefill(lm, prompt[:-1], max_len, p)
        first = jnp.full((p,), prompt[-1], jnp.int32)
        return decode_loop(lm.params, cache, first, jax.random.key(seed)).block_until_ready()

    if "raw-decode" in args.rows:
        rows["raw decode (forward + sample)"] = (raw_decode, {"note": "baseline"})

    if "raw-sample" in args.rows:

        def raw_sample(seed=1):
            first, cache = prefill(lm, prompt, max_len, p)
            toks, _ = _sample_loop(lm, lm.params, cache, first, len(prompt), jax.random.key(seed), p, n, 1.0)
            return toks.block_until_ready()

        rows["generate._sample_loop"] = (raw_sample, {"note": "gumbel-max categorical per step"})

    # Warm-up (compile) each row once, then time the rows round-robin so that load from other processes
    # spreads over all of them; keep each row's best.
    compile_s, best = {}, {}
    for name, (fn, _) in rows.items():
        t = time.perf_counter()
        fn(0)
        compile_s[name] = time.perf_counter() - t
    for _ in range(args.repeats):
        for name, (fn, _) in rows.items():
            t = time.perf_counter()
            fn(1)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    results = {name: (best[name], compile_s[name] - best[name], rows[name][1].get("note", "")) for name in rows}

    base = results.get("raw decode (forward + sample)", (None,))[0]
    table = Table(title=f"SMC vs raw decoding — {args.model}, {p} particles, {n} tokens, cache {max_len} slots")
    for col in ("row", "wall s", "ms/step", "overhead vs raw decode", "compile s", "note"):
        table.add_column(col, justify="right" if col not in ("row", "note") else "left")
    for name, (wall, comp, note) in results.items():
        over = f"{100 * (wall / base - 1):+.1f} %" if base else "-"
        table.add_row(name, f"{wall:.2f}", f"{1000 * wall / n:.1f}", over, f"{comp:.1f}", note)
    console = Console()
    console.print(table)
    console.print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; command: python benchmarks/bench_smc.py "
        f"--model {args.model} --particles {p} --tokens {n} --repeats {args.repeats}"
    )


if __name__ == "__main__":
    main()
