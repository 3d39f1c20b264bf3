"""What a run returns: particles as arrays (cheap, for many particles or groups) and decoded samples
(lazy, per group).

Log-weights in a result are *absolute*: ``log_weights[g, i]`` includes the log-evidence accumulated at
resampling steps, so for properly weighted strategies ``log Z_hat[g] = logsumexp(log_weights[g]) - log N``
and the weighted particles ``{(x_i, exp(log_weights[g, i]) / N)}`` are an unbiased estimate of the
unnormalized target measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterable, NamedTuple

import numpy as np

from lmprog.inference.segments import CAUSE_TEXT, Cause, Hole, hole_value

__all__ = ["DecodedParticle", "Genealogy", "InferenceResult", "logsumexp", "normalize", "tally"]


@dataclass
class DecodedParticle:
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


def logsumexp(x: np.ndarray, axis=-1) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis`` in float64; ``-inf`` for an all ``-inf`` slice (never NaN)."""
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


def normalize(log_w: np.ndarray) -> np.ndarray:
    """``exp(log_w) / sum(exp(log_w))`` along the last axis; zeros where every weight is 0."""
    lse = logsumexp(log_w)
    with np.errstate(invalid="ignore"):
        w = np.exp(np.asarray(log_w, np.float64) - lse[..., None])
    return np.where(np.isfinite(lse)[..., None], w, 0.0)


class Genealogy(NamedTuple):
    """Who descends from whom: the resampling steps of a run (the last ones kept: ``dropped`` counts the earlier
    ones; see ``engine.GENEALOGY_STEPS``), with the particles' weights and lengths just before each.

    Generation ``r`` (``r < R``) is the population just before resampling step ``r``, generation ``R`` the final
    particles. Particle ``c`` of generation ``r + 1`` descends from particle ``ancestors[r, g, c]`` of
    generation ``r`` (indices within group ``g``; the identity in a group that did not resample at that step).
    ``log_weights[r, g, i]``: particle ``i``'s normalized log-weight in generation ``r``, ``w_i / sum_j w_j``
    with ``w`` the weight since the previous resampling (``-inf``: dead, never an ancestor); the final
    generation's are ``InferenceResult.log_weights``. ``lengths[r, g, i]``: its tokens after the shared prefix.

    Attributes:
        steps ``[R]``: the decode step of each (its row in ``InferenceResult.ess``).
        segments ``[R]``: the program segment (a hole) it happened in.
        ancestors ``[R, G, N]`` int32, log_weights ``[R, G, N]`` float64, lengths ``[R, G, N]`` int32.
        resampled ``[R, G]``: which groups resampled at that step.
        dropped: earlier resampling steps not kept.
    """

    steps: np.ndarray
    segments: np.ndarray
    ancestors: np.ndarray
    log_weights: np.ndarray
    lengths: np.ndarray
    resampled: np.ndarray
    dropped: int = 0

    @classmethod
    def of(cls, records: list, groups: int, n: int, dropped: int = 0) -> "Genealogy":
        """From the engine's records ``(step, segment, ancestors [P], log-weights [P], lengths [P], resampled
        [G])`` (global particle indices, raw log-weights) of a run of ``groups`` groups of ``n`` particles."""
        r = len(records)
        anc = np.array([a for _, _, a, _, _, _ in records], np.int32).reshape(r, groups, n)
        anc = anc - (np.arange(groups, dtype=np.int32) * n)[None, :, None]  # group-local
        lw = np.array([w for _, _, _, w, _, _ in records], np.float64).reshape(r, groups, n)
        lse = logsumexp(lw)[..., None] if r else np.zeros((0, groups, 1))
        with np.errstate(invalid="ignore"):
            lw = np.where(np.isfinite(lse), lw - lse, -np.inf)
        return cls(
            steps=np.array([t for t, *_ in records], np.int64),
            segments=np.array([j for _, j, *_ in records], np.int64),
            ancestors=anc,
            log_weights=lw,
            lengths=np.array([x for *_, x, _ in records], np.int32).reshape(r, groups, n),
            resampled=np.array([d for *_, d in records], bool).reshape(r, groups),
            dropped=int(dropped),
        )

    def group(self, g: int) -> "Genealogy":
        """Group ``g`` alone: the steps where it resampled."""
        keep = self.resampled[:, g]
        sl = (keep, slice(g, g + 1))
        return Genealogy(self.steps[keep], self.segments[keep], self.ancestors[sl], self.log_weights[sl],
                         self.lengths[sl], self.resampled[sl], self.dropped)

    def lineage(self, g: int = 0) -> np.ndarray:
        """``[R + 1, N]``: the ancestor in every generation of each final particle of group ``g`` (row ``R``:
        the particle itself)."""
        r, n = self.ancestors.shape[0], self.ancestors.shape[2]
        out = np.empty((r + 1, n), np.int64)
        out[r] = np.arange(n)
        for k in range(r - 1, -1, -1):
            out[k] = self.ancestors[k, g][out[k + 1]]
        return out


