"""MCMC over whole program executions: suffix Metropolis-Hastings, particle independent MH, particle Gibbs,
and SMC with resample-move rejuvenation.

The target is the engine's: ``gamma(x) = prod p_LM(generated and observed tokens) x factors`` on the
executions ``x`` the constraints allow. A *site* of ``x`` is a generated token (a token of some hole) or a
host step (where ``sample``/``let``/``factor`` run); ``n(x)`` is their number.

**Suffix move** (``mcmc(move="suffix")``). Pick a site uniformly, keep everything before it, regenerate the
rest with the proposal SMC uses (the masked LM, the program's forced text and host steps). Cutting at the
same site of ``x'`` gives back the same kept prefix, so with ``W(x) = gamma(x) / q(x | prefix)`` the
importance weight of the regenerated part (product of allowed masses, observed-text probabilities and
factors, recorded in ``Particles.lw_total``) the Metropolis-Hastings ratio is::

    alpha = min(1, [gamma(x') q(x | x')] / [gamma(x) q(x' | x)]) = min(1, W(x') n(x) / (W(x) n(x')))

The chain keeps the KV cache of the kept prefix: the kernels move the particle back to the cut
(``Kernels.resume_hole`` / ``resume_segment`` from its :class:`~lmprog.inference.state.Trace`) and overwrite
cache slots from there on; the current state's cache is kept aside and restored row by row on rejection
(``Kernels.select``). All chains move at once in one batch; a chain cut late idles (frozen) through the
segments before its cut.

**Independent move** (``mcmc(move="independent")``): particle independent MH. Propose a fresh SMC run with
``k`` particles per chain, draw ``x'`` from its weights, accept with ``min(1, Z'/Z)``. Every proposal's
``Z'`` is an unbiased evidence estimate; their average is reported as the log-evidence.

**Particle Gibbs**: conditional SMC. Particle 0 of every iteration replays the reference trajectory (its
tokens through ``Particles.force_len``, its host data and weights from the trace) and is its own ancestor
at every resampling; the others are resampled from all particles (multinomial). The next reference is
drawn from the final weights.

**Rejuvenation** (``smc(rejuvenate=K)``): after every resampling, ``K`` suffix moves per particle targeting
the distribution the particles represent at that point (the program up to the current token of the
current hole: the proposal regenerates up to the same hole step). Weights are unchanged.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.inference import engine
from lmprog.inference.engine import Plan, walk
from lmprog.inference.kernel import get_kernels
from lmprog.inference.program import Cause, Hole, Host, InferenceError
from lmprog.inference.result import InferenceResult, _logsumexp
from lmprog.inference.state import RunState
from lmprog.inference.strategies import MCMC, SMC, Importance, ParticleGibbs, Strategy

__all__ = ["run", "diagnostics"]

#: Fresh proposals tried for a chain whose first execution died before giving up.
MAX_INIT_TRIES = 50


def run(lm, program, strategy: Strategy, *, key, groups: int = 1, chunk: int = 32, progress=None,
        init=None) -> InferenceResult:
    """Run an MCMC strategy (or ``smc(rejuvenate=K)``); see the module docstring.

    ``init`` (suffix moves only): one token sequence (after the shared prefix) per chain to start from, e.g.
    exact posterior draws; it must be an execution of the program.
    """
    t_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        if isinstance(strategy, MCMC) and strategy.move == "independent":
            result = _independent_mh(lm, program, strategy, key, groups, chunk, progress)
        elif isinstance(strategy, MCMC):
            result = _suffix_mh(lm, program, strategy, key, groups, chunk, progress, init)
        elif isinstance(strategy, ParticleGibbs):
            result = _particle_gibbs(lm, program, strategy, key, groups, chunk, progress)
        elif isinstance(strategy, SMC) and strategy.rejuvenate > 0:
            result = _smc_rejuvenate(lm, program, strategy, key, groups, chunk, progress)
        else:  # pragma: no cover - engine.run dispatches only the strategies above
            raise ValueError(f"{strategy.name} is not an MCMC strategy")
    result.stats["wall_s"] = time.perf_counter() - t_start
    return result


# ------------------------------------------------------------------------------------------------------
# Sites and suffix moves
# ------------------------------------------------------------------------------------------------------


def _host_sites(program, first: int) -> np.ndarray:
    return np.array([j for j in range(first, len(program.segments)) if isinstance(program.segments[j], Host)], np.int64)


def _hole_segments(program) -> np.ndarray:
    return np.array([j for j, s in enumerate(program.segments) if isinstance(s, Hole)], np.int64)


def _count_sites(spans: np.ndarray, hosts: np.ndarray) -> np.ndarray:
    """``n(x)`` per particle: tokens inside hole spans (``spans [P, H, 2]``) plus the host sites ``hosts``."""
    return np.sum(np.maximum(spans[..., 1] - spans[..., 0], 0), axis=-1) + len(hosts)


def _choose_cuts(rng: np.random.Generator, spans: np.ndarray, hosts: np.ndarray, n_sites: np.ndarray,
                 hole_segs: np.ndarray, num_segments: int, movable: np.ndarray) -> Plan:
    """A site per particle (``movable`` ones; the others stay frozen), uniform among its ``n_sites[i]``:
    the host sites ``hosts``, then the tokens of its holes; as a :class:`Plan`."""
    num = spans.shape[0]
    seg = np.full((num,), num_segments + 1, np.int64)
    tok = np.full((num,), -1, np.int64)
    for i in np.flatnonzero(movable & (n_sites > 0)):
        u = int(rng.integers(n_sites[i]))
        if u < len(hosts):
            seg[i] = hosts[u]
            continue
        u -= len(hosts)
        for h, ln in enumerate(np.maximum(spans[i, :, 1] - spans[i, :, 0], 0)):
            if u < ln:
                seg[i], tok[i] = hole_segs[h], spans[i, h, 0] + u
                break
            u -= ln
    return Plan(seg=seg, tok=tok)


def _suffix_moves(r, state: RunState, setup, rng, movable, host_sites, hole_segs, stop=None, kern=None):
    """One suffix MH move for every particle in ``movable``. Returns ``(state, accepted [P] bool)``.
    ``stop = (j, k)``: the target is the program up to step ``k`` of hole segment ``j`` (rejuvenation), whose
    host sites are those before ``j``. ``kern``: the kernels that regenerate (default ``r.kern``; they must
    not resample)."""
    main_kern, progress = r.kern, r.progress
    kern = kern or r.kern
    segs = r.program.segments
    spans, lw = (np.asarray(a) for a in jax.device_get((state.particles.spans, state.particles.lw_total)))
    hosts = host_sites if stop is None else host_sites[host_sites < stop[0]]
    n_x = _count_sites(spans, hosts)
    plan = _choose_cuts(rng, spans, hosts, n_x, hole_segs, len(segs), movable)
    plan.stop = stop
    moving = plan.seg <= len(segs)
    state = r.sync_data(state)
    kept_data = [dict(d) for d in r.data]
    current = r.call(kern.copy, state)
    ess_history = list(r.ess)
    r.kern, r.progress = kern, None
    try:
        proposal = walk(r, state, setup, plan, check=False)
    finally:
        r.kern, r.progress = main_kern, progress
    r.ess[:] = ess_history
    p_spans, p_lw, p_cause = (np.asarray(a) for a in jax.device_get(
        (proposal.particles.spans, proposal.particles.lw_total, proposal.particles.cause)))
    n_y = _count_sites(p_spans, hosts)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_alpha = (p_lw.astype(np.float64) - lw.astype(np.float64)) + np.log(n_x) - np.log(np.maximum(n_y, 1))
    log_alpha = np.where((p_cause == 0) & np.isfinite(p_lw), log_alpha, -np.inf)
    u = rng.random(r.num)
    accept = moving & (np.log(np.maximum(u, 1e-300)) < log_alpha)
    state = r.call(kern.select, current, proposal, jnp.asarray(accept))
    proposal_data = r.data
    r.data = [dict(proposal_data[i]) if accept[i] else kept_data[i] for i in range(r.num)]
    return state, accept


def _rng(key) -> np.random.Generator:
    """Host randomness (site choices, accept draws) derived from the run's JAX key: same seed, same run."""
    bits = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel()
    return np.random.default_rng([int(b) for b in bits])


