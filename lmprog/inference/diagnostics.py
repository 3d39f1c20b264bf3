"""Convergence diagnostics of MCMC results: acceptance per chain, split R-hat and effective sample size
(``numpyro.diagnostics``) of a function of the samples."""

from __future__ import annotations

import numpy as np

from lmprog.inference.samples import InferenceResult

__all__ = ["diagnostics"]


def diagnostics(result: InferenceResult, key=None, group: int = 0) -> dict:
    """Acceptance rate per chain, split R-hat and effective sample size (``numpyro.diagnostics``) of
    ``key(sample)`` (default: the hole values) over the chains of an MCMC result.

    Numeric values are used as they are; other values (strings, tuples) are categorical: R-hat and ESS are
    computed for the indicator of every category making up at least 5 % of the samples and the worst
    (largest R-hat, smallest ESS) is reported. ``None`` where a statistic is undefined (fewer than 4 kept steps, or a constant value); R-hat
    is ``inf`` when every chain is stuck on its own value.
    """
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin  # numpyro takes ~1 s to import

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
