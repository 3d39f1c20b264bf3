"""Exactness of the inference engine against enumeration on toy LMs.

Statistical tests and their failure rates (for a random seed; the seeds here are fixed, so the suite is
deterministic):

* posterior: Pearson chi-square goodness of fit at ``ALPHA = 1e-3`` of ``G`` i.i.d. draws, one per
  independent group of ``N`` weighted particles (sampling-importance-resampling). With ``N = 64`` the
  O(1/N) deviation of the SIR distribution from the posterior is far below what ``G = 1000`` draws resolve.
* evidence: the mean of ``Z_hat = exp(log Z_hat)`` over the ``G`` groups against the exact ``Z``, within
  4 standard errors (normal approximation: ~6e-5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _inference_cases import (
    ALPHA,
    A,
    B,
    BOS,
    NL,
    bias_case,
    chi_square_pvalue,
    host_case,
    rich_case,
    sir_draws,
    weighted_tv,
    z_score_of_mean,
)
from lmprog.inference import SMC, Beam, BestOf, Greedy, Importance, Sampling, Vote, run
from lmprog.inference.exact import enumerate_program

G, N = 1000, 64
SCHEMES = ["multinomial", "stratified", "systematic", "residual"]


@pytest.fixture(scope="module")
def rich():
    lm, prog = rich_case()
    return lm, prog, enumerate_program(lm, prog)


@pytest.fixture(scope="module")
def bias():
    lm, prog = bias_case()
    return lm, prog, enumerate_program(lm, prog)


def check_posterior_and_evidence(result, exact, seed=0):
    assert result.properly_weighted and result.log_z is not None
    assert not np.isnan(result.log_weights).any()
    p = chi_square_pvalue(sir_draws(result, seed), exact.probs())
    assert p > ALPHA, f"chi-square p-value {p:.2e} <= {ALPHA}"
    z = z_score_of_mean(np.exp(result.log_z), exact.z)
    assert abs(z) < 4, f"mean Z_hat is {z:.1f} standard errors from the exact Z"


@pytest.mark.parametrize(
    "strategy",
    [Importance(particles=N)] + [SMC(particles=N, ess=0.5, resample=s) for s in SCHEMES],
    ids=["importance"] + [f"smc-{s}" for s in SCHEMES],
)
def test_posterior_evidence_and_tv(rich, strategy):
    lm, prog, exact = rich
    r = run(lm, prog, strategy, seed=11, groups=G)
    check_posterior_and_evidence(r, exact, seed=1)
    if isinstance(strategy, SMC):  # ESS=0.5 resamples on some steps and not others: log Z must be right either way
        frac = r.resampled.mean()
        assert 0.05 < frac < 0.95, frac
    else:
        assert not r.resampled.any()
    # TV to the posterior shrinks as particles grow (64 -> 256 -> 1024 -> 4096 pooled particles; ~1/sqrt(N)).
    tv = [weighted_tv(r, exact.probs(), pool).mean() for pool in (1, 4, 16, 64)]
    assert tv[0] > tv[1] > tv[2] > tv[3], tv
    assert tv[3] < tv[0] / 4, tv


def test_evidence_unbiased_with_few_particles_resampling_every_step(rich):
    """N = 4 and resampling at every step: the log Z bookkeeping across resampling steps is what is tested."""
    lm, prog, exact = rich
    r = run(lm, prog, SMC(particles=4, ess=1.0, resample="multinomial"), seed=2, groups=6000)
    assert r.resampled[0].all()  # (a group stops resampling once all its particles finished the hole)
    z = z_score_of_mean(np.exp(r.log_z), exact.z)
    assert abs(z) < 4, z


def test_local_sampling_is_biased_where_weighted_strategies_are_not(bias):
    """After ``a`` the LM rarely produces the required ``\\n``: the posterior puts ~2 % on ``a``; masking the
    LM locally (``sample``) still picks ``a`` half the time."""
    lm, prog, exact = bias
    probs = exact.probs()
    assert probs[(A, NL)] == pytest.approx(0.01 / 0.46, rel=1e-4)
    local = run(lm, prog, Sampling(n=2000), seed=4)
    assert not local.properly_weighted and local.log_evidence is None
    draws = local.sequences()
    assert chi_square_pvalue(draws, probs) < 1e-12
    assert abs(np.mean([d[0] == A for d in draws]) - 0.5) < 0.05
    for strategy in (Importance(particles=N), SMC(particles=N)):
        r = run(lm, prog, strategy, seed=5, groups=G)
        check_posterior_and_evidence(r, exact, seed=2)


def test_temperature_targets_the_tempered_model(bias):
    lm, prog, _ = bias
    exact = enumerate_program(lm, prog, temperature=0.5)
    r = run(lm, prog, Importance(particles=N, temperature=0.5), seed=6, groups=G)
    check_posterior_and_evidence(r, exact, seed=3)


def test_host_factors_rendered_text_and_compiled_counters():
    """Holes compiled by the constraint compiler (len bound, fixed length), a host condition and factor with
    per-particle data, and text rendered per particle from it."""
    lm, prog = host_case()
    exact = enumerate_program(lm, prog)
    r = run(lm, prog, SMC(particles=N, resample="stratified"), seed=8, groups=300)
    check_posterior_and_evidence(r, exact, seed=4)
    s = r.samples[int(np.argmax(r.weights[0]))]
    assert s.values["x"] != "b" and len(s.values["x"]) <= 2 and "\n" not in s.values["x"]
    assert s.data["first"] == s.values["x"][:1]


def test_beam_finds_the_exact_best_completion(rich, bias):
    lm, prog, exact = rich
    r = run(lm, prog, Beam(width=1024), seed=0)  # 585 complete sequences: the beam covers every alternative
    best = r.best()
    assert tuple(best.tokens) == exact.best().tokens
    assert best.score == pytest.approx(exact.best().log_prob, abs=1e-4)
    assert not r.properly_weighted and r.log_evidence is None
    # Where greedy decoding is fooled, a beam that covers the alternatives is not.
    lm, prog, exact = bias
    greedy = run(lm, prog, Greedy(), seed=0)
    assert greedy.samples[0].tokens == [A, NL]
    assert tuple(run(lm, prog, Beam(width=2), seed=0).best().tokens) == exact.best().tokens == (B, NL)


def test_vote_converges_to_the_exact_weighted_majority(rich):
    lm, prog, exact = rich
    key = lambda s: s.values["x"][-1:]  # noqa: E731 - the last letter of x
    marg = exact.marginal(lambda p: p.values["x"][-1:])
    r = run(lm, prog, Vote(n=4096, key=key), seed=9)
    assert r.strategy == "vote" and r.properly_weighted and r.log_evidence is not None
    table = dict(r.extra["vote"])
    assert r.extra["winner"] == max(marg, key=marg.get)
    assert all(abs(table.get(k, 0.0) - p) < 0.04 for k, p in marg.items()), (table, marg)
    assert dict(r.posterior()) == pytest.approx(table)


def test_best_of_keeps_the_best_scored_sample(bias):
    lm, prog, _ = bias
    score = lambda s: s.hole_logprobs["x"]  # noqa: E731 - the most likely x under the LM
    r = run(lm, prog, BestOf(n=2000, score=score), seed=10)  # same kernel shapes as the `sample` run above
    assert r.strategy == "best_of" and not r.properly_weighted and r.log_evidence is None
    alive = [s for s in r.samples if s.alive]
    scores = [score(s) for s in alive]
    best = r.best()
    assert score(best) == max(scores) and best.weight > 0
    assert r.weights.sum() == pytest.approx(1.0)
    assert all(s.weight == 0 for s in r.samples if not s.alive or score(s) < max(scores))


def test_prefix_observe_and_exact_z(rich):
    """Observed text inside the shared prefix is scored once and counts in Z."""
    from lmprog.inference import Observe, SegmentProgram, Text

    lm, prog, _ = rich
    segs = list(prog.segments)
    prog2 = SegmentProgram([Text((BOS,)), Observe((A, B))] + segs[1:], prog.table)
    exact = enumerate_program(lm, prog2)
    prefix = float(lm.host_logits([BOS])[A] - np.logaddexp.reduce(lm.host_logits([BOS])))
    assert exact.log_z < prefix < 0
    r = run(lm, prog2, SMC(particles=N), seed=12, groups=G)  # same shapes as the rich-case SMC runs: no compile
    assert r.stats["prefix_logprob"] < 0 and math.isfinite(r.log_evidence)
    z = z_score_of_mean(np.exp(r.log_z), exact.z)
    assert abs(z) < 4
