"""The standard error of log Z (lmprog/inference/evidence.py): its formula on known cases, and its calibration
by replicates against the exact evidence of a toy program (enumeration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _inference_cases import rich_case
from lmprog.inference import SMC, Importance, run
from lmprog.inference.evidence import log_z_standard_error
from lmprog.inference.exact import enumerate_program


def test_without_resampling_it_is_the_importance_sampling_variance():
    rng = np.random.default_rng(0)
    lw = rng.normal(size=(3, 50))
    se = log_z_standard_error(lw, np.tile(np.arange(50), (3, 1)), np.zeros(3))
    w = np.exp(lw - lw.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(se ** 2, (50 * (w ** 2).sum(axis=1) - 1) / 49)


def test_one_ancestor_no_particle_or_one_particle():
    lw = np.zeros((1, 8))
    assert log_z_standard_error(lw, np.zeros((1, 8), int), np.array([3]))[0] == pytest.approx(1.0)
    assert np.isnan(log_z_standard_error(np.full((1, 8), -np.inf), np.arange(8)[None], np.zeros(1)))[0]
    assert np.isnan(log_z_standard_error(np.zeros((1, 1)), np.zeros((1, 1), int), np.zeros(1)))[0]


def test_the_ancestry_after_resampling_steps():
    """Five ancestors with two children each: 1 - (N/(N-1))^(m+1) (1 - sum_k S_k^2) with S_k = 1/5; after three
    resampling steps the estimate is negative (so much diversity left means little variance) and clips at 0."""
    lw = np.zeros((1, 10))
    eve = np.arange(10)[None] // 2
    one, three = (log_z_standard_error(lw, eve, np.array([m]))[0] for m in (1, 3))
    assert one ** 2 == pytest.approx(1 - (10 / 9) ** 2 * 0.8)
    assert three == 0.0


@pytest.fixture(scope="module")
def rich():
    lm, prog = rich_case()
    return lm, prog, enumerate_program(lm, prog)


@pytest.mark.parametrize("strategy, low, high", [
    (Importance(particles=32), 0.8, 1.25),
    (SMC(particles=32, ess=0.5, resample="multinomial"), 0.8, 1.25),
    (SMC(particles=32, ess=1.0, resample="multinomial"), 0.8, 1.25),
    # not covered by the estimator's theory: measured 0.73 (it underestimates); docs/inference.md says so
    (SMC(particles=32, ess=0.5, resample="systematic"), 0.55, 1.25),
], ids=["importance", "smc-0.5", "smc-every-step", "smc-systematic"])
def test_the_variance_estimate_is_calibrated_by_replicates(rich, strategy, low, high):
    """2000 independent runs (groups) against the exact evidence: the mean estimated variance of Z^
    (``Z^2 SE^2``, SE being the relative error) over the mean squared error of Z^. Ignoring the resampling steps
    (the ``(N/(N-1))^(m+1)`` factor) or the ancestry would put the every-step case far outside."""
    lm, prog, exact = rich
    r = run(lm, prog, strategy, seed=7, groups=2000)
    assert r.log_z_se is not None and np.all(np.isfinite(r.log_z_se))
    z_hat = np.exp(np.asarray(r.log_z, np.float64))
    ratio = np.mean(z_hat ** 2 * r.log_z_se ** 2) / np.mean((z_hat - exact.z) ** 2)
    assert low < ratio < high, ratio


def test_the_log_z_interval_covers_the_exact_value(rich):
    """Importance sampling, 32 particles: log Z^ +- 1.96 SE holds the exact log Z about 95 % of the time."""
    lm, prog, exact = rich
    r = run(lm, prog, Importance(particles=32), seed=5, groups=800)
    err = np.asarray(r.log_z, np.float64) - math.log(exact.z)
    coverage = np.mean(np.abs(err) <= 1.96 * r.log_z_se)
    assert 0.9 < coverage < 0.98, coverage


def test_results_and_json_carry_it(rich):
    from lmprog.result import Result

    lm, prog, _ = rich
    raw = run(lm, prog, SMC(particles=16, ess=0.5), seed=1)
    res = Result.from_inference(raw, lambda s: dict(s.values), {})
    assert res.log_evidence_se == pytest.approx(float(raw.log_z_se[0]))
    assert '"log_evidence_se": ' in res.to_json()
