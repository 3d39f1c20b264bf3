"""Resamplers: unbiased counts, their variance guarantees, and zero-weight particles never chosen."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmprog.inference.resampling import RESAMPLERS, ess, get_resampler, inverse_cdf, normalized_weights

N = 16
SCHEMES = sorted(RESAMPLERS)


@functools.cache
def _batched(name: str, m: int):
    """``(keys [K], weights [N]) -> ancestors [K, m]``, jitted once per scheme."""
    fn = RESAMPLERS[name]
    return jax.jit(jax.vmap(lambda k, w: fn(k, w, m), in_axes=(0, None)))


def _counts(anc: np.ndarray, n: int) -> np.ndarray:
    return np.stack([np.bincount(a, minlength=n) for a in np.asarray(anc)])


WEIGHTS = np.array([0.0, 0.31, 0.0, 0.05, 0.2, 1e-3, 0.0, 0.139, 0.1, 0.0, 0.05, 0.05, 0.0, 0.1, 0.0, 0.0], np.float32)


@pytest.mark.parametrize("name", SCHEMES)
def test_counts_are_unbiased(name):
    """E[copies of i] = M w_i: mean over 4000 keys within 5 standard errors (failure rate ~ 6e-7 per particle)."""
    k = 4000
    keys = jax.random.split(jax.random.key(123), k)
    counts = _counts(_batched(name, N)(keys, jnp.asarray(WEIGHTS)), N)
    expected = N * WEIGHTS / WEIGHTS.sum()
    se = counts.std(axis=0, ddof=1) / np.sqrt(k)
    assert np.all(np.abs(counts.mean(axis=0) - expected) <= 5 * se + 1e-6), (counts.mean(axis=0), expected)
    assert counts[:, WEIGHTS == 0].sum() == 0


@pytest.mark.parametrize("name", ["systematic", "stratified", "residual"])
def test_low_variance_guarantees(name):
    keys = jax.random.split(jax.random.key(7), 500)
    counts = _counts(_batched(name, N)(keys, jnp.asarray(WEIGHTS)), N)
    mw = N * WEIGHTS / WEIGHTS.sum()
    if name == "systematic":  # every particle gets floor or ceil of M w_i
        assert np.all((counts >= np.floor(mw) - 1e-6) & (counts <= np.ceil(mw) + 1e-6))
    elif name == "residual":  # the deterministic part is never missing
        assert np.all(counts >= np.floor(mw) - 1e-6)
    else:  # stratified: within 2 of M w_i (each stratum holds one draw)
        assert np.all(np.abs(counts - mw) < 2)
    assert np.all(counts.sum(axis=1) == N)


@settings(max_examples=60, deadline=None)
@given(
    w=st.lists(
        st.one_of(st.just(0.0), st.floats(1e-30, 1.0), st.floats(1e3, 1e30)), min_size=N, max_size=N
    ).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(SCHEMES),
)
def test_zero_weight_particles_are_never_selected(w, seed, name):
    w = np.asarray(w, np.float32)
    if not np.isfinite(w.sum()):
        w = w / w.max()
    anc = np.asarray(_batched(name, N)(jax.random.split(jax.random.key(seed), 4), jnp.asarray(w)))
    assert anc.min() >= 0 and anc.max() < N
    assert np.all(w[anc] > 0), (w, anc)


def test_inverse_cdf_clamps_queries_below_the_total():
    # Trailing zero weights: a query that rounds up to the total must not fall on them (or off the end).
    w = jnp.asarray([0.3, 0.0, 0.7, 0.0, 0.0], jnp.float32)
    q = jnp.asarray([0.0, 0.3, 0.5, 1.0 - 2**-24, float(np.nextafter(np.float32(1), np.float32(0))), 1.0], jnp.float32)
    idx = np.asarray(inverse_cdf(w, q))
    assert list(idx) == [0, 2, 2, 2, 2, 2]
    # Leading zeros and a query of exactly 0 skip the zero-weight particles.
    assert int(inverse_cdf(jnp.asarray([0.0, 0.0, 1.0, 0.0]), jnp.asarray([0.0]))[0]) == 2
    # Unnormalized weights are fine.
    assert list(np.asarray(inverse_cdf(jnp.asarray([0.0, 5.0, 0.0, 15.0]), jnp.asarray([0.1, 0.3, 0.9])))) == [1, 3, 3]


@pytest.mark.parametrize("name", SCHEMES)
def test_degenerate_weights(name):
    fn = get_resampler(name)
    anc = np.asarray(jax.jit(lambda k, w: fn(k, w, 8))(jax.random.key(0), jnp.asarray([0.0, 0.0, 2.5, 0.0])))
    assert np.all(anc == 2)


def test_unknown_scheme_names_the_valid_ones():
    with pytest.raises(ValueError, match="multinomial, residual, stratified, systematic"):
        get_resampler("bogus")


def test_ess_and_normalized_weights_edge_cases():
    assert float(ess(jnp.zeros(8))) == pytest.approx(8.0)
    assert float(ess(jnp.asarray([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(1.0)
    dead = jnp.full((4,), -jnp.inf)
    assert float(ess(dead)) == 0.0
    assert np.all(np.asarray(normalized_weights(dead)) == 0.0)
    w = np.asarray(normalized_weights(jnp.asarray([-1000.0, -1000.0, -jnp.inf])))
    assert np.allclose(w, [0.5, 0.5, 0.0]) and not np.isnan(w).any()
