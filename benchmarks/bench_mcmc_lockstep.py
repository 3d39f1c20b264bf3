"""MCMC suffix moves, lock step against rolling (issue 12 item 6): LM calls and time per MH step.

    python benchmarks/bench_mcmc_lockstep.py [--part toy|model|multi|all] [--chains 64] [--steps 4] [--model NAME]

Lock step (``moves.ROLLING = False``): every chain makes one move per walk and the batch steps until the
chain cut earliest has regenerated its suffix. Rolling (the default): every chain makes its ``steps`` moves
one after another; a chain whose proposal is done is accepted or rejected between two decode steps and
starts its next move while the others go on, wherever in the program its next cut is
(``lmprog/inference/rolling.py``).

Per scheme, after a warm-up run (compilation): the moves' LM calls (batched decode calls, the first
execution excluded: ``extra["move_lm_calls"]``), LM calls per MH step (one MH step = one move of every
chain), tokens regenerated per move and chain (``move_tokens / (chains x steps)``: what a move needs at
least, in LM calls, if no chain ever idled), the moves' wall time per MH step (``move_s / steps``) and the
whole run's wall time.

``toy``: ``long_case`` of ``tests/test_mcmc_rolling.py`` (a hole of 1 to 8 letters then EOS), quick.
``model``: a 24-token lipogram hole (``matches [^eE]*``, ``tokens == 24``) on the default model (SmolLM2-135M),
as in ``benchmarks/bench_mcmc.py``; about 0.3 s per batched LM call at 64 rows on a 2-core CPU.
``multi``: two lipogram holes of up to 12 tokens each, ended by a newline, with prompt text between them, on
the default model: moves cut in the first hole regenerate both holes (the text between them is the first
hole's terminator, generated in its token loop).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

LIPOGRAM = '''infer mcmc(steps=4, chains=64)
"Write a sentence without the letter e: [text]" where text matches r"[^eE]*" and tokens(text) == 24
return text
'''

TWO_HOLES = '''infer mcmc(steps=4, chains=64)
"Two short sentences without the letter e.\\n1. [a]\\n2. [b]\\n"
    where a matches r"[^eE\\n]*" and tokens(a) <= 12 and b matches r"[^eE\\n]*" and tokens(b) <= 12
return a, b
'''


def _table(rows) -> None:
    print(f"{'scheme':<10}{'walks':>7}{'move LM calls':>15}{'calls/MH step':>15}{'tok/move/chain':>16}"
          f"{'ms/MH step':>12}{'run wall s':>12}{'accept':>8}")
    for name, r in rows:
        print(f"{name:<10}{r['walks']:>7}{r['calls']:>15}{r['per_step']:>15.1f}{r['tok_per_move']:>16.2f}"
              f"{r['ms_per_step']:>12.1f}{r['wall']:>12.2f}{r['accept']:>8.2f}")
    (_, lock), (_, roll) = rows
    print(f"rolling / lock step: LM calls x{roll['calls'] / lock['calls']:.2f}, "
          f"move time x{roll['ms_per_step'] / lock['ms_per_step']:.2f}")


def _measure(run_once, chains: int, steps: int) -> list:
    from lmprog.inference import moves

    rows = []
    for name, rolling in (("lock step", False), ("rolling", True)):
        moves.ROLLING = rolling
        try:
            run_once(1, 0)  # warm-up: compile this scheme's kernels
            t = time.perf_counter()
            res = run_once(steps, 1)
            wall = time.perf_counter() - t
        finally:
            moves.ROLLING = True
        x = res.extra
        rows.append((name, {
            "walks": x["walks"], "calls": x["move_lm_calls"], "per_step": x["move_lm_calls"] / steps,
            "tok_per_move": x["move_tokens"] / (chains * steps), "ms_per_step": x["move_s"] / steps * 1e3,
            "wall": wall, "accept": float(x["acceptance"].mean()),
        }))
    return rows


def toy(chains: int, steps: int) -> None:
    from test_mcmc_rolling import long_case

    from lmprog.inference import MCMC, run

    lm, prog = long_case()
    print(f"\ntoy long_case (1-8 letters then EOS), {chains} chains, {steps} moves each")
    _table(_measure(lambda k, seed: run(lm, prog, MCMC(steps=k, chains=chains, burn_in=k - 1), seed=seed),
                    chains, steps))


def program_part(src: str, filename: str, what: str, name: str | None, chains: int, steps: int) -> None:
    """Lock step against rolling on the ``.lmp`` program ``src``, run with ``MCMC(steps, chains)`` whatever its ``infer``
    line says."""
    import lmprog
    from lmprog.inference import MCMC
    from lmprog.runner import get_model

    prog = lmprog.compile(src, filename)
    lm = get_model(name or prog.default_model)
    print(f"\n{lm.name}: {what}, {chains} chains, {steps} moves each")
    _table(_measure(lambda k, seed: prog.run(lm=lm, strategy=MCMC(steps=k, chains=chains, burn_in=k - 1),
                                             seed=seed).raw, chains, steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("toy", "model", "multi", "all"), default="all")
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--toy-steps", type=int, default=20)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if args.part in ("toy", "all"):
        toy(args.chains, args.toy_steps)
    if args.part in ("model", "all"):
        program_part(LIPOGRAM, "bench_mcmc_lockstep.lmp", "24-token lipogram hole", args.model, args.chains,
                     args.steps)
    if args.part in ("multi", "all"):
        program_part(TWO_HOLES, "bench_mcmc_lockstep_multi.lmp", "two lipogram holes (<= 12 tokens each) around "
                     "prompt text", args.model, args.chains, args.steps)


if __name__ == "__main__":
    main()