class _Recorder:
    """Collects the states of all chains at every kept step (host arrays)."""

    def __init__(self):
        self.rows: list = []

    def add(self, r, state: RunState, rows=None):
        """Record every particle, or those in ``rows`` (indices)."""
        p = state.particles
        fields = jax.device_get((p.tokens, p.length, p.spans, p.score, p.hole_logp, p.cause))
        state = r.sync_data(state)
        rows = np.arange(r.num) if rows is None else np.asarray(rows)
        self.rows.append(tuple(np.asarray(a)[rows] for a in fields) + ([dict(r.data[i]) for i in rows],))
        return state

    def engine_result(self, r, setup, state: RunState, strategy, groups: int, chains: int, extra: dict):
        """:meth:`result` for chains run by this module's walks (``r``, ``setup``: the engine's run)."""
        n_tokens, n_forward = jax.device_get((state.n_tokens, state.n_forward))
        return self.result(strategy, groups, chains, extra, holes=r.program.holes, tokenizer=r.lm.tokenizer,
                           prefix_text=r.prefix_text, prefix_tokens=setup.prefix, stats={
                               "tokens": int(n_tokens), "forward_passes": int(n_forward) + setup.n_prefill,
                               "prefill_tokens": len(setup.prefix) - 1, "compile_s": r.compile_s,
                               "prefix_logprob": setup.prefix_lp})

    def result(self, strategy, groups: int, chains: int, extra: dict, *, holes, tokenizer, prefix_text,
               prefix_tokens, stats: dict, log_z=None) -> InferenceResult:
        """Samples ordered per group, then per chain, then per kept step (chain ``c``'s ``k``-th kept state
        is particle ``c * kept + k`` of its group); every sample has the same weight."""
        kept = len(self.rows)
        stack = lambda i: np.stack([row[i] for row in self.rows], axis=1)  # noqa: E731  [P, kept, ...]
        tokens, lengths, spans, scores, hlp, causes = (stack(i) for i in range(6))
        num = tokens.shape[0]
        per = num // groups
        shape = lambda a: a.reshape((groups, per * kept) + a.shape[2:])  # noqa: E731
        causes = shape(causes)
        data = [[self.rows[k][6][g * per + c] for c in range(per) for k in range(kept)] for g in range(groups)]
        lw = np.where(causes == 0, 0.0, -np.inf)
        return InferenceResult(
            strategy=strategy.name,
            properly_weighted=strategy.properly_weighted,
            options=strategy.options(),
            holes=holes,
            tokenizer=tokenizer,
            prefix_text=prefix_text,
            prefix_tokens=list(prefix_tokens),
            tokens=shape(tokens),
            lengths=shape(lengths),
            spans=shape(spans),
            log_weights=lw,
            scores=shape(scores).astype(np.float64),
            causes=causes,
            hole_logprobs=shape(hlp).astype(np.float64),
            log_z=log_z,
            ess=np.zeros((0, groups)),
            resampled=np.zeros((0, groups), bool),
            stats={**stats, "particles": per * kept, "groups": groups},
            data=data,
            extra={"chains": chains, "kept": kept, **extra},
        )


