"""Running programs: model cache, strategy construction, lowering + engine run -> :class:`~lmprog.result.Result`.

Used by :meth:`lmprog.program.Program.run` / ``run_batch`` and the ``lmprog run`` / ``lmprog batch`` commands.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional

from lmprog.compiler.errors import RunError
from lmprog.compiler.inputs import resolve_inputs
from lmprog.compiler.lower import lower
from lmprog.inference import MAX_BATCH_PARTICLES, STRATEGIES, Strategy, engine, run_rows
from lmprog.result import Result

__all__ = ["MAX_BATCH_PARTICLES", "build_strategy", "get_model", "run_batch", "run_program"]


@functools.lru_cache(maxsize=4)
def get_model(name: str):
    """``load_model(name)``, loaded once per process."""
    from lmprog.backends import load_model

    return load_model(name)


def _strategy_name(program, strategy) -> str:
    if isinstance(strategy, str):
        return strategy
    return program.strategy.name if program.strategy is not None else program.default_strategy


def _given_args(program, name: str) -> dict:
    spec = program.strategy
    return dict(spec.args) if spec is not None and spec.name == name else {}


def effective_max_tokens(program, strategy=None, max_tokens: Optional[int] = None) -> int:
    """The budget of holes without a ``tokens(X)`` bound: the override, else the strategy object's, else the
    program's ``infer ...(max_tokens=N)``, else the catalog default."""
    if max_tokens is not None:
        return int(max_tokens)
    if isinstance(strategy, Strategy):
        return int(strategy.max_tokens)
    name = _strategy_name(program, strategy)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: " + ", ".join(STRATEGIES))
    return int(_given_args(program, name).get("max_tokens", STRATEGIES[name].defaults()["max_tokens"]))


def build_strategy(program, lowered, *, strategy=None, particles: Optional[int] = None,
                   max_tokens: Optional[int] = None, temperature: Optional[float] = None) -> Strategy:
    """The engine strategy: the program's ``infer`` (or ``strategy``: a name, or a Strategy object), with
    ``particles`` / ``max_tokens`` / ``temperature`` overriding its arguments; ``score=``/``key=`` expressions
    become callables on the lowered program's samples."""
    if isinstance(strategy, Strategy):
        st = strategy
    else:
        name = _strategy_name(program, strategy)
        cls = STRATEGIES.get(name)
        if cls is None:
            raise ValueError(f"unknown strategy {name!r}; valid: " + ", ".join(STRATEGIES))
        args = {k: v for k, v in cls.defaults().items() if v is not None}
        args.update(_given_args(program, name))
        if particles is not None and cls.particle_arg is not None:
            args[cls.particle_arg] = int(particles)
        for k in ("score", "key"):
            if k in args:
                args[k] = _sample_fn(lowered, args[k], k)
        valid = {f.name for f in fields(cls)}
        args = {k: v for k, v in args.items() if k in valid}  # seed is the run's, not the strategy's
        if name == "vote" and "key" not in args:
            args["key"] = lambda s: json.dumps(lowered.returns(s), sort_keys=True, ensure_ascii=False)
        if name == "best_of" and "score" not in args:
            args["score"] = lambda s: s.score
        st = cls(**args)
    st = st.with_options(max_tokens=max_tokens, temperature=temperature)
    st.validate()
    return st


def _sample_fn(lowered, expr, what: str) -> Callable:
    def fn(sample):
        try:
            value = lowered.evaluate(expr, sample)
        except Exception as exc:
            raise RunError(f"{expr.span}: the {what} expression failed: {exc}") from None
        if what == "score":
            return float(value)
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, (list, dict)) else value
    return fn


def _seed(program, seed) -> int:
    if seed is not None:
        return int(seed)
    spec = program.strategy
    return int(spec.args.get("seed", 0)) if spec is not None else 0


