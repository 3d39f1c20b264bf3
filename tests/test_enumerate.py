"""Exact enumeration of finite holes (issue 16, items 1 and 4) against exact enumeration on toy LMs.

Statistical tests and their failure rates (for a random seed; seeds are fixed, so the suite is deterministic):

* chi-square goodness of fit at ``ALPHA = 1e-3`` of one draw per independent group (importance sampling
  resampled, SMC, the last reference of particle Gibbs, the final state of MCMC chains) to the exact posterior;
* unbiasedness of ``Z_hat`` (``mean_g Z_hat_g`` within 4 standard errors of the exact ``Z``: < 1e-4).

Deterministic checks: the trie's paths are exactly the hole's token sequences of the exact enumeration; a
program whose only random choice is an enumerated hole gets ``log Z`` exactly and ESS = N; the
Rao-Blackwellized posterior is the exact one at any particle count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _inference_cases import (ALPHA, BOS, EOS, LETTERS, NL, SP, bias_case, chi_square_pvalue, host_case, rich_case,
                              z_score_of_mean)
from lmprog.automata.values import ValueRule
from lmprog.backends.toy import ToyLM
from lmprog.compiler.automaton import Automaton, stack_automata
from lmprog.inference import Hole, SegmentProgram, Text, enumeration, holes, run
from lmprog.inference.exact import enumerate_program
from lmprog.inference.moves import Sites
from lmprog.inference.samples import InferenceResult
from lmprog.inference.strategies import MCMC, SMC, Greedy, Importance, ParticleGibbs, Sampling
from lmprog.result import Result


@pytest.fixture(autouse=True)
def _room(monkeypatch):
    """Room for every particle of the many-group runs below to be its own class (the default bounds memory);
    the whole trie expanded (zero variance), unless a test prunes it."""
    monkeypatch.setattr(enumeration, "MAX_ROWS", 1 << 20)
    monkeypatch.setattr(enumeration, "PRUNE", 0.0)


def first_hole_program(case):
    """The case's program up to and including its first hole (its only random choice)."""
    lm, prog = case()
    segs = list(prog.segments)
    k = next(i for i, s in enumerate(segs) if isinstance(s, Hole))
    return lm, SegmentProgram(segs[: k + 1], prog.table)


@pytest.mark.parametrize("case", [bias_case, rich_case, host_case])
def test_trie_paths_are_the_hole_language(case):
    lm, prog = first_hole_program(case)
    exact = enumerate_program(lm, prog)
    hole = prog.holes[0]
    trie = enumeration.build_trie(prog.table, int(hole.start), hole.max_tokens, hole.max_tokens + holes.slack(prog.table))
    assert trie is not None
    paths = {tuple(int(t) for t in trie.path_tokens[k, : trie.path_len[k]]) for k in range(trie.leaves.size)}
    assert paths == {p.tokens for p in exact.paths}  # tokens after the prompt: the hole's
    assert len(paths) == trie.leaves.size  # prefix-free: every path once


@pytest.mark.parametrize("case", [bias_case, rich_case, host_case])
@pytest.mark.parametrize("strategy", [Importance(enumerate=True, particles=3), SMC(enumerate=True, particles=3, ess=1.0)])
def test_one_enumerated_hole_is_exact_with_any_particles(case, strategy):
    lm, prog = first_hole_program(case)
    exact = enumerate_program(lm, prog)
    res = run(lm, prog, strategy, seed=0, groups=4)
    assert res.stats["enumerated"][prog.holes[0].name]["rao_blackwellized"]
    np.testing.assert_allclose(res.log_z, exact.log_z, atol=2e-5)  # zero variance: every particle's weight is Z
    assert np.all(res.ess[-1] > 3 - 1e-4)


def final_draws(res, strategy) -> list:
    """One exact-in-the-limit draw per chain: the last reference of particle Gibbs, the final MCMC state."""
    if isinstance(strategy, ParticleGibbs):
        return [res.sequences(g)[-1] for g in range(res.groups)]
    kept, chains = int(res.extra["kept"]), int(res.extra["chains"])
    return [res.sequences(g)[c * kept + kept - 1] for g in range(res.groups) for c in range(chains)]


