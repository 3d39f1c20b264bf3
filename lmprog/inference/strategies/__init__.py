"""The inference strategies (LANGUAGE.md, "Inference strategies"): one module per algorithm, one catalog.

=================  ===============================================================  ====================
strategy           what it does                                                     properly weighted
=================  ===============================================================  ====================
``sample``         locally-constrained decoding (the allowed mass is not in the      no
                   weight: the distorted distribution Outlines/LMQL sample)
``greedy``         argmax of the masked LM at each step, one particle               no
``importance``     sample as above, weight by the allowed mass (and observe/factors) yes
``smc``            importance + resampling when ESS < ess x N; ``rejuvenate=K``     yes
                   suffix MH moves after every resampling
``beam``           the ``width`` highest-scoring partial sequences (same target)     no
``best_of``        ``n`` samples from a base strategy, the best by a host ``score``  no
``vote``           weighted majority over ``key(sample)`` of a base's samples        when the base is
``mcmc``           Metropolis-Hastings over whole executions (suffix/independent)   yes (asymptotically)
``particle_gibbs`` conditional SMC keeping a reference trajectory                   yes (asymptotically)
=================  ===============================================================  ====================

:data:`lmprog.catalog.CATALOG` is the one list of strategies and their parameters: the checker (``infer``
lines), the CLI and API (``--strategy``, ``particles=``) and :func:`make_strategy` read it, and every class here
is built from its entry (:func:`~lmprog.inference.strategies.base.implements`). :data:`STRATEGIES` maps each
catalog name to the class its module exports as ``STRATEGY``. Adding a strategy is one new module and one
catalog entry.
"""

from __future__ import annotations

import importlib
from dataclasses import fields

from lmprog.catalog import CATALOG, DEFAULT_STRATEGY
from lmprog.inference.strategies.base import ParticleStrategy, Strategy
from lmprog.inference.strategies.beam import Beam
from lmprog.inference.strategies.best_of import BestOf
from lmprog.inference.strategies.greedy import Greedy
from lmprog.inference.strategies.importance import Importance
from lmprog.inference.strategies.mcmc import MCMC
from lmprog.inference.strategies.particle_gibbs import ParticleGibbs
from lmprog.inference.strategies.sampling import Sampling
from lmprog.inference.strategies.smc import SMC
from lmprog.inference.strategies.vote import Vote

__all__ = [
    "Beam", "BestOf", "DEFAULT_STRATEGY", "Greedy", "Importance", "MCMC", "ParticleGibbs", "ParticleStrategy",
    "SMC", "STRATEGIES", "Sampling", "Strategy", "Vote", "make_strategy",
]

#: The class of every catalog strategy, by name (catalog order).
STRATEGIES: dict[str, type[Strategy]] = {
    name: importlib.import_module(spec.module).STRATEGY for name, spec in CATALOG.items()
}


def make_strategy(name: str, *args, **kwargs) -> Strategy:
    """``make_strategy("smc", particles=32, ess=0.5)`` (or ``("smc", 32)``: positional arguments bind to the
    strategy's own parameters in order, as in an ``infer`` line), validated.

    Raises ``ValueError`` naming the valid strategies/arguments on a bad name or argument.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown inference strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    own = [p.name for p in cls.own_params()]
    if len(args) > len(own):
        raise ValueError(f"{name}: takes at most {len(own)} positional argument(s), got {len(args)}")
    kwargs = {**dict(zip(own, args)), **kwargs}
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise ValueError(f"{name}: unknown argument(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    strategy = cls(**kwargs)
    strategy.validate()
    return strategy