def _start_chains(r, state, setup) -> RunState:
    """A first execution for every chain (the SMC proposal); chains whose execution died get fresh
    proposals (from the first segment) until they live. Every chain dying names the constraint."""
    state = walk(r, state, setup)
    for _ in range(MAX_INIT_TRIES):
        cause = np.asarray(jax.device_get(state.particles.cause))
        dead = cause != 0
        if not dead.any():
            return state
        plan = Plan(seg=np.where(dead, setup.first, len(r.program.segments) + 1), tok=np.full(r.num, -1))
        state = walk(r, state, setup, plan, check=False)
    cause = np.asarray(jax.device_get(state.particles.cause))
    deaths = {Cause(int(c)).name.lower(): int(k) for c, k in zip(*np.unique(cause[cause != 0], return_counts=True))}
    raise InferenceError(
        f"mcmc: {int(np.sum(cause != 0))} of {r.num} chains found no execution the constraints allow in "
        f"{MAX_INIT_TRIES + 1} tries (deaths: " + ", ".join(f"{c} x {k}" for c, k in deaths.items())
        + "); use smc to see which constraint kills them",
        causes=deaths,
    )


def _set_replay(state: RunState, sequences) -> RunState:
    """Particle ``i`` will replay ``sequences[i]`` (tokens after the shared prefix)."""
    p = state.particles
    tokens = np.array(jax.device_get(p.tokens))
    force = np.zeros((tokens.shape[0],), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq) > tokens.shape[1]:
            raise ValueError(f"init sequence {i} has {len(seq)} tokens; the program has room for {tokens.shape[1]}")
        tokens[i, : len(seq)] = seq
        force[i] = len(seq)
    return state._replace(particles=p._replace(tokens=jnp.asarray(tokens), force_len=jnp.asarray(force)))


