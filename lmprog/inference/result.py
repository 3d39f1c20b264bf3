"""What a run returns: particles as arrays (cheap, for many particles or groups) and decoded samples
(lazy, per group).

Log-weights in a result are *absolute*: ``log_weights[g, i]`` includes the log-evidence accumulated at
resampling steps, so for properly weighted strategies ``log Z_hat[g] = logsumexp(log_weights[g]) - log N``
and the weighted particles ``{(x_i, exp(log_weights[g, i]) / N)}`` are an unbiased estimate of the
unnormalized target measure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np

from lmprog.inference.program import CAUSE_TEXT, Cause, Hole, hole_value

__all__ = ["InferenceResult", "Sample"]


@dataclass
class Sample:
    """One particle, decoded.

    Attributes:
        index: particle index within its group.
        tokens: every token id after the shared prompt prefix.
        text: the full text (prompt included, special tokens dropped).
        values: ``{hole name: value}``.
        log_weight: absolute log-weight (see the module docstring); ``-inf`` for a dead particle.
        weight: normalized weight within the group.
        score: log target density of the sequence (LM log-probs of generated and observed tokens plus factors);
            for ``best_of`` the host score.
        hole_logprobs: ``{hole name: LM log-probability of its tokens}`` (tempered).
        cause: why the particle died, or ``None``.
        data: host-side per-particle data (``let`` values written by host segments).
    """

    index: int
    tokens: list[int]
    text: str
    values: dict[str, str]
    log_weight: float
    weight: float
    score: float
    hole_logprobs: dict[str, float]
    cause: str | None = None
    data: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.cause is None


def _logsumexp(x: np.ndarray, axis=-1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


def _normalize(log_w: np.ndarray) -> np.ndarray:
    lse = _logsumexp(log_w)
    with np.errstate(invalid="ignore"):
        w = np.exp(np.asarray(log_w, np.float64) - lse[..., None])
    return np.where(np.isfinite(lse)[..., None], w, 0.0)


@dataclass
class InferenceResult:
    """The outcome of :func:`lmprog.inference.engine.run`.

    Array fields have leading axes ``[G, N]`` (groups, particles per group; ``G == 1`` unless the run asked
    for independent groups). ``samples``/``posterior``/``log_evidence`` describe group 0 unless a group is
    given.

    Attributes:
        strategy: the strategy's name; ``properly_weighted`` whether weights target the posterior.
        options: the strategy's options (temperature, particles, ...).
        tokens ``[G, N, L]``, lengths ``[G, N]``: tokens after the shared prefix.
        spans ``[G, N, H, 2]``: each hole's ``[start, end)`` in ``tokens``.
        log_weights ``[G, N]`` (absolute), scores ``[G, N]``, causes ``[G, N]`` (``Cause``), hole_logprobs ``[G, N, H]``.
        log_z ``[G]``: log-evidence estimates (``None`` when not properly weighted).
        ess ``[steps, G]`` and resampled ``[steps, G]``: ESS at every decode step / boundary check (before
        resampling) and whether that step resampled.
        stats: ``tokens`` (processed by live particles, forced + generated), ``forward_passes`` (batched LM
            calls), ``wall_s``, ``compile_s`` (calls that compiled, first execution included), ``particles``.
        extra: strategy-specific tables (``vote``: the tally; ``best_of``: scores).
    """

    strategy: str
    properly_weighted: bool
    options: dict
    holes: list[Hole]
    tokenizer: Any
    prefix_text: str
    prefix_tokens: list[int]
    tokens: np.ndarray
    lengths: np.ndarray
    spans: np.ndarray
    log_weights: np.ndarray
    scores: np.ndarray
    causes: np.ndarray
    hole_logprobs: np.ndarray
    log_z: np.ndarray | None
    ess: np.ndarray
    resampled: np.ndarray
    stats: dict
    data: list[list[dict]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    _samples: dict = field(default_factory=dict, repr=False)

    # ---- arrays ----------------------------------------------------------------------------------

    @property
    def groups(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def num_particles(self) -> int:
        return int(self.log_weights.shape[1])

    @property
    def weights(self) -> np.ndarray:
        """Normalized weights ``[G, N]`` (zeros for a group whose particles all died)."""
        if "weights" in self.extra:
            return self.extra["weights"]
        if "_weights" not in self._samples:
            self._samples["_weights"] = _normalize(self.log_weights)
        return self._samples["_weights"]

    @property
    def log_evidence(self) -> float | None:
        """``log Z_hat`` of group 0 (``None`` when not properly weighted)."""
        return None if self.log_z is None else float(self.log_z[0])

    @property
    def alive(self) -> np.ndarray:
        return self.causes == 0

    def hole_tokens(self, name: str, group: int = 0, index: int = 0) -> list[int]:
        h = self._hole_index(name)
        a, b = self.spans[group, index, h]
        return [int(t) for t in self.tokens[group, index, a:b]]

    def sequences(self, group: int | None = None) -> list[tuple[int, ...]]:
        """Token tuples (after the prefix) per particle, flattened over groups unless ``group`` is given."""
        gs = range(self.groups) if group is None else [group]
        return [
            tuple(int(t) for t in self.tokens[g, i, : self.lengths[g, i]]) for g in gs for i in range(self.num_particles)
        ]

    # ---- decoded samples -------------------------------------------------------------------------

    def samples_of(self, group: int = 0) -> list[Sample]:
        """Group ``group``'s particles, decoded (cached)."""
        if group not in self._samples:
            self._samples[group] = [self._sample(group, i) for i in range(self.num_particles)]
        return self._samples[group]

    @property
    def samples(self) -> list[Sample]:
        """Group 0's particles, decoded (in particle order)."""
        return self.samples_of(0)

    def _sample(self, g: int, i: int) -> Sample:
        toks = [int(t) for t in self.tokens[g, i, : self.lengths[g, i]]]
        values, logps = {}, {}
        alive = self.causes[g, i] == 0
        for h, hole in enumerate(self.holes):
            a, b = (int(x) for x in self.spans[g, i, h])
            if b > a:  # every hole that ran produced at least its ending token; skipped holes are empty
                values[hole.name] = hole_value(self.tokenizer, hole, toks[a:b])
                logps[hole.name] = float(self.hole_logprobs[g, i, h])
        cause = None if alive else CAUSE_TEXT.get(Cause(int(self.causes[g, i])), Cause(int(self.causes[g, i])).name.lower())
        data = self.data[g][i] if self.data and g < len(self.data) and i < len(self.data[g]) else {}
        return Sample(
            index=i,
            tokens=toks,
            text=self.prefix_text + self.tokenizer.decode(toks, skip_special=True),
            values=values,
            log_weight=float(self.log_weights[g, i]),
            weight=float(self.weights[g, i]),
            score=float(self.scores[g, i]),
            hole_logprobs=logps,
            cause=cause,
            data=dict(data),
        )

    def posterior(self, key: Callable[[Sample], Hashable] | None = None, group: int = 0) -> list[tuple[Any, float]]:
        """The weighted distribution over ``key(sample)`` (default: the tuple of hole values), sorted by
        probability (descending); dead particles excluded; probabilities sum to 1."""
        key = key or self.extra.get("key") or (lambda s: tuple(sorted(s.values.items())))
        tally: dict = defaultdict(float)
        for s in self.samples_of(group):
            if s.alive and s.weight > 0:
                tally[key(s)] += s.weight
        total = sum(tally.values())
        items = [(k, v / total) for k, v in tally.items()] if total > 0 else []
        return sorted(items, key=lambda kv: (-kv[1], repr(kv[0])))

    def best(self, group: int = 0) -> Sample:
        """The particle with the largest weight (ties: the highest score, then the lowest index)."""
        ss = self.samples_of(group)
        return max(ss, key=lambda s: (s.weight, s.score, -s.index))

    def summary(self) -> dict:
        """A JSON-friendly dict in the shape of LANGUAGE.md's ``--json`` output (group 0)."""
        samples = [
            {"values": s.values, "text": s.text, "log_weight": _num(s.log_weight), "weight": s.weight}
            for s in self.samples
            if s.alive
        ]
        post = [{"value": dict(k) if isinstance(k, tuple) else k, "probability": p} for k, p in self.posterior()]
        ess = [float(x) for x in self.ess[:, 0] if np.isfinite(x)] if self.ess.size else []
        return {
            "strategy": self.strategy,
            "properly_weighted": self.properly_weighted,
            "samples": samples,
            "posterior": post,
            "log_evidence": self.log_evidence if self.properly_weighted else None,
            "ess": ess,
            "stats": dict(self.stats),
        }

    def _hole_index(self, name: str) -> int:
        for h, hole in enumerate(self.holes):
            if hole.name == name:
                return h
        raise KeyError(f"no hole named {name!r}")


def _num(x: float):
    return x if math.isfinite(x) else None
