"""What recording the genealogy costs: the SMC token loop (``Kernels.hole_chunk``, 32 decode steps per call) with
the hole chunk recording ancestors, log-weights and lengths (``kernel.GENEALOGY``, the default) and without, in
one process, the two interleaved call by call.

    python benchmarks/bench_genealogy.py [--model tiny] [--particles 64 512] [--ess 1 0.5] [--calls 40]

``--model tiny`` (default) is ``lmprog.backends.tiny.tiny_model()``: a 2-layer random Llama whose forward pass
costs little, so the recording's share of a step is as large as it gets; any registry name (``smollm2-135m``)
works too. Each row sets ``smc(particles=P, ess=E)`` up on one fixed-length hole (``tokens(X) == 64``: every
particle runs the whole chunk) and times one device chunk from the same starting state (a copy per call, not
timed), plus, with recording, what the engine does with the chunk's buffers on the host
(``Run.note_genealogy``: the transfer and the rows kept). ``ess=1`` resamples at every step (every chunk's
buffers come back to the host), ``ess=0.5`` when the ESS falls below half. Reported: the fastest of ``--calls``
calls per variant (the machine is shared: the minimum is the figure least disturbed by other load), ms per
decode step, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--particles", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--ess", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()

    import jax
    from rich.console import Console
    from rich.table import Table

    from lmprog.compiler.automaton import stack_holes
    from lmprog.compiler.constraint_ir import Count
    from lmprog.compiler.constraints import compile_hole
    from lmprog.inference import SMC, Hole, SegmentProgram, Text, engine, kernel
    from lmprog.inference.kernel import Kernels

    if args.model == "tiny":
        from lmprog.backends.tiny import tiny_model

        lm = tiny_model()
    else:
        from lmprog.backends import load_model

        lm = load_model(args.model)
    tok = lm.tokenizer
    n = 64
    prompt = tok.encode("Write a short story about a robot who learns to paint.\n")
    table_, offs = stack_holes([compile_hole([Count("tokens", "==", n)], tok, name="story")])
    hole = Hole("story", start=offs[0], max_tokens=n)
    program = SegmentProgram([Text(tuple(prompt)), hole], table_)

    rows = []
    for p in args.particles:
        for ess in args.ess:
            strategy = SMC(particles=p, ess=ess, resample="systematic")
            cfg = strategy.kernel_config(groups=1, chunk=32)
            variants = {}
            for on in (False, True):
                kernel.GENEALOGY = on  # read when the kernel is traced: one Kernels object per setting
                kern = Kernels(lm, cfg)
                kernel._KERNELS[(id(lm), cfg)] = kern
                run, state, s = engine.setup(lm, program, strategy, cfg, 1, jax.random.key(1), None)
                state, hp = engine.hole_params(run, state, 0, hole, n, s.slack)
                state = kern.begin_hole(state, hp)
                variants[on] = (run, kern, state, hp)
            rows.append((p, ess, variants))
            kernel._KERNELS.pop((id(lm), cfg), None)
    kernel.GENEALOGY = True

    def call(run, kern, state, hp):
        st = kern.copy(state)
        jax.block_until_ready(st)
        t = time.perf_counter()
        st, ess_buf, res_buf, steps, _, gen = kern.hole_chunk(lm.params, run.consts, hp, st)
        steps = int(steps)
        run.note_genealogy(1, res_buf, steps, gen)
        jax.block_until_ready(st)
        wall = time.perf_counter() - t
        run.genealogy.clear()
        return wall, steps, int(np.asarray(res_buf)[:steps].sum())

    best: dict = {}
    info: dict = {}
    for p, ess, variants in rows:
        for on in (False, True):
            call(*variants[on])  # compile
    for _ in range(args.calls):
        for p, ess, variants in rows:
            for on in (False, True):
                wall, steps, resampled = call(*variants[on])
                best[(p, ess, on)] = min(best.get((p, ess, on), float("inf")), wall)
                info[(p, ess)] = (steps, resampled)

    out = Table(title=f"genealogy recording — {args.model}: one chunk of the token loop (fastest of {args.calls})")
    for col in ("particles", "ess", "steps resampled", "without ms/step", "with ms/step", "with / without"):
        out.add_column(col, justify="right")
    for p, ess, _ in rows:
        off, on = best[(p, ess, False)], best[(p, ess, True)]
        steps, resampled = info[(p, ess)]
        out.add_row(str(p), f"{ess:g}", f"{resampled}/{steps}", f"{1000 * off / steps:.3f}",
                    f"{1000 * on / steps:.3f}", f"{on / off:.3f}")
    console = Console()
    console.print(out)
    console.print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs; jax {jax.__version__} "
        f"on {jax.devices()[0].platform}; command: python benchmarks/bench_genealogy.py --model {args.model} "
        f"--particles {' '.join(map(str, args.particles))} --ess {' '.join(f'{e:g}' for e in args.ess)} "
        f"--calls {args.calls}")


if __name__ == "__main__":
    main()
