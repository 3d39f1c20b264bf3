"""``best_of(n, score=EXPR)``: draw ``n`` samples with a base strategy (default ``sample(n)``), score each
finished one on the host, keep the best (ties share the weight). NOT properly weighted: it searches."""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

import numpy as np

from lmprog.inference.strategies.base import Strategy, implements
from lmprog.inference.strategies.sampling import Sampling

__all__ = ["BestOf"]


@implements("best_of")
class BestOf(Strategy):
    """``n`` samples from ``base`` (default: ``sample(n)``), scored on the host by ``score(sample) -> float``;
    the best gets all the weight."""

    groupable: ClassVar[bool] = False
    base: Strategy | None = field(default=None)

    def validate(self):
        super().validate()
        if self.score is None or not callable(self.score):
            raise ValueError("best_of: score must be a callable on completed samples")
        self.base_strategy().validate()

    def base_strategy(self) -> Strategy:
        if self.base is None:
            return Sampling(n=self.n, temperature=self.temperature, max_tokens=self.max_tokens)
        return self.base

    def run(self, lm, program, *, key, groups=1, chunk=32, progress=None):
        result = self.base_strategy().run(lm, program, key=key, groups=1, chunk=chunk, progress=progress)
        scores = np.array([float(self.score(s)) if s.alive else -np.inf for s in result.samples])
        best = scores == np.max(scores)
        result.extra["best_of_scores"] = scores
        result.extra["weights"] = (best / best.sum())[None, :]
        result.scores = scores[None, :]
        result.log_weights = np.where(best, 0.0, -np.inf)[None, :]
        result.log_z = None
        return result.relabel(self)


STRATEGY = BestOf
