"""``smc(particles, ess, resample, rejuvenate)``: sequential Monte Carlo over token states.

Importance sampling with the locally-constrained proposal, plus resampling: after every decode step, a group
whose effective sample size falls below ``ess x particles`` (``ess=1``: every step, ``ess=0``: never) is
resampled with the chosen scheme, and ``log Z`` accumulates ``logsumexp(w) - log N`` of the resampled weights,
so ``log Z_hat = log_z + logsumexp(w) - log N`` is unbiased (for ``Z``) whether or not a step resampled.

``rejuvenate=K`` (resample-move): after every resampling, ``K`` suffix MH moves per particle
(:func:`lmprog.inference.moves.suffix_moves`) targeting the intermediate distribution the particles then
represent (the program up to the current token of the current hole: the proposal regenerates up to the same
hole step). The moves leave that target invariant, so the SMC weights are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.inference import engine
from lmprog.inference.kernel import KernelConfig, get_kernels
from lmprog.inference.moves import Sites, host_rng, suffix_moves
from lmprog.inference.state import RunState
from lmprog.inference.strategies.base import ParticleStrategy, implements

__all__ = ["SMC"]


@implements("smc")
class SMC(ParticleStrategy):
    """Sequential Monte Carlo: importance + resampling when ``ESS < ess * particles``; ``rejuvenate=K``
    suffix MH moves per particle after every resampling (weights unchanged)."""

    waveable: ClassVar[bool] = True

    @property
    def batchable(self) -> bool:
        # moves keep host snapshots per particle and walk the whole batch in lock step: rows run alone
        return int(self.rejuvenate) == 0

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        rejuvenate = int(self.rejuvenate) > 0
        return KernelConfig(
            select="sample",
            weighted=True,
            resampler=self.resample if self.ess > 0 else None,
            groups=groups,
            chunk=chunk,
            trace=rejuvenate,
            stop_on_resample=rejuvenate,
        )

    def run(self, lm, program, *, key, groups=1, chunk=32, progress=None):
        if int(self.rejuvenate) == 0:
            return super().run(lm, program, key=key, groups=groups, chunk=chunk, progress=progress)
        return self._resample_move(lm, program, key, groups, chunk, progress)

    def _resample_move(self, lm, program, key, groups, chunk, progress):
        t_start = time.perf_counter()
        cfg = self.kernel_config(groups=groups, chunk=chunk)
        key, k_run = jax.random.split(key)
        run, state, s = engine.setup(lm, program, self, cfg, groups, k_run, progress)
        # Moves regenerate with kernels that never resample (each particle is its own chain).
        move_kern = get_kernels(lm, replace(cfg, resampler=None, stop_on_resample=False))
        rng = host_rng(key)
        sites = Sites.of(run, s)
        tally = {"proposed": 0, "accepted": 0, "rounds": 0}

        def rejuvenate(state: RunState, j: int, steps: int) -> RunState:
            tally["rounds"] += 1
            for _ in range(int(self.rejuvenate)):
                cause, log_weight = jax.device_get((state.particles.cause, state.particles.log_weight))
                alive = np.asarray(cause) == 0
                state, acc = suffix_moves(run, state, s, rng, alive, sites, stop=(j, steps), kern=move_kern)
                # The move leaves the intermediate target invariant: the SMC weights stay as they were.
                state = state._replace(particles=state.particles._replace(log_weight=jnp.asarray(log_weight)))
                tally["proposed"] += int(alive.sum())
                tally["accepted"] += int(acc.sum())
            return state

        state = engine.walk(run, state, s, on_resample=rejuvenate)
        result = engine.assemble(run, state, s, t_start)
        result.extra["rejuvenation"] = {
            "rounds": tally["rounds"],
            "moves": tally["proposed"],
            "acceptance": tally["accepted"] / tally["proposed"] if tally["proposed"] else None,
        }
        return result


STRATEGY = SMC
