"""The standard error of an SMC run's log-evidence estimate, from the run itself.

For ``N`` particles with final normalized weights ``W_i`` whose first-generation ancestors ("Eve indices",
``Particles.eve``) are ``E_i``, after ``m`` resampling steps, the estimator of Chan & Lai (2013) in the form of
Lee & Whiteley (2018, "Variance estimation in the particle filter", eq. for ``V_n^N(1)``) gives the relative
variance of the unbiased evidence estimate ``Z^``::

    Var(Z^) / Z^2  ~=  1 - (N / (N - 1))^(m + 1) * (1 - sum_k S_k^2),     S_k = sum_{i : E_i = k} W_i

(it is consistent as ``N`` grows; the same with adaptive resampling, ``m`` counting the steps that resampled).
Without resampling (importance sampling, ``E_i = i``) it is ``(N sum_i W_i^2 - 1) / (N - 1)``, the usual
estimate of ``Var(w) / (N E[w]^2)``. The standard error of ``log Z^`` is its square root (delta method),
clipped at 0 below. When every particle descends from one ancestor it is 1: the run cannot tell its own error,
and says so with a large one.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["log_z_standard_error"]


def log_z_standard_error(log_weights: np.ndarray, eve: np.ndarray, resamplings: np.ndarray) -> np.ndarray:
    """``[G]`` standard errors of ``log Z^`` per group from ``log_weights [G, N]`` (absolute or not: only their
    normalization is used), ``eve [G, N]`` (first-generation ancestors, any integer labels) and
    ``resamplings [G]`` (steps that resampled). NaN for a group with one particle or no live particle."""
    lw = np.asarray(log_weights, np.float64)
    g, n = lw.shape
    out = np.full((g,), np.nan)
    if n < 2:
        return out
    for k in range(g):
        row = lw[k]
        top = np.max(row)
        if not np.isfinite(top):
            continue
        w = np.exp(row - top)
        w = w / w.sum()
        _, inverse = np.unique(np.asarray(eve[k]), return_inverse=True)
        mass = np.bincount(inverse.reshape(-1), weights=w)
        factor = math.exp((int(resamplings[k]) + 1) * math.log(n / (n - 1)))
        rel_var = 1.0 - factor * (1.0 - float(np.sum(mass ** 2)))
        out[k] = math.sqrt(max(rel_var, 0.0))
    return out
