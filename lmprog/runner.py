"""Running programs: model cache, strategy construction, lowering + engine run -> :class:`~lmprog.result.Result`.

Used by :meth:`lmprog.program.Program.run` / ``run_batch`` and the ``lmprog run`` / ``lmprog batch`` commands.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional

from lmprog.compiler.lower import RunError, lower, resolve_inputs
from lmprog.result import Result, ResultSample

__all__ = ["get_model", "build_strategy", "run_program", "UnsupportedStrategy"]

# LANGUAGE.md's first argument of each strategy: what ``particles=`` overrides.
PARTICLE_ARG = {"sample": "n", "importance": "particles", "smc": "particles", "beam": "width", "best_of": "n",
                "vote": "n", "mcmc": "chains", "particle_gibbs": "particles"}


class UnsupportedStrategy(RunError):
    """The strategy is part of the language but not implemented by the engine yet."""


@functools.lru_cache(maxsize=4)
def get_model(name: str):
    """``load_model(name)``, loaded once per process."""
    from lmprog.backends import load_model

    return load_model(name)


def build_strategy(program, lowered, *, strategy=None, particles: Optional[int] = None,
                   max_tokens: Optional[int] = None, temperature: Optional[float] = None):
    """The engine strategy: the program's ``infer`` (or ``strategy``: a name, or an engine Strategy object),
    with ``particles`` / ``max_tokens`` / ``temperature`` overriding its arguments. Returns (strategy, seed)."""
    from lmprog.dsl.catalog import strategy_defaults
    from lmprog.inference import STRATEGIES, Strategy, with_options

    seed = None
    if isinstance(strategy, Strategy):
        st = strategy
    else:
        spec = program.strategy
        if isinstance(strategy, str):
            name = strategy
            given = dict(spec.args) if spec is not None and spec.name == name else {}
        else:
            name = spec.name if spec is not None else program.default_strategy
            given = dict(spec.args) if spec is not None else {}
        if name not in PARTICLE_ARG and name != "greedy":
            raise ValueError(f"unknown strategy {name!r}; valid: greedy, " + ", ".join(PARTICLE_ARG))
        cls = STRATEGIES.get(name)
        if cls is None:
            raise UnsupportedStrategy(f"the '{name}' strategy is not supported by the inference engine yet; "
                                      f"use one of: {', '.join(STRATEGIES)}")
        args = {k: v for k, v in strategy_defaults(name).items() if v is not None}
        args.update(given)
        seed = args.pop("seed", None) if "seed" in given else None
        args.pop("seed", None)
        if args.get("rejuvenate"):
            raise UnsupportedStrategy("smc(rejuvenate=K) is not supported by the inference engine yet")
        args.pop("rejuvenate", None)
        if particles is not None and name in PARTICLE_ARG:
            args[PARTICLE_ARG[name]] = int(particles)
        for k in ("score", "key"):
            if k in args:
                args[k] = _sample_fn(lowered, args[k], k)
        valid = {f.name for f in fields(cls)}
        args = {k: v for k, v in args.items() if k in valid}
        if name == "vote" and "key" not in args:
            args["key"] = lambda s: json.dumps(lowered.returns(s), sort_keys=True, ensure_ascii=False)
        if name == "best_of" and "score" not in args:
            args["score"] = lambda s: s.score
        st = cls(**args)
    st = with_options(st, max_tokens=max_tokens, temperature=temperature)
    st.validate()
    return st, seed


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


def run_program(program, inputs: Mapping[str, Any], *, particles=None, seed=None, strategy=None,
                max_tokens=None, temperature=None, model=None, lm=None, from_text: bool = False,
                progress=None) -> Result:
    """Resolve inputs, load the model, lower, run. Raises LoweringError (program/input errors), RunError /
    InferenceError (runtime failures)."""
    from lmprog.inference import run as engine_run

    t0 = time.perf_counter()
    values = resolve_inputs(program, inputs, from_text=from_text)
    if lm is None:
        lm = get_model(model or program.model or program.default_model)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if seed is None:
        spec = program.strategy
        seed = int(spec.args.get("seed", 0)) if spec is not None else 0
    lowered = lower(program, lm.tokenizer, values, seed=seed, default_max_tokens=max_tokens or 256)
    st, _ = build_strategy(program, lowered, strategy=strategy, particles=particles,
                           max_tokens=max_tokens, temperature=temperature)
    lower_s = time.perf_counter() - t1
    raw = engine_run(lm, lowered.program, st, seed=int(seed), progress=progress)
    return make_result(raw, lowered, values, lower_s=lower_s, load_s=load_s, wall_s=time.perf_counter() - t0,
                       model=getattr(lm, "name", None))


def make_result(raw, lowered, inputs, *, lower_s=0.0, load_s=0.0, wall_s=None, model=None) -> Result:
    import math

    samples, tally, order = [], {}, {}
    dead = 0
    for s in raw.samples:
        if not s.alive:
            dead += 1
            continue
        values = lowered.returns(s)
        rs = ResultSample(values, s.text, s.log_weight, s.weight, dict(s.values))
        samples.append(rs)
        if s.weight > 0:
            key = json.dumps(values, sort_keys=True, ensure_ascii=False)
            tally[key] = tally.get(key, 0.0) + s.weight
            order.setdefault(key, values)
    total = sum(tally.values())
    posterior = sorted(((order[k], w / total) for k, w in tally.items()), key=lambda kv: (-kv[1], json.dumps(kv[0])))\
        if total > 0 else []
    ess = [float(x) for x in raw.ess[:, 0] if math.isfinite(float(x))] if raw.ess.size else []
    stats = dict(raw.stats)
    stats["engine_wall_s"] = stats.get("wall_s")
    if wall_s is not None:
        stats["wall_s"] = wall_s
    stats["lower_s"] = lower_s
    stats["constraint_compile_s"] = lowered.compile_s
    stats["load_s"] = load_s
    stats["particles"] = raw.num_particles
    stats["dead"] = dead
    if model:
        stats["model"] = model
    extra = {}
    for k in ("vote", "winner"):
        if k in raw.extra:
            extra[k] = raw.extra[k]
    return Result(raw.strategy, bool(raw.properly_weighted), samples, posterior,
                  raw.log_evidence if raw.properly_weighted else None, ess, stats, dict(inputs), extra, raw)
