"""Constraint compile cost on the default model's vocabulary (SmolLM2, 49152 tokens).

    python benchmarks/bench_constraints.py [--repeat 3] [--tokenizer smollm2-135m]

For each constraint of LANGUAGE.md (and a few heavier regexes) prints: the cold compile time (no cache:
regex -> byte DFA with outlines-core, terminator product, token walk, counters; best of ``--repeat``), the
time to load the compiled automaton from the disk cache, the automaton's states and token classes, and the
device memory it adds to a TokenTable. Then the time of one jitted ``TokenTable.mask`` (and mask + ``step``) for a batch
of 32 particles spread over every hole (CPU here). Prints a plain table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

CASES = [
    # (label, constraints, following text)
    ("matches [A-Z][a-z]+( [A-Z][a-z]+)* and tokens<=8", "capital", "\n"),
    ('in ["Paris", "Rome"]', "choices", "\n"),
    ('stop_at(X, ".")', "stop_at", None),
    ('stop_before(X, "\\n\\n")', "stop_before", None),
    ("tokens(X) == 50", "fixed", None),
    ("len(X) <= 200", "len", "\n"),
    ("words(X) == 5", "words", "\n"),
    ("is_int(X)", "is_int", "\n"),
    ("is_float(X)", "is_float", "\n"),
    ('not contains(X, "e")', "not_contains", "\n"),
    ('startswith(X, "The")', "startswith", "\n"),
    ('endswith(X, "!")', "endswith", "\n"),
    ("free text, ends at EOS", "free", None),
    ('[a-z ]+ and not contains "e" and 5<=len<=40', "conjunction", " is "),
    (r"matches \d{4}-\d{2}-\d{2}", "date", "\n"),
    (r"matches \w+", "word", "\n"),
]


def constraints_for(key):
    from lmprog.compiler.constraint_ir import (
        Choices,
        Contains,
        Count,
        EndsWith,
        IsFloat,
        IsInt,
        Not,
        Regex,
        StartsWith,
        StopAt,
    )

    return {
        "capital": [Regex(r"[A-Z][a-z]+( [A-Z][a-z]+)*"), Count("tokens", "<=", 8)],
        "choices": [Choices(["Paris", "Rome"])],
        "stop_at": [StopAt(".")],
        "stop_before": [StopAt("\n\n", keep=False)],
        "fixed": [Count("tokens", "==", 50)],
        "len": [Count("len", "<=", 200)],
        "words": [Count("words", "==", 5)],
        "is_int": [IsInt()],
        "is_float": [IsFloat()],
        "not_contains": [Not(Contains("e"))],
        "startswith": [StartsWith("The")],
        "endswith": [EndsWith("!")],
        "free": [],
        "conjunction": [Regex(r"[a-z ]+"), Not(Contains("e")), Count("len", ">=", 5), Count("len", "<=", 40)],
        "date": [Regex(r"\d{4}-\d{2}-\d{2}")],
        "word": [Regex(r"\w+")],
    }[key]


def cold(fn):
    """Run ``fn`` with every in-process cache of the compiler cleared (the tokenizer tables excepted)."""
    from lmprog.compiler import bytedfa, constraints

    constraints._LANGUAGE_CACHE.clear()
    constraints._MEMORY.clear()
    bytedfa._regex_dfa.cache_clear()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokenizer", default="smollm2-135m")
    args = parser.parse_args()
    os.environ["LMPROG_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmprog-bench-")

    import jax
    import jax.numpy as jnp

    from lmprog.backends import load_tokenizer
    from lmprog.compiler import constraints as K
    from lmprog.compiler.automaton import stack_holes
    from lmprog.compiler.vocab_index import vocab_info

    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer)
    t_tok = time.perf_counter() - t0
    _, t_info = cold(lambda: vocab_info(tok))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"jax {jax.__version__} ({jax.default_backend()})")
    print(f"# tokenizer {args.tokenizer}: {tok.vocab_size} tokens, loaded in {t_tok:.2f} s; "
          f"per-tokenizer tables (trie, counter increments, once per process) {t_info * 1000:.0f} ms")
    print()
    header = f"{'constraint':52s} {'term':>7s} {'cold ms':>8s} {'cache ms':>9s} {'states':>6s} {'classes':>7s} {'device KiB':>10s}"
    print(header)
    print("-" * len(header))
    holes = []
    for label, key, follow in CASES:
        cs = constraints_for(key)
        times = []
        for _ in range(args.repeat):
            hole, dt = cold(lambda: K.compile_hole(cs, tok, following_text=follow, cache=False))
            times.append(dt)
        K._MEMORY.clear()
        K.compile_hole(cs, tok, following_text=follow)  # writes the disk cache
        loads = []
        for _ in range(args.repeat):
            K._MEMORY.clear()
            t0 = time.perf_counter()
            cached = K.compile_hole(cs, tok, following_text=follow)
            loads.append(time.perf_counter() - t0)
            assert cached.from_cache
        holes.append(hole)
        term = {"text": repr(hole.terminator.text)[1:-1], "eos": "EOS", "fixed": "fixed"}[hole.terminator.kind]
        print(f"{label:52s} {term:>7s} {min(times) * 1000:8.1f} {min(loads) * 1000:9.2f} {hole.num_states:6d} "
              f"{hole.automaton.num_classes:7d} {hole.nbytes / 1024:10.1f}")

    table, offsets = stack_holes(holes)
    batch = 32
    rng = np.random.default_rng(0)
    owners = rng.integers(0, len(holes), size=batch)
    states = jnp.array([offsets[i] + holes[i].automaton.start for i in owners], jnp.int32)
    counts = table.init_counts(batch)

    @jax.jit
    def step(table, states, counts, logits):
        mask = table.mask(states, counts, 256)
        tok_ = jnp.argmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
        return table.step(states, counts, tok_)

    @jax.jit
    def mask_only(table, states, counts):
        return table.mask(states, counts, 256)

    logits = jax.random.normal(jax.random.PRNGKey(0), (batch, tok.vocab_size))

    def timed(fn, *a, n=20):
        jax.block_until_ready(fn(*a))
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*a)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n

    dt_mask = timed(mask_only, table, states, counts)
    dt_step = timed(step, table, states, counts, logits)
    print()
    print(f"# shared TokenTable of all {len(holes)} holes: {table.num_states} states, {table.nbytes / 2**20:.2f} MiB on "
          f"device")
    print(f"# jitted TokenTable.mask for {batch} particles spread over the holes: {dt_mask * 1000:.2f} ms; "
          f"mask + argmax + step: {dt_step * 1000:.2f} ms")


if __name__ == "__main__":
    main()