def _suffix_mh(lm, program, strategy: MCMC, key, groups, chunk, progress, init=None) -> InferenceResult:
    chains = int(strategy.chains)
    num = chains * groups
    cfg = strategy.kernel_config(chunk=chunk)
    base = Importance(particles=num, temperature=strategy.temperature, max_tokens=strategy.max_tokens)
    key, k_run = jax.random.split(key)
    r, state, setup = engine._setup(lm, program, base, cfg, 1, k_run, None)
    rng = _rng(key)
    host_sites = _host_sites(program, setup.first)
    hole_segs = _hole_segments(program)
    if init is None:
        state = _start_chains(r, state, setup)
    else:
        if len(init) != num:
            raise ValueError(f"init: {len(init)} sequences for {num} chains")
        state = walk(r, _set_replay(state, init), setup, check=False)
        p = jax.device_get(state.particles)
        for i, seq in enumerate(init):
            if p.cause[i] != 0 or [int(t) for t in p.tokens[i, : p.length[i]]] != [int(t) for t in seq]:
                raise ValueError(f"init sequence {i} is not an execution of the program")
    r.ess.clear()
    accepted = np.zeros((num,), np.int64)
    rec = _Recorder()
    for step in range(int(strategy.steps)):
        state, acc = _suffix_moves(r, state, setup, rng, np.ones((num,), bool), host_sites, hole_segs)
        accepted += acc
        if step >= int(strategy.burn_in):
            state = rec.add(r, state)
        if progress is not None:
            progress(engine.Progress("mcmc", step + 1, int(strategy.steps), num))
    return rec.engine_result(r, setup, state, strategy, groups, chains, {
        "acceptance": (accepted / int(strategy.steps)).reshape(groups, chains),
        "move": "suffix",
    })


# ------------------------------------------------------------------------------------------------------
# Particle independent MH
# ------------------------------------------------------------------------------------------------------


def _independent_mh(lm, program, strategy: MCMC, key, groups, chunk, progress) -> InferenceResult:
    chains = int(strategy.chains)
    num = chains * groups
    k = int(strategy.particles)
    proposal = SMC(particles=k, temperature=strategy.temperature, max_tokens=strategy.max_tokens)
    rng = _rng(key)
    cur = None  # (tokens, lengths, spans, scores, hole_logp, causes, data) per chain
    cur_logz = np.full((num,), -np.inf)
    all_logz = []
    accepted = np.zeros((num,), np.int64)
    rec = _Recorder()
    stats = {"tokens": 0, "forward_passes": 0, "compile_s": 0.0}
    first = None
    for step in range(int(strategy.steps) + 1):
        key, sub = jax.random.split(key)
        try:
            res = engine.run(lm, program, proposal, key=sub, groups=num, chunk=chunk)
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
            if step - 1 >= int(strategy.burn_in):
                rec.rows.append(cur)
        if progress is not None:
            progress(engine.Progress("mcmc", step, int(strategy.steps), num))
    # Every proposal's Z' is unbiased for Z: their mean (over steps and a group's chains) is too.
    lz = np.stack(all_logz, axis=0).reshape(len(all_logz), groups, chains)
    log_z = _logsumexp(np.moveaxis(lz, 0, 1).reshape(groups, -1)) - math.log(lz.shape[0] * chains)
    return rec.result(strategy, groups, chains, {
        "acceptance": (accepted / int(strategy.steps)).reshape(groups, chains),
        "move": "independent",
        "proposal_log_z": np.moveaxis(lz, 0, 1),
    }, holes=program.holes, tokenizer=lm.tokenizer, prefix_text=first.prefix_text,
        prefix_tokens=first.prefix_tokens, log_z=log_z, stats={
            **stats, "prefix_logprob": first.stats.get("prefix_logprob", 0.0),
            "prefill_tokens": first.stats.get("prefill_tokens", 0)})


