"""``importance(particles)``: importance sampling with the locally-constrained proposal.

The proposal draws each token from ``q(v) = p(v) 1[v in A] / p(A)``; the weight multiplies the allowed mass
``p(A)`` at every step (and observed-text probabilities, factors), so ``w(x) = gamma(x) / q(x)`` and the
weighted particles target ``p(x | constraints)``; ``mean(w)`` is an unbiased estimate of ``Z``.
"""

from __future__ import annotations

from typing import ClassVar

from lmprog.inference.kernel import KernelConfig
from lmprog.inference.strategies.base import ParticleStrategy, implements

__all__ = ["Importance"]


@implements("importance")
class Importance(ParticleStrategy):
    """Importance sampling with the locally-constrained proposal; weight = product of allowed masses."""

    waveable: ClassVar[bool] = True

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        return KernelConfig(select="sample", weighted=True, resampler=None, groups=groups, chunk=chunk)


STRATEGY = Importance