#: ``extra`` tables with a leading ``[G]`` axis (MCMC acceptance per chain, particle Gibbs' reference update
#: rate): :meth:`InferenceResult.group` keeps group ``g``'s rows of them.
PER_GROUP_EXTRA = ("acceptance", "reference_update_rate")


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
        extra: strategy-specific tables (``vote``: the tally; ``best_of``: scores; per group: PER_GROUP_EXTRA).
        genealogy: the resampling steps' ancestors and weights (:class:`Genealogy`; ``None`` when the strategy
            does not resample through the engine's hole kernel, or for memory waves).
        died_in ``[G, N]``: the program segment each dead particle died in (``-1``: alive, or not recorded);
            ``segment_labels``: each segment's label (source location and statement), or its kind.
        sweep: particle Gibbs: its last conditional SMC sweep, the population the last sample was drawn from
            (particle 0 of each group replayed the previous reference), with its own genealogy and ESS.
        killed: ``{segment: [G] particles}`` found newly dead at the end of each segment during the run, those
            that resampling replaced later included (a hole's: the particles dead at its end; one that died in the
            hole and was replaced by a resampling step inside it is not counted).
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
    log_z_se: np.ndarray | None = None  # [G] standard errors of log_z (lmprog.inference.evidence), NaN: unknown
    genealogy: Genealogy | None = None
    died_in: np.ndarray | None = None
    segment_labels: tuple = ()
    killed: dict = field(default_factory=dict)
    sweep: "InferenceResult | None" = None
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
            self._samples["_weights"] = normalize(self.log_weights)
        return self._samples["_weights"]

    @property
    def log_evidence(self) -> float | None:
        """``log Z_hat`` of group 0 (``None`` when not properly weighted)."""
        return None if self.log_z is None else float(self.log_z[0])

    @property
    def log_evidence_se(self) -> float | None:
        """The standard error of :attr:`log_evidence` (``None`` when unknown)."""
        if self.log_z_se is None or not np.isfinite(self.log_z_se[0]):
            return None
        return float(self.log_z_se[0])

    @property
    def alive(self) -> np.ndarray:
        return self.causes == 0

    def deaths(self, group: int = 0) -> list[dict]:
        """The dead particles of group ``group`` by the statement that killed them: ``[{"statement", "segment",
        "cause", "particles"}]``, most particles first (``statement``/``segment`` ``None`` when not recorded)."""
        counts: dict = {}
        for i in np.flatnonzero((self.causes[group] != 0) & (self.causes[group] != int(Cause.UNUSED))):
            j = int(self.died_in[group, i]) if self.died_in is not None else -1
            c = Cause(int(self.causes[group, i]))
            key = (j, CAUSE_TEXT.get(c, c.name.lower()))
            counts[key] = counts.get(key, 0) + 1
        out = [{"statement": self.segment_labels[j] if 0 <= j < len(self.segment_labels) else None,
                "segment": j if j >= 0 else None, "cause": cause, "particles": k} for (j, cause), k in counts.items()]
        return sorted(out, key=lambda d: (-d["particles"], d["segment"] if d["segment"] is not None else 1 << 30))

    def kills(self, group: int = 0) -> list[dict]:
        """``[{"statement", "segment", "particles"}]``: the particles of group ``group`` each statement killed during
        the run (:attr:`killed`), in program order."""
        return [{"statement": self.segment_labels[j] if j < len(self.segment_labels) else None, "segment": j,
                 "particles": int(k[group])} for j, k in sorted(self.killed.items()) if k[group]]

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

    def samples_of(self, group: int = 0) -> list[DecodedParticle]:
        """Group ``group``'s particles, decoded (cached)."""
        if group not in self._samples:
            self._samples[group] = [self._sample(group, i) for i in range(self.num_particles)]
        return self._samples[group]

    @property
    def samples(self) -> list[DecodedParticle]:
        """Group 0's particles, decoded (in particle order)."""
        return self.samples_of(0)

    def _sample(self, g: int, i: int) -> DecodedParticle:
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
        return DecodedParticle(
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

    def posterior(self, key: Callable[[DecodedParticle], Hashable] | None = None,
                  group: int = 0) -> list[tuple[Any, float]]:
        """The weighted distribution over ``key(sample)`` (default: the tuple of hole values): :func:`tally`."""
        key = key or self.extra.get("key") or (lambda s: tuple(sorted(s.values.items())))
        return tally((key(s), s.weight) for s in self.samples_of(group) if s.alive)

    def best(self, group: int = 0) -> DecodedParticle:
        """The particle with the largest weight (ties: the highest score, then the lowest index)."""
        ss = self.samples_of(group)
        return max(ss, key=lambda s: (s.weight, s.score, -s.index))

    # ---- views ---------------------------------------------------------------------------------

    def group(self, g: int) -> "InferenceResult":
        """Group ``g`` alone, as a one-group result (batch mode: row ``g``'s run)."""
        sl = slice(g, g + 1)
        return replace(
            self, tokens=self.tokens[sl], lengths=self.lengths[sl], spans=self.spans[sl],
            log_weights=self.log_weights[sl], scores=self.scores[sl], causes=self.causes[sl],
            hole_logprobs=self.hole_logprobs[sl], log_z=None if self.log_z is None else self.log_z[sl],
            log_z_se=None if self.log_z_se is None else self.log_z_se[sl], ess=self.ess[:, sl], resampled=self.resampled[:, sl], data=[self.data[g]] if self.data else [],
            genealogy=None if self.genealogy is None else self.genealogy.group(g),
            died_in=None if self.died_in is None else self.died_in[sl],
            killed={j: k[sl] for j, k in self.killed.items() if k[g]},
            sweep=None if self.sweep is None else self.sweep.group(g),
            stats=dict(self.stats, groups=1), _samples={},
            extra={k: v[sl] if k in PER_GROUP_EXTRA else v for k, v in self.extra.items()})

    @classmethod
    def concat(cls, waves: list["InferenceResult"]) -> "InferenceResult":
        """Independent one-group runs of one program (memory waves) as one result: their particles side by side,
        with their absolute log-weights, so ``exp(log_weights) / N`` is still an unbiased estimate of the
        unnormalized target and ``log Z = logsumexp(all) - log N`` is the particle-weighted mean of the waves'
        ``Z`` (an island particle filter). ESS histories stay per wave (``extra["wave_ess"]``; ``ess`` is the
        first wave's)."""
        first = waves[0]
        if len(waves) == 1:
            return first
        cat = lambda name: np.concatenate([getattr(w, name) for w in waves], axis=1)  # noqa: E731
        lw = cat("log_weights")
        n = lw.shape[1]
        stats = dict(first.stats)
        for k in ("tokens", "forward_passes", "compile_s"):
            stats[k] = sum(w.stats.get(k, 0) for w in waves)
        stats.update(particles=n, waves=len(waves))
        return replace(
            first, log_z_se=_waves_se(waves, n), tokens=cat("tokens"), lengths=cat("lengths"), spans=cat("spans"),
            log_weights=lw,
            scores=cat("scores"), causes=cat("causes"), hole_logprobs=cat("hole_logprobs"),
            log_z=None if first.log_z is None else logsumexp(lw) - np.log(n),
            data=[[d for w in waves for d in (w.data[0] if w.data else [{}] * w.num_particles)]],
            stats=stats, extra={**first.extra, "wave_ess": [w.ess[:, 0] for w in waves]}, _samples={}, genealogy=None,
            died_in=cat("died_in") if all(w.died_in is not None for w in waves) else None,
            killed={j: sum(w.killed[j] for w in waves if j in w.killed) for w in waves for j in w.killed})

    def dead_copy(self, n: int, error) -> "InferenceResult":
        """A one-group result of ``n <= num_particles`` particles shaped like this one, all dead by ``error`` (an
        :class:`InferenceError`: its most frequent cause): a memory wave whose particles all died, whose
        evidence estimate is 0."""
        cause = max(error.causes, key=error.causes.get, default="constraint").upper()
        code = int(Cause[cause]) if cause in Cause.__members__ else int(Cause.CONSTRAINT)
        first = lambda a: a[:, :n]  # noqa: E731
        return replace(
            self, tokens=np.zeros_like(first(self.tokens)), lengths=np.zeros_like(first(self.lengths)),
            spans=np.zeros_like(first(self.spans)), log_weights=np.full_like(first(self.log_weights), -np.inf),
            scores=np.full_like(first(self.scores), -np.inf), causes=np.full_like(first(self.causes), code),
            hole_logprobs=np.zeros_like(first(self.hole_logprobs)), data=[[{} for _ in range(n)]],
            log_z=None if self.log_z is None else np.full_like(self.log_z, -np.inf), log_z_se=None,
            ess=np.zeros((0, 1)), resampled=np.zeros((0, 1), bool), stats=dict(self.stats, particles=n), _samples={},
            genealogy=None, died_in=np.full(first(self.causes).shape, int(getattr(error, "segment", -1)), np.int32),
            killed={int(error.segment): np.array([n])} if getattr(error, "segment", -1) >= 0 else {})

    def relabel(self, strategy) -> "InferenceResult":
        """The result as ``strategy``'s (a strategy that post-processes a base strategy's particles: its name,
        weighting and options; decoded samples are recomputed from the new weights)."""
        self.strategy = strategy.name
        self.properly_weighted = strategy.properly_weighted
        self.options = strategy.options()
        self._samples.clear()
        return self

    def _hole_index(self, name: str) -> int:
        for h, hole in enumerate(self.holes):
            if hole.name == name:
                return h
        raise KeyError(f"no hole named {name!r}")


def tally(pairs: Iterable[tuple[Any, float]], *, ident: Callable[[Any], Hashable] | None = None,
          tie: Callable[[Any], str] = repr) -> list[tuple[Any, float]]:
    """The one posterior tally: ``(value, weight)`` pairs summed over equal values (``ident(value)`` equal;
    default the value itself), normalized to sum to 1, sorted by probability (descending, then ``tie(value)``).
    Pairs with weight 0 are left out (a dead or zero-weight particle is no evidence for its value); no positive
    weight gives an empty list. The first value seen stands for its class."""
    ident = ident or (lambda v: v)
    sums: dict = {}
    first: dict = {}
    for value, weight in pairs:
        if weight > 0:
            k = ident(value)
            sums[k] = sums.get(k, 0.0) + weight
            first.setdefault(k, value)
    total = sum(sums.values())
    if not total > 0:
        return []
    return sorted(((first[k], w / total) for k, w in sums.items()), key=lambda kv: (-kv[1], tie(kv[0])))


def _waves_se(waves: list[InferenceResult], n: int) -> np.ndarray | None:
    """log Z's standard error of independent waves combined as ``Z = sum_w (n_w / n) Z_w``:
    ``Var(Z) / Z^2 = sum_w (n_w Z_w / (n Z))^2 Var(Z_w) / Z_w^2``."""
    if any(w.log_z is None or w.log_z_se is None for w in waves):
        return None
    share = np.array([w.num_particles / n for w in waves])
    lz = np.array([float(w.log_z[0]) for w in waves])
    se = np.array([float(w.log_z_se[0]) for w in waves])
    if not np.all(np.isfinite(se)) or not np.any(np.isfinite(lz)):
        return np.array([np.nan])
    z_rel = share * np.exp(lz - logsumexp(np.log(share) + lz))  # n_w Z_w / (n Z)
    return np.array([float(np.sqrt(np.sum(np.where(np.isfinite(lz), z_rel, 0.0) ** 2 * se ** 2)))])
