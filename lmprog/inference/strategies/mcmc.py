"""``mcmc(steps, chains, burn_in, move, particles)``: Metropolis-Hastings whose states are whole program
executions, ``chains`` chains in one batch.

``move="suffix"``: cut the chain's trajectory at a uniformly chosen *site* (a generated token or a host
step), keep the prefix (and its KV cache), regenerate the rest with the SMC proposal and accept with
``min(1, W(x') n(x) / (W(x) n(x')))`` (:mod:`lmprog.inference.moves`). ``move="independent"``: particle
independent MH: propose a fresh SMC run with ``particles`` particles per chain, draw ``x'`` from its weights
and accept with ``min(1, Z'/Z)``, the ratio of the two runs' evidence estimates; every proposal's ``Z'`` is
unbiased, so their mean is reported as the evidence. The first ``burn_in`` steps are dropped; every later
state of every chain is a sample (equal weights).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import jax
import numpy as np

from lmprog.inference import engine, moves
from lmprog.inference.kernel import get_kernels
from lmprog.inference.moves import Recorder, Sites, host_rng, set_replay, start_chains, suffix_moves
from lmprog.inference.rolling import rolling_moves
from lmprog.inference.segments import InferenceError
from lmprog.inference.samples import InferenceResult, logsumexp
from lmprog.inference.strategies.base import Strategy, implements
from lmprog.inference.strategies.importance import Importance
from lmprog.inference.strategies.smc import SMC

__all__ = ["MCMC", "MOVES"]

MOVES = ("suffix", "independent")


@implements("mcmc")
class MCMC(Strategy):
    """Metropolis-Hastings over whole program executions (see the module docstring)."""

    @property
    def batchable(self) -> bool:
        return False  # per-chain histories and host snapshots per particle: rows run one after another

    def footprint(self, groups: int = 1):
        chains = int(self.chains) * groups
        if self.move == "independent":  # every chain's proposal is an SMC run of `particles`
            return SMC(particles=self.particles).kernel_config(groups=chains), chains * int(self.particles)
        return replace(Importance(particles=chains).kernel_config(groups=1), trace=True), chains

    def validate(self):
        super().validate()
        if not 0 <= int(self.burn_in) < int(self.steps):
            raise ValueError(f"mcmc: burn_in must be in [0, steps), got burn_in={self.burn_in}, steps={self.steps}")

    def run(self, lm, program, *, key, groups=1, chunk=32, progress=None, init=None) -> InferenceResult:
        """``init`` (suffix moves only): one token sequence (after the shared prefix) per chain to start from,
        e.g. exact posterior draws; it must be an execution of the program."""
        if self.move == "independent":
            return self._independent(lm, program, key, groups, chunk, progress)
        return self._suffix(lm, program, key, groups, chunk, progress, init)

    def _suffix(self, lm, program, key, groups, chunk, progress, init) -> InferenceResult:
        chains = int(self.chains)
        num = chains * groups
        base = Importance(particles=num, temperature=self.temperature, max_tokens=self.max_tokens,
                          enumerate=self.enumerate)
        cfg = replace(base.kernel_config(groups=1, chunk=chunk), trace=True)
        key, k_run = jax.random.split(key)
        run, state, s = engine.setup(lm, program, base, cfg, 1, k_run, None)
        rolling = bool(moves.ROLLING)
        if rolling:  # the host looks at the chains after every chunk of the token loop: small chunks
            run.kern = get_kernels(lm, replace(cfg, chunk=moves.MOVE_CHUNK))
        rng = host_rng(key)
        sites = Sites.of(run, s)
        if init is None:
            state = start_chains(run, state, s)
        else:
            if len(init) != num:
                raise ValueError(f"init: {len(init)} sequences for {num} chains")
            state = engine.walk(run, set_replay(state, init), s, check=False)
            p = jax.device_get(state.particles)
            for i, seq in enumerate(init):
                if p.cause[i] != 0 or [int(t) for t in p.tokens[i, : p.length[i]]] != [int(t) for t in seq]:
                    raise ValueError(f"init sequence {i} is not an execution of the program")
        run.ess.clear()
        rec = Recorder()
        calls0, tokens0 = (int(a) for a in jax.device_get((state.n_forward, state.n_tokens)))
        t0 = time.perf_counter()

        def cost(state) -> dict:  # what the moves took (the first execution excluded)
            calls, tokens = (int(a) for a in jax.device_get((state.n_forward, state.n_tokens)))
            return {"move_lm_calls": calls - calls0, "move_tokens": tokens - tokens0,
                    "move_s": time.perf_counter() - t0}

        if rolling:
            state, ch = rolling_moves(run, state, s, rng, sites, int(self.steps), int(self.burn_in), rec, progress)
            return rec.engine_result(run, s, state, self, groups, chains, {
                "acceptance": (ch.accepted / int(self.steps)).reshape(groups, chains),
                "move": "suffix",
                "walks": 1,
                "move_chunks": ch.chunks,
                **cost(state),
            })
        accepted = np.zeros((num,), np.int64)
        for step in range(int(self.steps)):
            state, acc = suffix_moves(run, state, s, rng, np.ones((num,), bool), sites)
            accepted += acc
            if step >= int(self.burn_in):
                state = rec.add(run, state)
            if progress is not None:
                progress(engine.Progress("mcmc", step + 1, int(self.steps), num))
        return rec.engine_result(run, s, state, self, groups, chains, {
            "acceptance": (accepted / int(self.steps)).reshape(groups, chains),
            "move": "suffix",
            "walks": int(self.steps),
            **cost(state),
        })

    def _independent(self, lm, program, key, groups, chunk, progress) -> InferenceResult:
        chains = int(self.chains)
        num = chains * groups
        k = int(self.particles)
        proposal = SMC(particles=k, temperature=self.temperature, max_tokens=self.max_tokens,
                       enumerate=self.enumerate)
        rng = host_rng(key)
        cur = None  # (tokens, lengths, spans, scores, hole_logp, causes, data) per chain
        cur_logz = np.full((num,), -np.inf)
        all_logz = []
        accepted = np.zeros((num,), np.int64)
        rec = Recorder()
        stats = {"tokens": 0, "forward_passes": 0, "compile_s": 0.0}
        first = None
        for step in range(int(self.steps) + 1):
            key, sub = jax.random.split(key)
            try:
                res = proposal.run(lm, program, key=sub, groups=num, chunk=chunk)
            except InferenceError:
                if cur is None:
                    raise
                continue  # every proposal of this step died: all rejected
            first = first or res
            for name in stats:
                stats[name] += res.stats.get(name, 0)
            logz = np.asarray(res.log_z, np.float64)
            all_logz.append(logz)
            w = res.weights
            pick = np.array([rng.choice(k, p=w[g] / w[g].sum()) if w[g].sum() > 0 else 0 for g in range(num)])
            rows = np.arange(num)
            draw = (res.tokens[rows, pick], res.lengths[rows, pick], res.spans[rows, pick], res.scores[rows, pick],
                    res.hole_logprobs[rows, pick], res.causes[rows, pick], [res.data[g][pick[g]] for g in range(num)])
            if cur is None:
                cur, cur_logz = draw, logz
            else:
                with np.errstate(invalid="ignore"):
                    log_alpha = np.where(np.isfinite(logz), logz - cur_logz, -np.inf)
                accept = np.log(np.maximum(rng.random(num), 1e-300)) < log_alpha
                accepted += accept
                cur = tuple(
                    [d if a else c for d, c, a in zip(draw[6], cur[6], accept)] if i == 6 else np.where(
                        accept.reshape((-1,) + (1,) * (np.ndim(draw[i]) - 1)), draw[i], cur[i])
                    for i in range(7)
                )
                cur_logz = np.where(accept, logz, cur_logz)
                if step - 1 >= int(self.burn_in):
                    rec.rows.append(cur)
            if progress is not None:
                progress(engine.Progress("mcmc", step, int(self.steps), num))
        # Every proposal's Z' is unbiased for Z: their mean (over steps and a group's chains) is too.
        lz = np.stack(all_logz, axis=0).reshape(len(all_logz), groups, chains)
        log_z = logsumexp(np.moveaxis(lz, 0, 1).reshape(groups, -1)) - math.log(lz.shape[0] * chains)
        return rec.result(self, groups, chains, {
            "acceptance": (accepted / int(self.steps)).reshape(groups, chains),
            "move": "independent",
            "proposal_log_z": np.moveaxis(lz, 0, 1),
        }, holes=program.holes, tokenizer=lm.tokenizer, prefix_text=first.prefix_text,
            prefix_tokens=first.prefix_tokens, log_z=log_z, stats={
                **stats, "prefix_logprob": first.stats.get("prefix_logprob", 0.0),
                "prefill_tokens": first.stats.get("prefill_tokens", 0)})


STRATEGY = MCMC
