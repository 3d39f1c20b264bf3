"""``sample(n)``: locally-constrained decoding, the baseline constrained-decoding tools implement.

Each token is drawn from the LM restricted to the allowed tokens and renormalized,
``q(v) = p(v) 1[v in A] / p(A)``; the allowed mass ``p(A)`` is *not* put in the weight, so the draws follow the
distorted distribution ``prod_t q(x_t)`` rather than the target ``p(x | constraints)``. NOT properly weighted.
"""

from __future__ import annotations

from typing import ClassVar

from lmprog.inference.kernel import KernelConfig
from lmprog.inference.strategies.base import ParticleStrategy, implements

__all__ = ["Sampling"]


@implements("sample")
class Sampling(ParticleStrategy):
    """Locally-constrained decoding of ``n`` independent sequences (a baseline): NOT properly weighted."""

    waveable: ClassVar[bool] = True

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        return KernelConfig(select="sample", weighted=False, resampler=None, groups=groups, chunk=chunk)


STRATEGY = Sampling
