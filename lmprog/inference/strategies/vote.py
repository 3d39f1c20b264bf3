"""``vote(n, key=EXPR)``: a weighted majority over ``key(sample)`` of ``n`` samples from a base strategy
(default ``importance(n)``). The votes are the normalized importance weights when the base is properly
weighted (then the tally estimates the posterior of the key), else uniform."""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

from lmprog.inference.samples import tally
from lmprog.inference.strategies.base import Strategy, implements
from lmprog.inference.strategies.importance import Importance

__all__ = ["Vote"]


@implements("vote")
class Vote(Strategy):
    """Weighted majority over ``key(sample)`` of ``n`` samples from ``base`` (default: ``importance(n)``)."""

    groupable: ClassVar[bool] = False
    base: Strategy | None = field(default=None)

    @property
    def properly_weighted(self) -> bool:  # type: ignore[override]
        return self.base_strategy().properly_weighted

    def validate(self):
        super().validate()
        if self.key is None or not callable(self.key):
            raise ValueError("vote: key must be a callable on completed samples")
        self.base_strategy().validate()

    def base_strategy(self) -> Strategy:
        if self.base is None:
            return Importance(particles=self.n, temperature=self.temperature, max_tokens=self.max_tokens)
        return self.base

    def run(self, lm, program, *, key, groups=1, chunk=32, progress=None):
        result = self.base_strategy().run(lm, program, key=key, groups=1, chunk=chunk, progress=progress)
        table = tally((self.key(s), s.weight) for s in result.samples if s.alive)
        result.extra["vote"] = table
        result.extra["winner"] = table[0][0] if table else None
        result.extra["key"] = self.key
        if not self.properly_weighted:
            result.log_z = None
        return result.relabel(self)


STRATEGY = Vote
