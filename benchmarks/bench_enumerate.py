"""Exact enumeration of finite holes vs token-by-token sampling (issue 16, items 1 and 4).

    python benchmarks/bench_enumerate.py [--model smollm2-135m] [--particles 4 16 64] [--seeds 3] [--prune 0 1e-4]

Programs: ``examples/sentiment.lmp`` (a three-way choice after "Answer:", then "\\n"), a four-way choice as
the whole reply of a chat turn (ended by the end of the turn), and bench_memory.py's four-way choice ending at
EOS (its exact posterior, by ``exact.enumerate_program`` in float64, is in docs/performance.md: Red 0.0163,
Blue 0.0008, Yellow 0.0010, Red. 0.9819, log Z -6.6581). For each particle count and seed, the program
runs under ``importance`` with enumeration on (``enumerate_holes=True``) at every ``--prune`` threshold
(``enumeration.PRUNE``: 0 expands the whole trie) and off. The reference is the
exact posterior of the hole and its exact ``log Z``: a program whose only random choice is an enumerated hole
gets them from one enumeration (checked against exact enumeration on toy LMs in ``tests/test_enumerate.py``).

Reported per row: TV of the posterior to the exact one, ``|log Z_hat - log Z|``, ESS (mean over seeds), LM calls
(``forward_passes``, prefill included) and LM rows of the holes (``decode_rows``: the token loop's
rows and the enumeration's trie rows), the particles a pruned enumeration handed to the token loop (its
frontier draws), and the warm wall time (the first, compiling run of each row is not timed).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

BANANAS = '''infer importance(particles=16)
"Q: What is the colour of ripe bananas?\\nA: [answer]" where answer in ["Red", "Blue", "Yellow", "Red."]
return answer
'''
FOUR_WAY = '''model "smollm2-135m"
infer importance(particles=16)
system "Classify the review as positive, negative, neutral or mixed. Answer with one word."
user "Review: The food was great but the waiter was rude."
assistant "[label]" where label in ["positive", "negative", "neutral", "mixed"]
return label
'''


def tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--particles", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prune", type=float, nargs="+", default=None, help="enumeration.PRUNE values (default: 0 and the default)")
    args = ap.parse_args()

    import lmprog
    from lmprog.inference import enumeration
    from lmprog.runner import get_model, run_program

    lm = get_model(args.model)
    programs = {"sentiment": lmprog.load(os.path.join(os.path.dirname(__file__), "..", "examples", "sentiment.lmp")),
                "four-way chat": lmprog.compile(FOUR_WAY), "bananas (four-way)": lmprog.compile(BANANAS)}
    print(f"# {platform.machine()} {os.cpu_count()} CPU(s), model {args.model}")
    default = enumeration.PRUNE
    prunes = args.prune if args.prune is not None else [0.0, default]
    print("| program | enumerate | particles | TV | abs(log Z err) | ESS | LM calls | LM rows | to token loop | warm wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, prog in programs.items():
        enumeration.PRUNE = 0.0  # the whole trie: the exact table and log Z
        ref = run_program(prog, {}, lm=lm, particles=1, seed=0, enumerate_holes=True)
        exact = {_value(v): p for v, p in ref.posterior}
        print(f"# {name}: exact posterior {exact}, log Z {ref.log_evidence:.4f}, {ref.stats['enumerated']}")
        log_z = ref.log_evidence
        for n in args.particles:
            for mode in [*prunes, None]:
                on = mode is not None
                enumeration.PRUNE = mode if on else default
                rows = []
                for seed in range(args.seeds + 1):
                    t = time.perf_counter()
                    r = run_program(prog, {}, lm=lm, particles=n, seed=seed, enumerate_holes=True) if on else _off(prog, lm, n, seed)
                    wall = time.perf_counter() - t
                    if seed == 0:
                        continue  # compiles
                    w = np.asarray(r.raw.weights[0], np.float64)
                    ess = float(w.sum() ** 2 / np.sum(w ** 2)) if w.sum() > 0 else 0.0
                    post = {_value(v): p for v, p in r.posterior}
                    left = sum(v.get("token_loop", 0) for v in r.stats.get("enumerated", {}).values())
                    rows.append((tv(post, exact), abs(r.log_evidence - log_z), ess, r.stats["forward_passes"],
                                 r.stats.get("decode_rows", 0), left, wall))
                a = np.mean(np.array(rows), axis=0)
                label = "off" if not on else ("whole trie" if mode == 0 else f"pruned {mode:g}")
                print(f"| {name} | {label} | {n} | {a[0]:.4f} | {a[1]:.4f} | {a[2]:.1f} | "
                      f"{a[3]:.0f} | {a[4]:.0f} | {a[5]:.1f} | {a[6]:.2f} |", flush=True)


def _value(v: dict):
    (x,) = v.values()
    return x


def _off(prog, lm, n, seed):
    """The run with enumeration off (the program's strategy with ``enumerate=false``)."""
    from lmprog.runner import run_program

    return run_program(prog, {}, lm=lm, particles=n, seed=seed, enumerate_holes=False)


if __name__ == "__main__":
    main()
