"""``best_of(n, score=EXPR)``: draw ``n`` samples with a base strategy (default ``sample(n)``), score each
finished one on the host, keep the best (ties share the weight). NOT properly weighted: it searches."""

from __future__ import annotations

import numpy as np

from lmprog.inference.strategies.base import OnBase, implements
from lmprog.inference.strategies.sampling import Sampling

__all__ = ["BestOf"]


@implements("best_of")
class BestOf(OnBase):
    """``n`` samples from ``base`` (default: ``sample(n)``), scored on the host by ``score(sample) -> float``;
    the best gets all the weight."""

    uses = "score"

    def default_base(self) -> Sampling:
        return Sampling(n=self.n, temperature=self.temperature, max_tokens=self.max_tokens)

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
