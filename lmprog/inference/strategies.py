"""Inference strategies (LANGUAGE.md, "Inference strategies") as small frozen dataclasses.

A strategy is pure configuration: :func:`lmprog.inference.engine.run` turns it into a static
:class:`~lmprog.inference.kernel.KernelConfig` (what gets compiled) plus host-side post-processing
(``best_of`` scoring, ``vote`` tallying).

=============  ====================================================================  =================
strategy       what it does                                                          properly weighted
=============  ====================================================================  =================
``sample``     locally-constrained decoding: sample from the masked, renormalized    no
               LM; the allowed mass is *not* in the weight, so it samples the
               distorted distribution Outlines/LMQL sample, not the target
``greedy``     argmax of the masked LM at each step, one particle                     no
``importance`` sample as above, weight by the allowed mass (and observe/factors)       yes
``smc``        importance + resampling when ESS < ess x N                             yes
``beam``       keep the ``width`` highest-scoring partial sequences (score: log       no
               target density, the same target as importance/smc)
``best_of``    draw ``n`` samples with ``base`` (default ``sample``), keep the best   no
               by a host ``score`` callable
``vote``       draw ``n`` samples with ``base`` (default ``importance``), weighted    yes when base is
               majority over ``key(sample)``                                          properly weighted
``mcmc``       Metropolis-Hastings over whole program executions: ``suffix``          yes (asymptotically,
               regenerates from a uniformly chosen token/host step, ``independent``  in the number of
               proposes a fresh SMC draw (particle independent MH)                    steps)
``particle_``  conditional SMC keeping a reference trajectory                         yes (asymptotically)
``gibbs``
=============  ====================================================================  =================

``smc(rejuvenate=K)`` adds ``K`` suffix MH moves per particle after every resampling (weights unchanged).
The MCMC drivers live in :mod:`lmprog.inference.mcmc`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar

from lmprog.inference.kernel import KernelConfig
from lmprog.inference.resampling import RESAMPLERS

__all__ = [
    "Beam",
    "BestOf",
    "Greedy",
    "Importance",
    "MCMC",
    "ParticleGibbs",
    "SMC",
    "STRATEGIES",
    "Sample",
    "Strategy",
    "Vote",
    "make_strategy",
]

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Strategy:
    """Common options: ``temperature`` (the base LM becomes ``p^(1/T)``, locally normalized), ``max_tokens``
    (budget of holes that set none)."""

    name: ClassVar[str] = ""
    properly_weighted: ClassVar[bool] = False

    temperature: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def num_particles(self) -> int:
        raise NotImplementedError

    def kernel_config(self, groups: int = 1, chunk: int = 32) -> KernelConfig:
        raise NotImplementedError

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0 (use greedy() for argmax decoding)")
        if int(self.max_tokens) < 1:
            raise ValueError(f"{self.name}: max_tokens must be >= 1")
        if self.num_particles < 1:
            raise ValueError(f"{self.name}: needs at least one particle")

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not callable(getattr(self, f.name))}


@dataclass(frozen=True)
class Sample(Strategy):
    """Locally-constrained decoding (a baseline): NOT properly weighted."""

    name: ClassVar[str] = "sample"
    n: int = 1

    @property
    def num_particles(self) -> int:
        return int(self.n)

    def kernel_config(self, groups=1, chunk=32):
        return KernelConfig(select="sample", weighted=False, resampler=None, groups=groups, chunk=chunk)


@dataclass(frozen=True)
class Greedy(Strategy):
    """Argmax of the masked LM at every step (one particle); NOT properly weighted."""

    name: ClassVar[str] = "greedy"

    @property
    def num_particles(self) -> int:
        return 1

    def kernel_config(self, groups=1, chunk=32):
        return KernelConfig(select="argmax", weighted=False, resampler=None, groups=groups, chunk=chunk)


@dataclass(frozen=True)
class Importance(Strategy):
    """Importance sampling with the locally-constrained proposal; weight = product of allowed masses."""

    name: ClassVar[str] = "importance"
    properly_weighted: ClassVar[bool] = True
    particles: int = 16

    @property
    def num_particles(self) -> int:
        return int(self.particles)

    def kernel_config(self, groups=1, chunk=32):
        return KernelConfig(select="sample", weighted=True, resampler=None, groups=groups, chunk=chunk)


@dataclass(frozen=True)
class SMC(Strategy):
    """Sequential Monte Carlo: importance + resampling when ``ESS < ess * particles`` (``ess=1``: every
    step, ``ess=0``: never); ``rejuvenate=K``: ``K`` suffix MH moves per particle after every resampling,
    targeting the intermediate distribution the particles then represent (weights unchanged)."""

    name: ClassVar[str] = "smc"
    properly_weighted: ClassVar[bool] = True
    particles: int = 16
    ess: float = 0.5
    resample: str = "systematic"
    rejuvenate: int = 0

    @property
    def num_particles(self) -> int:
        return int(self.particles)

    def validate(self):
        super().validate()
        if not 0.0 <= float(self.ess) <= 1.0:
            raise ValueError(f"smc: ess must be in [0, 1], got {self.ess}")
        if self.resample not in RESAMPLERS:
            raise ValueError(f"smc: unknown resample={self.resample!r}; valid: {', '.join(sorted(RESAMPLERS))}")
        if int(self.rejuvenate) < 0:
            raise ValueError("smc: rejuvenate must be >= 0")

    def kernel_config(self, groups=1, chunk=32):
        rejuvenate = int(self.rejuvenate) > 0
        return KernelConfig(
            select="sample",
            weighted=True,
            resampler=self.resample if self.ess > 0 else None,
            groups=groups,
            chunk=chunk,
            trace=rejuvenate,
            stop_on_resample=rejuvenate,
        )


@dataclass(frozen=True)
class Beam(Strategy):
    """Beam search on the target's log density (allowed tokens only); NOT properly weighted. Reported
    weights are the softmax of the final beams' scores."""

    name: ClassVar[str] = "beam"
    width: int = 4

    @property
    def num_particles(self) -> int:
        return int(self.width)

    def kernel_config(self, groups=1, chunk=32):
        if groups != 1:
            raise ValueError("beam search runs a single group")
        return KernelConfig(select="beam", weighted=False, resampler=None, groups=1, chunk=chunk)