def unbiased_z_scores(res, probs, z_exact, min_mass: float = 0.02) -> np.ndarray:
    """z-scores of the per-group unnormalized estimates ``sum_i w_gi 1[x_gi = k] / N`` of ``gamma(k)`` (sequences
    with posterior mass >= ``min_mass``) and of ``Z_hat``: properly weighted particles estimate both without bias
    (one self-normalized draw per group would not: it is biased at small N). A sequence no group drew has a zero
    sample SE and a z-score of -inf: rare sequences need more groups than the test can afford."""
    w = np.exp(res.log_weights)
    n = res.num_particles
    zs = [z_score_of_mean(np.exp(res.log_z), z_exact)]
    for k, pk in probs.items():
        if pk >= min_mass:
            est = np.array([sum(w[g, i] for i, x in enumerate(res.sequences(g)) if x == k) / n
                            for g in range(res.groups)])
            zs.append(z_score_of_mean(est, pk * z_exact))
    return np.array(zs)


STRATEGIES = {
    "importance": (Importance(enumerate=True, particles=4), 600),
    "smc": (SMC(enumerate=True, particles=4, ess=1.0), 600),
    "smc-rejuvenate": (SMC(enumerate=True, particles=4, ess=1.0, rejuvenate=1), 600),
    "particle_gibbs": (ParticleGibbs(enumerate=True, iterations=4, particles=3), 400),
    "mcmc": (MCMC(enumerate=True, steps=30, chains=300, burn_in=29, particles=2), 1),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("case", [rich_case, host_case])
def test_strategies_with_enumerated_holes_match_the_exact_posterior(case, name):
    lm, prog = case()
    strategy, groups = STRATEGIES[name]
    exact = enumerate_program(lm, prog)
    res = run(lm, prog, strategy, seed=3, groups=groups)
    assert res.stats.get("enumerated"), res.stats  # at least the first hole was enumerated
    if isinstance(strategy, (ParticleGibbs, MCMC)):
        p = chi_square_pvalue(final_draws(res, strategy), exact.probs())
        assert p > ALPHA, f"{name}: chi-square p-value {p:.2e}"
    else:
        zs = unbiased_z_scores(res, exact.probs(), exact.z)
        assert len(zs) >= 3 and np.all(np.abs(zs) < 4.5), zs


def test_enumeration_lowers_the_variance_of_log_z():
    lm, prog = rich_case()
    on = run(lm, prog, Importance(enumerate=True, particles=4), seed=5, groups=300)
    off = run(lm, prog, Importance(particles=4, enumerate=False), seed=5, groups=300)
    assert "enumerated" in on.stats and "enumerated" not in off.stats
    z = enumerate_program(lm, prog).log_z
    ratio = lambda r: np.exp(np.asarray(r.log_z, np.float64) - z)  # noqa: E731  (a dead group: Z_hat = 0)
    assert np.var(ratio(on)) < 0.75 * np.var(ratio(off)), (np.var(ratio(on)), np.var(ratio(off)))


def test_turning_it_off():
    lm, prog = bias_case()
    assert "enumerated" not in run(lm, prog, Importance(particles=4, enumerate=False), seed=0).stats
    on = Importance(enumerate=True, particles=4)
    assert "enumerated" in run(lm, prog, on, seed=0).stats  # the switch below is what turns it off
    assert "enumerated" not in run(lm, prog, on.with_options(enumerate=False), seed=0).stats
    # Not for strategies that are not samplers of the target: sample (the locally-constrained baseline), greedy.
    for st in (Sampling(n=4), Greedy()):
        assert "enumerated" not in run(lm, prog, st, seed=0).stats


def test_enumerated_holes_are_one_mcmc_site():
    lm, prog = rich_case()
    res = run(lm, prog, MCMC(enumerate=True, steps=2, chains=2, particles=1), seed=0)
    assert "x" in res.stats["enumerated"]
    from lmprog.inference import engine
    from lmprog.inference.kernel import KernelConfig

    r, _, s = engine.setup(lm, prog, MCMC(enumerate=True, steps=2, chains=2), KernelConfig(trace=True), 1, __import__("jax").random.key(0), None)
    sites = Sites.of(r, s)
    assert list(sites.whole) == [True, True]
    spans = np.array([[[0, 3], [4, 6]]])
    assert list(sites.count(spans)) == [2]


# --------------------------------------------------------------------------------------------------
# Rao-Blackwellized posteriors
# --------------------------------------------------------------------------------------------------


def two_choice_case():
    """A prompt, a hole whose only values are ``a`` and ``b`` (then ``\\n``), then text: the posterior of the hole
    is the LM's conditional. A random LM: exact values differ from 1/2."""
    lm = ToyLM.random(context=2, positions=8, seed=2, scale=2.0)
    v = lm.vocab_size
    ns = -np.ones((3, v), np.int32)
    ns[0, list(LETTERS[:2])] = 1
    ns[1, NL] = 2
    table, offs = stack_automata([Automaton(ns, np.array([False, False, True]), 0)])
    prog = SegmentProgram([Text((BOS, SP)), Hole("x", start=offs[0], max_tokens=3, value=ValueRule(stop=b"\n")),
                           Text((SP, EOS))], table)
    return lm, prog


@pytest.mark.parametrize("particles", [1, 2, 16])
def test_rao_blackwellized_posterior_is_exact(particles):
    lm, prog = two_choice_case()
    exact = enumerate_program(lm, prog).marginal(lambda p: p.values["x"])
    raw = run(lm, prog, Importance(enumerate=True, particles=particles), seed=1)
    assert raw.stats["enumerated"]["x"]["rao_blackwellized"]
    res = Result.from_inference(raw, lambda s: dict(s.values), {})
    got = dict((v["x"], p) for v, p in res.posterior)
    assert set(got) == set(exact)
    for k in exact:
        assert got[k] == pytest.approx(exact[k], abs=1e-5)
    assert dict(res.distribution("x")) == pytest.approx(got, abs=1e-9)
    assert res.to_dict()["distributions"]["x"][0]["probability"] == pytest.approx(max(exact.values()), abs=1e-5)
    with pytest.raises(KeyError, match="Rao-Blackwellized holes: x"):
        res.distribution("y")


def test_no_rao_blackwellization_when_something_is_scored_after():
    lm, prog = rich_case()  # observed text and a hole after x
    raw = run(lm, prog, Importance(enumerate=True, particles=4), seed=0)
    assert raw.stats["enumerated"]["x"]["rao_blackwellized"] is False
    assert raw.stats["enumerated"]["y"]["rao_blackwellized"]  # the last hole: only its own terminator after it
    res = Result.from_inference(raw, lambda s: dict(s.values), {})
    assert set(res.extra["distributions"]) == {"y"}
    with pytest.raises(KeyError, match="Rao-Blackwellized holes: y"):
        res.distribution("x")


def test_rao_blackwellized_mcmc_posterior_is_exact():
    lm, prog = two_choice_case()
    exact = enumerate_program(lm, prog).marginal(lambda p: p.values["x"])
    raw = run(lm, prog, MCMC(enumerate=True, steps=3, chains=2, particles=1), seed=0)
    assert isinstance(raw, InferenceResult) and raw.stats["enumerated"]["x"]["rao_blackwellized"]
    got = dict(Result.from_inference(raw, lambda s: dict(s.values), {}).distribution("x"))
    for k in exact:
        assert got[k] == pytest.approx(exact[k], abs=1e-5)
    assert math.isclose(sum(got.values()), 1.0, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------------
# Pruned enumeration (untraced runs): the frontier continues token by token
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune", [0.3, 2.0])  # 2.0: nothing under the root is expanded (all token loop)
@pytest.mark.parametrize("strategy", [Importance(enumerate=True, particles=4), SMC(enumerate=True, particles=4, ess=1.0)])
@pytest.mark.parametrize("case", [rich_case, host_case])
def test_pruned_enumeration_is_properly_weighted(case, strategy, prune, monkeypatch):
    monkeypatch.setattr(enumeration, "PRUNE", prune)
    lm, prog = case()
    exact = enumerate_program(lm, prog)
    res = run(lm, prog, strategy, seed=3, groups=600)
    info = res.stats["enumerated"]
    assert all(v["prune"] == prune for v in info.values())
    assert sum(v["token_loop"] for v in info.values()) > 0  # the frontier was drawn and went on token by token
    assert max(v["frontier_mass"] for v in info.values()) > 0
    # 4 % (not 2 %): SMC at prune 2.0 draws the 2 % two-token values of rich_case through the token loop a few
    # times in 600 groups, and a sequence drawn by no group has an infinite z-score, not a biased estimate
    zs = unbiased_z_scores(res, exact.probs(), exact.z, min_mass=0.04)
    assert len(zs) >= 3 and np.all(np.abs(zs) < 4.5), zs


def test_pruning_feeds_fewer_rows():
    lm, prog = rich_case()
    full = run(lm, prog, Importance(enumerate=True, particles=4), seed=1, groups=50)
    enumeration.PRUNE = 0.3  # restored by the autouse fixture
    pruned = run(lm, prog, Importance(enumerate=True, particles=4), seed=1, groups=50)
    rows = lambda r: sum(v["lm_rows"] for v in r.stats["enumerated"].values())  # noqa: E731
    assert rows(pruned) < rows(full)
    assert sum(v["token_loop"] for v in pruned.stats["enumerated"].values()) > 0


@pytest.mark.parametrize("prune", [0.6, 2.0])
def test_pruned_rao_blackwellized_posterior_is_consistent(prune, monkeypatch):
    # a frontier draw has no table: its own value stands for it (unbiased), the others' tables are over the
    # expanded paths; with many particles the posterior is the exact one
    monkeypatch.setattr(enumeration, "PRUNE", prune)
    lm, prog = two_choice_case()
    exact = enumerate_program(lm, prog).marginal(lambda p: p.values["x"])
    assert min(exact.values()) / max(exact.values()) < 0.6  # so 0.6 leaves the less likely value to the frontier
    raw = run(lm, prog, Importance(enumerate=True, particles=3000), seed=2)
    info = raw.stats["enumerated"]["x"]
    assert info["rao_blackwellized"] and info["token_loop"] > 0
    got = dict(Result.from_inference(raw, lambda s: dict(s.values), {}).distribution("x"))
    assert math.isclose(sum(got.values()), 1.0, abs_tol=1e-9)
    for k in exact:
        assert got[k] == pytest.approx(exact[k], abs=0.04), (got, exact)


def test_traced_runs_enumerate_the_whole_trie(monkeypatch):
    # MCMC moves and particle Gibbs keep one fixed proposal per site (and may restart a chain in the hole)
    monkeypatch.setattr(enumeration, "PRUNE", 0.6)
    lm, prog = two_choice_case()
    for st in (ParticleGibbs(enumerate=True, iterations=2, particles=2), MCMC(enumerate=True, steps=2, chains=2)):
        info = run(lm, prog, st, seed=0).stats["enumerated"]["x"]
        assert info["prune"] == 0.0 and info["token_loop"] == 0


def test_tries_are_kept_on_disk_and_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(enumeration, "_TRIES", {})
    lm, prog = rich_case()
    hole = prog.holes[0]
    args = (prog.table, lm.tokenizer, hole, int(hole.start), hole.max_tokens,
            hole.max_tokens + holes.slack(prog.table))
    built = enumeration.trie_for(*args)
    (entry,) = (tmp_path / "tries").glob("*.npz")
    monkeypatch.setattr(enumeration, "_TRIES", {})  # a new process: nothing in memory
    monkeypatch.setattr(enumeration, "build_trie", lambda *a, **k: pytest.fail("built again"))
    loaded = enumeration.trie_for(*args)
    for name in enumeration.Trie._fields:
        x, y = getattr(built, name), getattr(loaded, name)
        assert (x == y) if name == "values" else (x.dtype == y.dtype and np.array_equal(x, y)), name
    entry.write_bytes(b"damaged")
    monkeypatch.setattr(enumeration, "_TRIES", {})
    monkeypatch.undo()  # the real build_trie again (and the real cache folder: re-set it)
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(enumeration, "_TRIES", {})
    again = enumeration.trie_for(*args)
    assert np.array_equal(again.path_tokens, built.path_tokens)
    assert entry.read_bytes() != b"damaged"


def test_smc_resamples_at_the_start_of_an_enumerated_hole():
    # rich_case: observed text between two enumerated holes spreads the weights; the token loop would resample
    # at the second hole's first token, an enumerated hole has none: the check runs once at its start
    lm, prog = rich_case()
    exact = enumerate_program(lm, prog)
    res = run(lm, prog, SMC(enumerate=True, particles=4, ess=1.0), seed=7, groups=600)
    assert set(res.stats["enumerated"]) == {"x", "y"}
    assert res.resampled.any(axis=0).mean() > 0.9
    assert res.genealogy is not None and len(res.genealogy.steps) > 0
    zs = unbiased_z_scores(res, exact.probs(), exact.z)
    assert len(zs) >= 3 and np.all(np.abs(zs) < 4.5), zs
