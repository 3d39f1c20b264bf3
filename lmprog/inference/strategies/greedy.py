"""``greedy()``: the argmax of the masked LM at every step, one particle. NOT properly weighted."""

from __future__ import annotations

from lmprog.inference.kernel import KernelConfig
from lmprog.inference.strategies.base import ParticleStrategy, implements

__all__ = ["Greedy"]


@implements("greedy")
class Greedy(ParticleStrategy):
    """Argmax of the masked LM at every step (one particle); NOT properly weighted."""

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        return KernelConfig(select="argmax", weighted=False, resampler=None, groups=groups, chunk=chunk)


STRATEGY = Greedy
