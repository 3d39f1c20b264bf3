"""Resampling: choose ancestor indices from particle weights.

Every resampler here is a small pure function with the same signature (the :class:`Resampler`
protocol)::

    resample(key, weights, num_samples) -> ancestors  # int32 [num_samples]

``weights`` are non-negative, of any scale (they need not sum to one), with at least one positive
entry. Each resampler is *unbiased*: the expected number of copies of particle ``i`` is
``num_samples * w_i / sum(w)``. They differ in variance: multinomial (i.i.d. draws) > stratified
(one uniform per stratum) >= systematic (one shared uniform); residual keeps ``floor(M w_i)``
copies deterministically and draws the remainder multinomially.

All of them are inverse-CDF lookups: with ``c = cumsum(w)`` and a query ``q`` in ``[0, total)``,
the chosen index is the first ``i`` with ``c[i] > q`` (``searchsorted(..., side="right")``), i.e.
``c[i-1] <= q < c[i]``. That interval is empty when ``w_i == 0`` (``c[i] == c[i-1]`` exactly, since
adding zero is exact in floating point), so **a zero-weight particle is never selected** — provided the
query stays strictly below the total. ``u * total`` with ``u`` in ``[0, 1)`` can round *up* to the
total, so every query is clamped to ``nextafter(total, 0)``; without the clamp the lookup would return
``n`` (out of range) and a gather would silently clamp it to the last particle, which may be dead.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "Resampler",
    "RESAMPLERS",
    "ess",
    "inverse_cdf",
    "multinomial",
    "normalized_weights",
    "residual",
    "stratified",
    "systematic",
    "get_resampler",
]


class Resampler(Protocol):
    """``(key, weights [N] >= 0, num_samples) -> ancestors [num_samples] int32``; unbiased in the counts."""

    def __call__(self, key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array: ...


def inverse_cdf(weights: jax.Array, queries: jax.Array) -> jax.Array:
    """Indices for ``queries`` in ``[0, 1)`` (fractions of the total weight), never a zero-weight index.

    ``weights`` need not be normalized; the queries are scaled by the total and clamped strictly
    below it (see the module docstring), and ``side="right"`` skips the flat (zero-weight) steps of
    the CDF.
    """
    weights = jnp.asarray(weights)
    cdf = jnp.cumsum(weights)
    total = cdf[-1]
    # The largest float strictly below the total: a query that rounds up to the total would fall off the end.
    top = jnp.nextafter(total, jnp.zeros_like(total))
    q = jnp.clip(queries.astype(cdf.dtype) * total, 0, top)
    # compare_all compiles and runs fastest for the particle counts SMC uses; binary search beyond that.
    method = "compare_all" if weights.shape[0] * q.size <= (1 << 22) else "scan"
    idx = jnp.searchsorted(cdf, q, side="right", method=method)
    # Only reachable when the total is 0 (caller error): keep the index in range rather than out of bounds.
    return jnp.minimum(idx, weights.shape[0] - 1).astype(jnp.int32)


def multinomial(key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """I.i.d. draws from the categorical distribution ``w / sum(w)``."""
    u = jax.random.uniform(key, (num_samples,), dtype=jnp.float32)
    return inverse_cdf(weights, u)


def stratified(key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """One uniform draw inside each stratum ``[j/M, (j+1)/M)``."""
    u = jax.random.uniform(key, (num_samples,), dtype=jnp.float32)
    return inverse_cdf(weights, (jnp.arange(num_samples, dtype=jnp.float32) + u) / num_samples)


def systematic(key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """One shared uniform offset: queries ``(j + u) / M``. Each particle gets ``floor`` or ``ceil`` of ``M w_i``."""
    u = jax.random.uniform(key, (), dtype=jnp.float32)
    return inverse_cdf(weights, (jnp.arange(num_samples, dtype=jnp.float32) + u) / num_samples)


def residual(key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """``floor(M w_i)`` deterministic copies of each particle, then the remaining ``R = M - sum floor(M w_i)``
    slots drawn multinomially from the residuals ``M w_i - floor(M w_i)`` (all static shapes: ``M`` draws
    are made and only the first ``R`` are used)."""
    weights = jnp.asarray(weights, jnp.float32)
    n = weights.shape[0]
    total = jnp.sum(weights)
    scaled = num_samples * (weights / total)
    copies = jnp.floor(scaled).astype(jnp.int32)
    resid = jnp.maximum(scaled - copies, 0.0)  # exactly 0 where w_i == 0
    # Rounding can leave no residual mass while slots remain (e.g. all M w_i within an ulp of integers):
    # fall back to the weights themselves, which are still zero for dead particles.
    resid = jnp.where(jnp.sum(resid) > 0, resid, weights)
    cum_copies = jnp.cumsum(copies)
    n_det = jnp.minimum(cum_copies[-1], num_samples)
    slots = jnp.arange(num_samples, dtype=jnp.int32)
    # Slot j < n_det belongs to the particle whose block of copies covers j.
    det = jnp.minimum(jnp.searchsorted(cum_copies, slots, side="right"), n - 1).astype(jnp.int32)
    rand = multinomial(key, resid, num_samples)
    rand_for_slot = rand[jnp.clip(slots - n_det, 0, num_samples - 1)]
    return jnp.where(slots < n_det, det, rand_for_slot).astype(jnp.int32)


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name: str) -> Resampler:
    try:
        return RESAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown resampling scheme {name!r}; valid: {', '.join(sorted(RESAMPLERS))}"
        ) from None


def normalized_weights(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    """``softmax`` that maps ``-inf`` to exactly 0 and an all ``-inf`` row to all zeros (never NaN)."""
    m = jnp.max(log_weights, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(log_weights - m)
    s = jnp.sum(w, axis=axis, keepdims=True)
    return jnp.where(s > 0, w / jnp.where(s > 0, s, 1.0), 0.0)


def ess(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    """Effective sample size ``(sum w)^2 / sum w^2`` from log-weights; 0 when every weight is 0."""
    lse = jax.nn.logsumexp(log_weights, axis=axis)
    lse2 = jax.nn.logsumexp(2.0 * log_weights, axis=axis)
    return jnp.where(jnp.isfinite(lse), jnp.exp(2.0 * lse - lse2), 0.0)
