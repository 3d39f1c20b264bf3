"""``vote(n, key=EXPR, weighted=true)``: a weighted majority over ``key(sample)`` of ``n`` samples from a base
strategy (default ``importance(n)``; ``weighted=false``: ``sample(n)``, self-consistency's plain majority). The
votes are the normalized importance weights when the base is properly weighted (then the tally estimates the
posterior of the key), else uniform."""

from __future__ import annotations

from lmprog.inference.samples import tally
from lmprog.inference.strategies.base import OnBase, implements
from lmprog.inference.strategies.importance import Importance
from lmprog.inference.strategies.sampling import Sampling

__all__ = ["Vote"]


@implements("vote")
class Vote(OnBase):
    """Weighted majority over ``key(sample)`` of ``n`` samples from ``base`` (default: ``importance(n)``, or
    ``sample(n)`` with ``weighted=False``: every sample one vote)."""

    uses = "key"

    @property
    def properly_weighted(self) -> bool:  # type: ignore[override]
        return self.base_strategy().properly_weighted

    def default_base(self) -> Importance | Sampling:
        opts = dict(temperature=self.temperature, max_tokens=self.max_tokens, enumerate=self.enumerate)
        return Importance(particles=self.n, **opts) if self.weighted else Sampling(n=self.n, **opts)

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
