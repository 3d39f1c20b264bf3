"""The inference engine: jitted SMC, importance sampling, beam search, best-of-N and voting over LM token
states. See ``docs/inference.md``.

The end-to-end lowering builds a :class:`SegmentProgram` (``Text``/``Observe``/``Hole``/``Host`` segments
over one token stream, the holes' automata stacked into one ``TokenTable``), picks a strategy
(:func:`make_strategy`) and calls :func:`run`, which returns an :class:`InferenceResult`.
"""

from lmprog.inference.engine import Progress, run
from lmprog.inference.kernel import TRACE_COUNTS, KernelConfig
from lmprog.inference.program import (
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
from lmprog.inference.result import InferenceResult, Sample
from lmprog.inference.strategies import (
    SMC,
    STRATEGIES,
    Beam,
    BestOf,
    Greedy,
    Importance,
    Sample as SampleStrategy,
    Strategy,
    Vote,
    make_strategy,
    with_options,
)

__all__ = [
    "Beam",
    "BestOf",
    "Cause",
    "Greedy",
    "Hole",
    "Host",
    "HostView",
    "Importance",
    "InferenceError",
    "InferenceResult",
    "KernelConfig",
    "Observe",
    "Progress",
    "RESAMPLERS",
    "Resampler",
    "SMC",
    "STRATEGIES",
    "Sample",
    "SampleStrategy",
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
    "stratified",
    "systematic",
    "with_options",
]