# ------------------------------------------------------------------------------------------------------
# Diagnostics
# ------------------------------------------------------------------------------------------------------


def diagnostics(result: InferenceResult, key=None, group: int = 0) -> dict:
    """Acceptance rate per chain, split R-hat and effective sample size (``numpyro.diagnostics``) of
    ``key(sample)`` (default: the hole values) over the chains of an MCMC result.

    Numeric values are used as they are; other values (strings, tuples) are categorical: R-hat and ESS are
    computed for the indicator of every category making up at least 5 % of the samples and the worst
    (largest R-hat, smallest ESS) is reported. ``None`` where a statistic is undefined (fewer than 4 kept steps, or a constant value); R-hat
    is ``inf`` when every chain is stuck on its own value.
    """
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    chains, kept = int(result.extra["chains"]), int(result.extra["kept"])
    key = key or (lambda s: tuple(sorted(s.values.items())))
    samples = result.samples_of(group)
    values = [[key(samples[c * kept + k]) if samples[c * kept + k].alive else None for k in range(kept)]
              for c in range(chains)]
    acc = result.extra.get("acceptance")
    out = {"acceptance": None if acc is None else [float(a) for a in np.asarray(acc)[group]], "r_hat": None, "ess": None}
    flat = [v for row in values for v in row]
    if kept < 4 or any(v is None for v in flat):
        return out
    numeric = all(isinstance(v, (int, float, bool, np.integer, np.floating)) for v in flat)
    # Categories seen in fewer than 5 % of the samples are too rare for a meaningful R-hat of their own.
    common = [c for c in sorted(set(flat), key=repr) if flat.count(c) >= 0.05 * len(flat)]
    series = [np.asarray(values, np.float64)] if numeric else [
        np.asarray([[1.0 if v == c else 0.0 for v in row] for row in values]) for c in common]
    r_hats, esss = [], []
    for x in series:
        if np.ptp(x) == 0:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            r_hats.append(float(split_gelman_rubin(x)))
            esss.append(float(effective_sample_size(x)))
    # Chains each stuck on a different constant value give R-hat = inf: reported as such (null in JSON).
    r_hats = [v for v in r_hats if not np.isnan(v)]
    esss = [v for v in esss if not np.isnan(v)]
    out["r_hat"] = max(r_hats) if r_hats else None
    out["ess"] = min(esss) if esss else None
    return out


# ------------------------------------------------------------------------------------------------------
# SMC with rejuvenation
# ------------------------------------------------------------------------------------------------------


def _smc_rejuvenate(lm, program, strategy: SMC, key, groups, chunk, progress) -> InferenceResult:
    t_start = time.perf_counter()
    cfg = strategy.kernel_config(groups=groups, chunk=chunk)
    key, k_run = jax.random.split(key)
    r, state, setup = engine._setup(lm, program, strategy, cfg, groups, k_run, progress)
    # Moves regenerate with kernels that never resample (each particle is its own chain).
    move_kern = get_kernels(lm, replace(cfg, resampler=None, stop_on_resample=False))
    rng = _rng(key)
    host_sites = _host_sites(program, setup.first)
    hole_segs = _hole_segments(program)
    tally = {"proposed": 0, "accepted": 0, "rounds": 0}

    def rejuvenate(state: RunState, j: int, steps: int) -> RunState:
        tally["rounds"] += 1
        for _ in range(int(strategy.rejuvenate)):
            cause, log_weight = jax.device_get((state.particles.cause, state.particles.log_weight))
            alive = np.asarray(cause) == 0
            log_weight = jnp.asarray(log_weight)
            state, acc = _suffix_moves(r, state, setup, rng, alive, host_sites, hole_segs, stop=(j, steps),
                                       kern=move_kern)
            # The move leaves the intermediate target invariant: the SMC weights stay as they were.
            state = state._replace(particles=state.particles._replace(log_weight=log_weight))
            tally["proposed"] += int(alive.sum())
            tally["accepted"] += int(acc.sum())
        return state

    state = walk(r, state, setup, rejuvenate=rejuvenate)
    result = engine._assemble(r, state, setup.prefix, setup.prefix_lp, setup.n_prefill, t_start)
    result.extra["rejuvenation"] = {
        "rounds": tally["rounds"],
        "moves": tally["proposed"],
        "acceptance": tally["accepted"] / tally["proposed"] if tally["proposed"] else None,
    }
    return result