@dataclass(frozen=True)
class BestOf(Strategy):
    """``n`` samples from ``base`` (default: ``sample(n)``), scored on the host by ``score(sample) -> float``;
    the best gets all the weight. NOT properly weighted."""

    name: ClassVar[str] = "best_of"
    n: int = 4
    score: Callable[[Any], float] | None = None
    base: Strategy | None = None

    @property
    def num_particles(self) -> int:
        return int(self.n)

    def validate(self):
        super().validate()
        if self.score is None or not callable(self.score):
            raise ValueError("best_of: score must be a callable on completed samples")
        self.base_strategy().validate()

    def base_strategy(self) -> Strategy:
        if self.base is None:
            return Sample(n=self.n, temperature=self.temperature, max_tokens=self.max_tokens)
        return self.base

    def kernel_config(self, groups=1, chunk=32):
        return self.base_strategy().kernel_config(groups, chunk)


@dataclass(frozen=True)
class Vote(Strategy):
    """Weighted majority over ``key(sample)`` of ``n`` samples from ``base`` (default: ``importance(n)``);
    votes are the normalized importance weights when the base is properly weighted, else uniform."""

    name: ClassVar[str] = "vote"
    n: int = 16
    key: Callable[[Any], Any] | None = None
    base: Strategy | None = None

    @property
    def properly_weighted(self) -> bool:  # type: ignore[override]
        return self.base_strategy().properly_weighted

    @property
    def num_particles(self) -> int:
        return int(self.n)

    def validate(self):
        super().validate()
        if self.key is None or not callable(self.key):
            raise ValueError("vote: key must be a callable on completed samples")
        self.base_strategy().validate()

    def base_strategy(self) -> Strategy:
        if self.base is None:
            return Importance(particles=self.n, temperature=self.temperature, max_tokens=self.max_tokens)
        return self.base

    def kernel_config(self, groups=1, chunk=32):
        return self.base_strategy().kernel_config(groups, chunk)


MCMC_MOVES = ("suffix", "independent")


