"""``beam(width)``: beam search on the target's log density (allowed tokens only). NOT properly weighted:
it searches for high-density strings under the same target ``importance``/``smc`` sample. Reported weights
are the softmax of the final beams' scores. Groups (batch rows) are independent searches of ``width`` beams
each, in one engine call."""

from __future__ import annotations

from lmprog.inference.kernel import KernelConfig
from lmprog.inference.strategies.base import ParticleStrategy, implements

__all__ = ["Beam"]


@implements("beam")
class Beam(ParticleStrategy):
    """Keep the ``width`` highest-scoring partial sequences at every step (in each group)."""

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        return KernelConfig(select="beam", weighted=False, resampler=None, groups=groups, chunk=chunk)


STRATEGY = Beam
