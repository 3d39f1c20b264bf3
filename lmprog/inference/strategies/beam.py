"""``beam(width)``: beam search on the target's log density (allowed tokens only). NOT properly weighted:
it searches for high-density strings under the same target ``importance``/``smc`` sample. Reported weights
are the softmax of the final beams' scores."""

from __future__ import annotations

from typing import ClassVar

from lmprog.inference.kernel import KernelConfig
from lmprog.inference.strategies.base import ParticleStrategy, implements

__all__ = ["Beam"]


@implements("beam")
class Beam(ParticleStrategy):
    """Keep the ``width`` highest-scoring partial sequences at every step."""

    groupable: ClassVar[bool] = False

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        if groups != 1:
            raise ValueError("beam search runs a single group")
        return KernelConfig(select="beam", weighted=False, resampler=None, groups=1, chunk=chunk)


STRATEGY = Beam
