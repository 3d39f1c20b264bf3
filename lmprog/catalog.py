"""The strategy catalog: every inference strategy the language knows, with its parameters, declared once.

The checker (``infer name(...)`` lines), the CLI and API (``--strategy``, ``particles=``), ``make_strategy``
and the engine's strategy classes all read this table: a strategy's parameters (type, default, range,
choices, in positional order), which parameter ``--particles`` overrides, whether it is properly weighted,
and the module that implements it. Each implementing class is built from its entry
(:func:`lmprog.inference.strategies.base.implements`), so a default or a positional order cannot disagree
between the checker and the engine. A leaf module: it imports nothing of lmprog (``lmprog check`` reads it
without loading JAX).

Adding a strategy is one new module under ``lmprog/inference/strategies/`` and one entry in :data:`CATALOG`
(docs/architecture.md, "Adding a strategy").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["CATALOG", "COMMON_OPTIONS", "DEFAULT_STRATEGY", "MCMC_MOVES", "Param", "RESAMPLER_NAMES",
           "StrategySpec"]


@dataclass(frozen=True)
class Param:
    """A parameter of a distribution or a strategy.

    ``type`` is 'int', 'float', 'str', 'bool', 'list', 'expr' (any expression, evaluated per sample) or 'any'.
    ``low`` / ``high`` bound numbers (inclusive unless ``open_low``); ``choices`` restricts strings.
    ``required`` parameters have no default.
    """

    name: str
    type: str
    default: object = None
    required: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class StrategySpec:
    """One strategy: ``params`` are its own parameters in positional order (the common options follow,
    keyword only); ``particle_arg`` is what ``--particles`` overrides (``None``: nothing); ``module`` implements
    it (its ``STRATEGY`` attribute is the class)."""

    name: str
    params: tuple[Param, ...]
    properly_weighted: bool
    particle_arg: Optional[str]
    module: str

    @property
    def all_params(self) -> tuple[Param, ...]:
        """Everything ``infer name(...)`` accepts: own parameters, then the common options and ``seed``."""
        return self.params + COMMON_OPTIONS

    def defaults(self) -> dict[str, object]:
        """Every parameter with its default (``expr`` parameters default to None)."""
        return {p.name: p.default for p in self.all_params}


RESAMPLER_NAMES = ("multinomial", "stratified", "systematic", "residual")
MCMC_MOVES = ("suffix", "independent")

#: Options every strategy accepts (by keyword). ``seed`` is the run's, not the strategy's.
COMMON_OPTIONS: tuple[Param, ...] = (
    Param("max_tokens", "int", 256, low=1),
    Param("temperature", "float", 1.0, low=0, open_low=True),
    # Enumeration of small finite holes (lmprog.inference.enumeration); false: every hole token by token.
    Param("enumerate", "bool", True),
    Param("seed", "int", 0, low=0, high=2**32 - 1),  # as runner.SEED_RANGE (JAX keeps 32 bits of a seed)
)

_M = "lmprog.inference.strategies."

#: ``lookahead=k``: the one-step lookahead to a hole's end for ``k`` ending candidates per history (0: off;
#: lmprog/inference/lookahead.py; where it pays: docs/performance.md, "Lookahead").
_LOOKAHEAD = Param("lookahead", "int", 0, low=0, high=64)

#: Every strategy, by name, in the order documentation and messages list them.
CATALOG: dict[str, StrategySpec] = {s.name: s for s in (
    StrategySpec("sample", (Param("n", "int", 1, low=1),), False, "n", _M + "sampling"),
    StrategySpec("greedy", (), False, None, _M + "greedy"),
    StrategySpec("importance", (Param("particles", "int", 16, low=1), _LOOKAHEAD), True, "particles",
                 _M + "importance"),
    StrategySpec("smc", (Param("particles", "int", 16, low=1), Param("ess", "float", 0.5, low=0, high=1),
                         Param("resample", "str", "systematic", choices=RESAMPLER_NAMES),
                         Param("rejuvenate", "int", 0, low=0), _LOOKAHEAD), True, "particles", _M + "smc"),
    StrategySpec("beam", (Param("width", "int", 4, low=1),), False, "width", _M + "beam"),
    StrategySpec("best_of", (Param("n", "int", 8, low=1), Param("score", "expr")), False, "n", _M + "best_of"),
    StrategySpec("vote", (Param("n", "int", 8, low=1), Param("key", "expr"), Param("weighted", "bool", True)), False,
                 "n", _M + "vote"),
    StrategySpec("mcmc", (Param("steps", "int", 100, low=1), Param("chains", "int", 4, low=1),
                          Param("burn_in", "int", 0, low=0), Param("move", "str", "suffix", choices=MCMC_MOVES),
                          Param("particles", "int", 8, low=1)), True, "chains", _M + "mcmc"),
    StrategySpec("particle_gibbs", (Param("iterations", "int", 10, low=1), Param("particles", "int", 16, low=1)),
                 True, "particles", _M + "particle_gibbs"),
)}

#: The strategy of a program without an ``infer`` line.
DEFAULT_STRATEGY = "smc"
