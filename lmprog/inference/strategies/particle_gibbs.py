"""``particle_gibbs(iterations, particles)``: conditional SMC keeping a reference trajectory.

Particle 0 of every iteration replays the reference trajectory (its tokens through ``Particles.force_len``,
its host data and weights from the trace: :class:`lmprog.inference.moves.Replay`) and is its own ancestor at
every resampling; the others are resampled from all particles (multinomial) whenever the ESS falls under
half the particles. The next reference is drawn from
the final weights. The chain of references leaves the posterior invariant; each of the ``iterations``
references is a sample.

The result's ``sweep`` is the last conditional SMC sweep (the population the last reference was drawn from,
with its genealogy: how many lineages reach the end, the classic diagnostic of path degeneracy).
"""

from __future__ import annotations

import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.inference import engine
from lmprog.inference.kernel import KernelConfig
from lmprog.inference.moves import MAX_INIT_TRIES, Cuts, Recorder, Replay, host_rng
from lmprog.inference.segments import InferenceError
from lmprog.inference.samples import InferenceResult, logsumexp
from lmprog.inference.strategies.base import Strategy, implements

__all__ = ["ParticleGibbs"]


@implements("particle_gibbs")
class ParticleGibbs(Strategy):
    """Particle Gibbs: conditional SMC with ``particles`` particles, one of which is the reference."""

    #: Resample when the ESS falls under half the particles, as ``smc`` does by default (the decision is a
    #: symmetric function of all the weights, the reference's included, so the kernel stays invariant). Never
    #: resampling (conditional importance sampling) makes every proposal beat the reference's whole path at
    #: once; resampling at every step makes the early tokens collapse onto the reference's (path degeneracy).
    #: Measured: benchmarks/bench_pg_resampling.py (docs/inference.md, "particle Gibbs").
    ess = 0.5

    def validate(self):
        super().validate()
        if int(self.particles) < 2:
            raise ValueError("particle_gibbs: needs at least 2 particles (one is the reference)")

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        return KernelConfig(select="sample", weighted=True, resampler="multinomial", groups=groups, chunk=chunk,
                            trace=True, conditional=True)

    def run(self, lm, program, *, key, groups=1, chunk=32, progress=None) -> InferenceResult:
        n = int(self.particles)
        num = groups * n
        cfg = self.kernel_config(groups=groups, chunk=chunk)
        key, k_run = jax.random.split(key)
        run, state, s = engine.setup(lm, program, self, cfg, groups, k_run, progress)
        fresh = run.call(run.kern.copy, state)  # particles right after the shared prefix (own caches empty)
        rng = host_rng(key)
        replay = np.arange(num) % n == 0
        rec = Recorder()
        # Sweep 0 is plain SMC (particle 0 keeps its own lineage, which only picks the first reference); groups
        # whose particles all died run again until one lives.
        t_sweep = time.perf_counter()
        state = engine.walk(run, state, s)
        for _ in range(MAX_INIT_TRIES):
            dead = (np.asarray(jax.device_get(state.particles.cause)) != 0).reshape(groups, n).all(axis=1)
            if not dead.any():
                break
            rerun = np.repeat(dead, n)
            cuts = Cuts(np.where(rerun, s.first, len(program.segments) + 1), np.full(num, -1))
            state = engine.walk(run, state, s, cuts, check=False)
        else:
            raise InferenceError(f"particle_gibbs: some groups found no execution the constraints allow in "
                                 f"{MAX_INIT_TRIES + 1} sweeps; use smc to see which constraint kills them")
        changed = np.zeros((groups,), np.int64)
        previous = None
        for it in range(int(self.iterations) + 1):
            p = jax.device_get(state.particles)
            w = np.asarray(p.log_weight, np.float64).reshape(groups, n)
            w = np.where(np.asarray(p.cause).reshape(groups, n) == 0, w, -np.inf)
            w = np.exp(w - logsumexp(w)[:, None])
            pick = np.array([g * n + rng.choice(n, p=w[g] / w[g].sum()) for g in range(groups)])
            if it > 0:
                state = rec.add(run, state, pick)
                seqs = [tuple(int(t) for t in p.tokens[i, : p.length[i]]) for i in pick]
                if previous is not None:
                    changed += np.array([a != b for a, b in zip(seqs, previous)])
                previous = seqs
            if it == int(self.iterations):
                sweep = engine.assemble(run, state, s, t_sweep)
                break
            # The next sweep: fresh particles; particle 0 of each group replays the reference.
            state = run.sync_data(state)
            anc = np.repeat(pick, n)
            ref = jax.tree.map(lambda a: np.asarray(a)[anc], p)
            base = run.call(run.kern.copy, fresh)
            parts = base.particles._replace(
                tokens=jnp.asarray(ref.tokens),
                trace=jax.tree.map(jnp.asarray, ref.trace),
                force_len=jnp.asarray(np.where(replay, ref.length, 0).astype(np.int32)),
            )
            state = base._replace(particles=parts, key=jax.random.fold_in(key, it), n_tokens=state.n_tokens,
                                  n_forward=state.n_forward, n_rows=state.n_rows)
            run.data = None
            # Each sweep's ESS rows and genealogy are its own (the last sweep's go into the result).
            run.ess.clear()
            run.genealogy.clear()
            run.genealogy_dropped = 0
            t_sweep = time.perf_counter()
            state = engine.walk(run, state, s, Replay(replay))
            p = jax.device_get(state.particles)
            bad = replay & ((np.asarray(p.cause) != 0) | (np.asarray(p.length) != np.asarray(ref.length)))
            if bad.any():  # pragma: no cover - the reference is an execution of the program by construction
                raise RuntimeError("particle_gibbs: the reference trajectory could not be replayed")
        iters = int(self.iterations)
        result = rec.engine_result(run, s, state, self, groups, 1, {
            "reference_update_rate": (changed / max(1, iters - 1)).reshape(groups, 1),
        })
        return replace(result, sweep=sweep)


STRATEGY = ParticleGibbs