@dataclass(frozen=True)
class MCMC(Strategy):
    """Metropolis-Hastings whose states are whole program executions, ``chains`` chains in one batch.

    ``move="suffix"``: cut the chain's trajectory at a uniformly chosen *site* (a generated token, or a host
    step), keep the prefix (and its KV cache), regenerate the rest with the SMC proposal; accept with
    ``min(1, W(x') n(x) / (W(x) n(x')))`` where ``W`` is the regenerated part's importance weight and ``n``
    the number of sites. ``move="independent"``: propose a fresh draw from SMC with ``particles`` particles
    and accept with ``min(1, Z'/Z)``, the ratio of the two runs' evidence estimates (particle independent
    MH). The first ``burn_in`` steps are dropped; every later state of every chain is a sample."""

    name: ClassVar[str] = "mcmc"
    properly_weighted: ClassVar[bool] = True
    steps: int = 100
    chains: int = 4
    burn_in: int = 0
    move: str = "suffix"
    particles: int = 8

    @property
    def num_particles(self) -> int:
        return int(self.chains)

    def validate(self):
        super().validate()
        if self.move not in MCMC_MOVES:
            raise ValueError(f"mcmc: unknown move={self.move!r}; valid: {', '.join(MCMC_MOVES)}")
        if int(self.steps) < 1 or int(self.particles) < 1:
            raise ValueError("mcmc: steps and particles must be >= 1")
        if not 0 <= int(self.burn_in) < int(self.steps):
            raise ValueError(f"mcmc: burn_in must be in [0, steps), got burn_in={self.burn_in}, steps={self.steps}")

    def kernel_config(self, groups=1, chunk=32):
        if self.move == "independent":
            return SMC(particles=self.particles).kernel_config(groups=groups * self.chains, chunk=chunk)
        return KernelConfig(select="sample", weighted=True, resampler=None, groups=1, chunk=chunk, trace=True)


@dataclass(frozen=True)
class ParticleGibbs(Strategy):
    """Particle Gibbs: conditional SMC with ``particles`` particles, one of which replays the reference
    trajectory (and never loses its lineage at resampling); the next reference is drawn from the final
    weights. Each of the ``iterations`` references is a sample."""

    name: ClassVar[str] = "particle_gibbs"
    properly_weighted: ClassVar[bool] = True
    iterations: int = 10
    particles: int = 16

    @property
    def num_particles(self) -> int:
        return int(self.particles)

    def validate(self):
        super().validate()
        if int(self.iterations) < 1:
            raise ValueError("particle_gibbs: iterations must be >= 1")
        if int(self.particles) < 2:
            raise ValueError("particle_gibbs: needs at least 2 particles (one is the reference)")

    def kernel_config(self, groups=1, chunk=32):
        return KernelConfig(select="sample", weighted=True, resampler="multinomial", groups=groups, chunk=chunk,
                            trace=True, conditional=True)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Sample, Greedy, Importance, SMC, Beam, BestOf, Vote, MCMC, ParticleGibbs)
}

# LANGUAGE.md spells the first positional argument differently per strategy.
_POSITIONAL = {"sample": "n", "importance": "particles", "smc": "particles", "beam": "width", "best_of": "n", "vote": "n",
               "mcmc": "steps", "particle_gibbs": "iterations"}


def make_strategy(name: str, *args, **kwargs) -> Strategy:
    """``make_strategy("smc", particles=32, ess=0.5, resample="systematic")`` (or ``("smc", 32)``), validated.

    Raises ``ValueError`` naming the valid strategies/arguments on a bad name or argument.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown inference strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    if args:
        if len(args) > 1 or name not in _POSITIONAL:
            raise ValueError(f"{name}: takes {'one positional argument' if name in _POSITIONAL else 'no positional arguments'}")
        kwargs = {_POSITIONAL[name]: args[0], **kwargs}
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise ValueError(f"{name}: unknown argument(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    strategy = cls(**kwargs)
    strategy.validate()
    return strategy


def with_options(strategy: Strategy, **options) -> Strategy:
    """A copy with common options overridden (CLI/API options override the program's ``infer``)."""
    return replace(strategy, **{k: v for k, v in options.items() if v is not None})

