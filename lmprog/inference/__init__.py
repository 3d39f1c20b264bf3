"""The inference engine: jitted SMC, importance sampling, beam search, best-of-N, voting and MCMC over LM
token states. See ``docs/inference.md``.

The lowering builds a :class:`SegmentProgram` (``Text``/``Observe``/``Hole``/``Host`` segments over one token
stream, the holes' automata stacked into one token table), picks a strategy (:func:`make_strategy`; the
catalog is :mod:`lmprog.catalog`) and calls :func:`run`, which returns an :class:`InferenceResult`; batch mode runs rows
as groups of one call (:func:`run_rows`).
"""

from lmprog.inference.batch import MAX_BATCH_PARTICLES, run_rows
from lmprog.inference.engine import Progress, run
from lmprog.inference.kernel import TRACE_COUNTS, KernelConfig
from lmprog.inference.segments import (
    Cause,
    Hole,
    Host,
    HostView,
    InferenceError,
    Observe,
    SegmentProgram,
    Text,
    hole_value,
)
from lmprog.inference.resampling import RESAMPLERS, Resampler, ess, multinomial, residual, stratified, systematic
from lmprog.inference.samples import DecodedParticle, InferenceResult, tally
from lmprog.inference.strategies import (
    STRATEGIES,
    DEFAULT_STRATEGY,
    MCMC,
    SMC,
    Beam,
    BestOf,
    Greedy,
    Importance,
    ParticleGibbs,
    Sampling,
    Strategy,
    Vote,
    make_strategy,
)

__all__ = [
    "Beam",
    "BestOf",
    "STRATEGIES",
    "Cause",
    "DEFAULT_STRATEGY",
    "DecodedParticle",
    "Greedy",
    "Hole",
    "Host",
    "HostView",
    "Importance",
    "InferenceError",
    "InferenceResult",
    "KernelConfig",
    "MAX_BATCH_PARTICLES",
    "MCMC",
    "Observe",
    "ParticleGibbs",
    "Progress",
    "RESAMPLERS",
    "Resampler",
    "SMC",
    "Sampling",
    "SegmentProgram",
    "Strategy",
    "TRACE_COUNTS",
    "Text",
    "Vote",
    "ess",
    "hole_value",
    "make_strategy",
    "multinomial",
    "residual",
    "run",
    "run_rows",
    "stratified",
    "systematic",
    "tally",
]