# ------------------------------------------------------------------------------------------------------
# Particle Gibbs
# ------------------------------------------------------------------------------------------------------


def _particle_gibbs(lm, program, strategy: ParticleGibbs, key, groups, chunk, progress) -> InferenceResult:
    n = int(strategy.particles)
    num = groups * n
    cfg = strategy.kernel_config(groups=groups, chunk=chunk)
    key, k_run = jax.random.split(key)
    r, state, setup = engine._setup(lm, program, strategy, cfg, groups, k_run, progress)
    fresh = r.call(r.kern.copy, state)  # particles right after the shared prefix (its cache broadcast)
    rng = _rng(key)
    replay = np.arange(num) % n == 0
    rec = _Recorder()
    # Sweep 0 is plain SMC (particle 0 keeps its own lineage, which only picks the first reference); groups
    # whose particles all died run again until one lives.
    state = walk(r, state, setup)
    for _ in range(MAX_INIT_TRIES):
        dead = (np.asarray(jax.device_get(state.particles.cause)) != 0).reshape(groups, n).all(axis=1)
        if not dead.any():
            break
        rerun = np.repeat(dead, n)
        plan = Plan(seg=np.where(rerun, setup.first, len(program.segments) + 1), tok=np.full(num, -1))
        state = walk(r, state, setup, plan, check=False)
    else:
        raise InferenceError(f"particle_gibbs: some groups found no execution the constraints allow in "
                             f"{MAX_INIT_TRIES + 1} sweeps; use smc to see which constraint kills them")
    changed = np.zeros((groups,), np.int64)
    previous = None
    for it in range(int(strategy.iterations) + 1):
        p = jax.device_get(state.particles)
        w = np.asarray(p.log_weight, np.float64).reshape(groups, n)
        w = np.where(np.asarray(p.cause).reshape(groups, n) == 0, w, -np.inf)
        w = np.exp(w - _logsumexp(w)[:, None])
        pick = np.array([g * n + rng.choice(n, p=w[g] / w[g].sum()) for g in range(groups)])
        if it > 0:
            state = rec.add(r, state, pick)
            seqs = [tuple(int(t) for t in p.tokens[i, : p.length[i]]) for i in pick]
            if previous is not None:
                changed += np.array([a != b for a, b in zip(seqs, previous)])
            previous = seqs
        if it == int(strategy.iterations):
            break
        # The next sweep: fresh particles; particle 0 of each group replays the reference.
        state = r.sync_data(state)
        anc = np.repeat(pick, n)
        ref = jax.tree.map(lambda a: np.asarray(a)[anc], p)
        base = r.call(r.kern.copy, fresh)
        parts = base.particles._replace(
            tokens=jnp.asarray(ref.tokens),
            trace=jax.tree.map(jnp.asarray, ref.trace),
            force_len=jnp.asarray(np.where(replay, ref.length, 0).astype(np.int32)),
        )
        state = base._replace(particles=parts, key=jax.random.fold_in(key, it), n_tokens=state.n_tokens,
                              n_forward=state.n_forward)
        r.data = None
        state = walk(r, state, setup, replay=replay)
        p = jax.device_get(state.particles)
        bad = replay & ((np.asarray(p.cause) != 0) | (np.asarray(p.length) != np.asarray(ref.length)))
        if bad.any():  # pragma: no cover - the reference is an execution of the program by construction
            raise RuntimeError("particle_gibbs: the reference trajectory could not be replayed")
    iters = int(strategy.iterations)
    return rec.engine_result(r, setup, state, strategy, groups, 1, {
        "reference_update_rate": (changed / max(1, iters - 1)).reshape(groups, 1),
    })
