"""Distributions for ``sample NAME ~ DIST(...)``: draws from the prior, one batched draw for all particles.

The distributions and their parameters are those of :data:`lmprog.dsl.catalog.DISTRIBUTIONS`; the draws
use NumPyro. A sample is drawn from its prior, so it is properly weighted with no weight change.
``uniform_int(lo, hi)`` includes both ends; ``choice(items, probs)`` normalizes ``probs``.
"""

from __future__ import annotations

import numpy as np

from lmprog.compiler.errors import RunError

__all__ = ["bind_params", "dist_params", "draw"]


def dist_params(name: str) -> list[str]:
    """The parameter names of distribution ``name``, in order."""
    from lmprog.dsl.catalog import DISTRIBUTIONS

    return [p.name for p in DISTRIBUTIONS[name].params]


def bind_params(params, pos, kw) -> dict:
    """``{parameter: value}`` from positional values ``pos`` (in the order of ``params``) and keywords ``kw``."""
    out = dict(zip(params, pos))
    out.update(kw)
    return out


def draw(name: str, args: list[dict], seed: int, seg_no: int, view) -> list:
    """One value per active particle from the prior (NumPyro distributions), in one batched call when all
    particles share their arguments. The key is the engine's fresh key for this host step (``view.key``: the
    same seed gives the same draws, and re-running the step, as MCMC moves do, draws anew), folded with the
    segment number; without one, the program's seed."""
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    n = len(args)
    base = getattr(view, "key", None)
    key = jax.random.fold_in(base if base is not None else jax.random.PRNGKey(seed), 7919 + seg_no)

    def col(k, dtype=jnp.float32):
        return jnp.asarray([a[k] for a in args], dtype)

    if name == "choice":
        items = [a["items"] for a in args]
        probs = []
        for a in args:
            p = a.get("probs")
            m = len(a["items"])
            probs.append(np.full(m, 1.0 / m) if p is None else np.asarray(p, np.float64) / np.sum(p))
        width = max(len(p) for p in probs)
        table = np.zeros((n, width))
        for i, p in enumerate(probs):
            table[i, : len(p)] = p
        idx = np.asarray(dist.Categorical(probs=jnp.asarray(table, jnp.float32)).sample(key))
        return [items[i][int(j)] for i, j in enumerate(idx)]
    if name == "uniform_int":
        v = dist.DiscreteUniform(col("lo", jnp.int32), col("hi", jnp.int32)).sample(key)
        return [int(x) for x in np.asarray(v)]
    if name == "bernoulli":
        return [bool(x) for x in np.asarray(dist.Bernoulli(probs=col("p")).sample(key))]
    if name == "poisson":
        return [int(x) for x in np.asarray(dist.Poisson(col("rate")).sample(key))]
    if name == "categorical":
        width = max(len(a["probs"]) for a in args)
        table = np.zeros((n, width))
        for i, a in enumerate(args):
            p = np.asarray(a["probs"], np.float64)
            table[i, : len(p)] = p / p.sum()
        return [int(x) for x in np.asarray(dist.Categorical(probs=jnp.asarray(table, jnp.float32)).sample(key))]
    if name == "normal":
        return [float(x) for x in np.asarray(dist.Normal(col("mu"), col("sigma")).sample(key))]
    if name == "beta":
        return [float(x) for x in np.asarray(dist.Beta(col("a"), col("b")).sample(key))]
    raise RunError(f"unknown distribution {name!r}")