def _lower_row(program, lm, row, *, seed, strategy, particles, max_tokens, temperature, from_text):
    """Resolve a row's inputs, lower, build its strategy. Returns ``(values, lowered, strategy, lower_s)``."""
    t0 = time.perf_counter()
    if not isinstance(row, Mapping):
        raise TypeError(f"a batch row must be a mapping of input names to values, not {type(row).__name__}")
    values = resolve_inputs(program, dict(row), from_text=from_text)
    low = lower(program, lm.tokenizer, values, seed=seed,
                default_max_tokens=effective_max_tokens(program, strategy, max_tokens))
    st = build_strategy(program, low, strategy=strategy, particles=particles, max_tokens=max_tokens,
                        temperature=temperature)
    return values, low, st, time.perf_counter() - t0


def _result(raw, low, values, lm, **stats) -> Result:
    return Result.from_inference(raw, low.returns, values, constraint_compile_s=low.compile_s,
                                 model=getattr(lm, "name", None) or None, **stats)


def run_program(program, inputs: Mapping[str, Any], *, particles=None, seed=None, strategy=None,
                max_tokens=None, temperature=None, model=None, lm=None, from_text: bool = False,
                progress=None, memory_limit=None) -> Result:
    """Resolve inputs, load the model, lower, run. Raises LoweringError (program/input errors), RunError /
    InferenceError (runtime failures)."""
    t0 = time.perf_counter()
    if lm is None:
        values = resolve_inputs(program, inputs, from_text=from_text)  # input errors before the model loads
        lm = get_model(model or program.model or program.default_model)
    load_s = time.perf_counter() - t0
    seed = _seed(program, seed)
    values, low, st, lower_s = _lower_row(program, lm, dict(inputs), seed=seed, strategy=strategy,
                                          particles=particles, max_tokens=max_tokens, temperature=temperature,
                                          from_text=from_text)
    raw = engine.run(lm, low.program, st, seed=seed, progress=progress, memory_limit=memory_limit)
    return _result(raw, low, values, lm, lower_s=lower_s, load_s=load_s, wall_s=time.perf_counter() - t0)


def run_batch(program, rows, *, particles=None, seed=None, strategy=None, max_tokens=None, temperature=None,
              model=None, lm=None, from_text: bool = False, max_batch_particles: int = MAX_BATCH_PARTICLES,
              progress=None, memory_limit=None) -> list:
    """Run ``program`` once per row of inputs: ``[Result or Exception, ...]`` in input order.

    Every row is lowered first; rows with the same structure key (``Lowered.structure_key``) run together as
    groups of one engine call (:func:`lmprog.inference.batch.run_rows`: every row's particles in one batch, one
    compiled kernel, a log Z per row, calls of equal size when rows exceed ``max_batch_particles``).
    Strategies that are not batchable run the rows one after another. A row that fails (bad inputs, every
    particle dead, a failing expression) gets its exception and never stops the others. ``progress`` is the
    engine's progress callback (:class:`lmprog.inference.Progress`), called for every engine call.
    """
    t0 = time.perf_counter()
    rows = list(rows)
    out: list = [None] * len(rows)
    if lm is None:
        lm = get_model(model or program.model or program.default_model)
    seed = _seed(program, seed)
    opts = dict(seed=seed, strategy=strategy, particles=particles, max_tokens=max_tokens, temperature=temperature,
                from_text=from_text)

    lowered: dict[int, tuple] = {}
    for k, row in enumerate(rows):
        try:
            lowered[k] = _lower_row(program, lm, row, **opts)
        except Exception as exc:  # noqa: BLE001 - reported in the row's place
            out[k] = exc
    if not lowered:
        return out
    keys = list(lowered)
    st = lowered[keys[0]][2]
    results = run_rows(lm, [(lowered[k][1].structure_key, lowered[k][1].program) for k in keys], st,
                                 seed=seed, max_batch_particles=max_batch_particles, progress=progress,
                                 memory_limit=memory_limit)
    wall = time.perf_counter() - t0
    for k, raw in zip(keys, results):
        values, low, _, lower_s = lowered[k]
        try:
            if raw is None:  # failed inside its batch: a run of its own reports its error exactly
                raw = engine.run(lm, low.program, st, seed=seed, progress=progress, memory_limit=memory_limit)
            elif isinstance(raw, Exception):
                raise raw
            out[k] = _result(raw, low, values, lm, lower_s=lower_s, wall_s=wall)
        except Exception as exc:  # noqa: BLE001
            out[k] = exc
    return out
