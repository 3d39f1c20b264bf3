"""What every inference strategy is: a frozen dataclass of its parameters that runs itself.

A strategy's class is built from its entry in :data:`lmprog.catalog.CATALOG` by :func:`implements`: the
entry's parameters become the dataclass's fields (with their defaults, in positional order), and its name,
``particle_arg`` and ``properly_weighted`` become class attributes, so the checker, the CLI and the engine
read one declaration. The class adds what only the engine needs:

* ``groupable`` (``groups > 1`` independent copies in one call) and ``batchable`` (rows of a batch may run as
  groups of one engine call);
* ``run(lm, program, key=..., groups=..., chunk=..., progress=...) -> InferenceResult``: the algorithm,
  written on the engine's public building blocks (:mod:`lmprog.inference.engine`);
* fields the language cannot set (``best_of(base=...)``), declared in the class body as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from lmprog.catalog import CATALOG, COMMON_OPTIONS, Param, StrategySpec
from lmprog.inference import engine

__all__ = ["DEFAULT_MAX_TOKENS", "OnBase", "ParticleStrategy", "Strategy", "implements"]

_COMMON = {p.name: p for p in COMMON_OPTIONS}
DEFAULT_MAX_TOKENS = int(_COMMON["max_tokens"].default)


def implements(name: str):
    """Class decorator: the frozen dataclass of strategy ``name``, its language parameters taken from the
    catalog entry (placed before the fields the class body declares)."""
    spec: StrategySpec = CATALOG[name]

    def build(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations = {p.name: _TYPES[p.type] for p in spec.params}
        annotations.update(own)
        cls.__annotations__ = annotations
        for p in spec.params:
            setattr(cls, p.name, field(default=p.default, metadata={"param": p}))
        cls.name = spec.name
        cls.spec = spec
        cls.particle_arg = spec.particle_arg
        if "properly_weighted" not in cls.__dict__:
            cls.properly_weighted = spec.properly_weighted
        return dataclass(frozen=True)(cls)

    return build


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "expr": object, "any": object}


@dataclass(frozen=True)
class Strategy:
    """Common options: ``temperature`` (the base LM becomes ``p^(1/T)``, locally normalized), ``max_tokens``
    (budget of holes that set none)."""

    name: ClassVar[str] = ""
    spec: ClassVar[StrategySpec | None] = None
    properly_weighted: ClassVar[bool] = False
    particle_arg: ClassVar[str | None] = None
    groupable: ClassVar[bool] = True
    #: Independent runs of fewer particles, combined by their absolute weights, are the same algorithm (memory
    #: waves, :mod:`lmprog.inference.memory`).
    waveable: ClassVar[bool] = False

    temperature: float = field(default=_COMMON["temperature"].default, metadata={"param": _COMMON["temperature"]})
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"param": _COMMON["max_tokens"]})
    #: Generate small finite holes by exact enumeration (properly weighted samplers only; see
    #: :mod:`lmprog.inference.enumeration`); ``False`` (default): token by token. Opt-in until an enumerated
    #: hole costs no more than sampling it (docs/performance.md: every tokenisation is scored).
    enumerate: bool = field(default=False, metadata={"param": _COMMON["enumerate"]})

    # ---- declarations -----------------------------------------------------------------------------

    @classmethod
    def own_params(cls) -> tuple[Param, ...]:
        """The strategy's own language parameters, in positional order."""
        return cls.spec.params if cls.spec is not None else ()

    @classmethod
    def params(cls) -> tuple[Param, ...]:
        """Everything ``infer name(...)`` accepts: own parameters, then the common options and ``seed``."""
        return cls.own_params() + COMMON_OPTIONS

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """Every language parameter with its default (``expr`` parameters default to None)."""
        return {p.name: p.default for p in cls.params()}

    @property
    def batchable(self) -> bool:
        """Rows of a batch with the same structure may run as groups of one engine call."""
        return self.groupable

    @property
    def num_particles(self) -> int:
        return int(getattr(self, self.particle_arg)) if self.particle_arg else 1

    def with_particles(self, n: int) -> "Strategy":
        """The same strategy with ``n`` particles (a memory wave)."""
        return replace(self, **{self.particle_arg: int(n)}) if self.particle_arg else self

    def footprint(self, groups: int = 1):
        """``(KernelConfig, particles resident at once)`` of a run with ``groups`` groups: what the memory
        pre-flight estimates."""
        return self.kernel_config(groups), groups * self.num_particles

    def kernel_config(self, groups: int = 1, chunk: int = 32):
        """The static configuration of the kernels this strategy runs."""
        raise NotImplementedError

    # ---- running ----------------------------------------------------------------------------------

    def run(self, lm, program, *, key, groups: int = 1, chunk: int = 32, progress=None):
        """Run on the segment program; returns an :class:`~lmprog.inference.samples.InferenceResult`."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad option (the checker reports the same for ``.lmp`` files)."""
        for p in self.params():
            if p.name == "seed" or p.type == "expr":
                continue
            value = getattr(self, p.name)
            if p.type == "int" and (isinstance(value, bool) or int(value) != value):
                raise ValueError(f"{self.name}: {p.name} must be an integer, got {value!r}")
            if p.choices and value not in p.choices:
                raise ValueError(f"{self.name}: unknown {p.name}={value!r}; valid: {', '.join(sorted(p.choices))}")
            if p.low is not None and (value < p.low or (p.open_low and value == p.low)):
                bound = f"in [{p.low:g}, {p.high:g}]" if p.high is not None else \
                    (f"> {p.low:g}" if p.open_low else f">= {p.low:g}")
                raise ValueError(f"{self.name}: {p.name} must be {bound}, got {value!r}")
            if p.high is not None and value > p.high:
                raise ValueError(f"{self.name}: {p.name} must be in [{p.low:g}, {p.high:g}], got {value!r}")

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not callable(getattr(self, f.name))}

    def with_options(self, **options) -> "Strategy":
        """A copy with options overridden (``None`` values are ignored): CLI/API options override ``infer``."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class ParticleStrategy(Strategy):
    """A strategy that is one pass of weighted particles through the program: its kernels' static
    configuration (:meth:`kernel_config`) is all that tells it apart (sample, greedy, importance, smc, beam)."""

    def run(self, lm, program, *, key, groups=1, chunk=32, progress=None):
        return engine.simulate(lm, program, self, self.kernel_config(groups, chunk), key=key, groups=groups,
                               progress=progress)


@dataclass(frozen=True)
class OnBase(Strategy):
    """A strategy that runs a base strategy (``base``, default :meth:`default_base`) and post-processes its
    finished samples with a host callable (its parameter named ``uses``): ``best_of`` (``score``), ``vote``
    (``key``). One group; its memory is its base's."""

    groupable: ClassVar[bool] = False
    uses: ClassVar[str] = ""
    base: Strategy | None = field(default=None)

    def default_base(self) -> Strategy:
        raise NotImplementedError

    def base_strategy(self) -> Strategy:
        return self.default_base() if self.base is None else self.base

    def validate(self):
        super().validate()
        fn = getattr(self, self.uses)
        if fn is None or not callable(fn):
            raise ValueError(f"{self.name}: {self.uses} must be a callable on completed samples")
        self.base_strategy().validate()

    def footprint(self, groups: int = 1):
        return self.base_strategy().footprint(groups)
