"""Running programs: model cache, strategy construction, lowering + engine run -> :class:`~lmprog.result.Result`.

Used by :meth:`lmprog.program.Program.run` / ``run_batch`` and the ``lmprog run`` / ``lmprog batch`` commands.

Before anything is lowered or allocated a run checks what it is given: its options (:func:`check_options`:
particle counts, seeds, strategies, ... against the strategy catalog, as the checker checks ``infer`` lines), its
inputs (finite numbers only: JSON has no NaN), the tokens its unrolled loops need against the model's context
(:func:`check_context`) and the host memory of the samples it will return (:func:`check_host_memory`). During
the run every call into the user's Python code is guarded (:mod:`lmprog.compiler.runtime_eval`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import fields
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from lmprog.catalog import CATALOG, COMMON_OPTIONS, Param
from lmprog.compiler.check_args import value_problem
from lmprog.compiler.errors import HostAbort, OptionError, RunError, diagnostic, lowering_error, LoweringError
from lmprog.compiler.inputs import resolve_inputs
from lmprog.compiler.lower import lower
from lmprog.compiler.runtime_eval import host_time_limit
from lmprog.dsl import ast as A
from lmprog.dsl.errors import suggestion
from lmprog.dsl.static import NotStatic, StaticError, static_value
from lmprog.inference import MAX_BATCH_PARTICLES, STRATEGIES, Strategy, engine, run_rows
from lmprog.inference import memory, sharding
from lmprog.result import Result

__all__ = ["MAX_BATCH_PARTICLES", "SEED_RANGE", "build_strategy", "check_context", "check_host_memory",
           "check_options", "get_model", "iter_batch", "load_models", "run_batch", "run_program"]

#: Valid seeds. JAX's default (32-bit) PRNG keys keep only the low 32 bits of a seed, so 2**32 would give the
#: same run as 0 and larger ones overflow: seeds outside this range are refused rather than aliased.
SEED_RANGE = (0, 2**32 - 1)


@functools.lru_cache(maxsize=4)
def get_model(name: str):
    """``load_model(name)``, loaded once per process."""
    from lmprog.backends import load_model

    return load_model(name)


def load_models(program, models: Optional[Mapping[str, Any]] = None) -> dict:
    """The second models of ``program`` (``model judge = "..."``), ``{alias: loaded model}``: taken from
    ``models`` (already loaded, e.g. toy models in tests), else loaded once per process (:func:`get_model`).
    A model that cannot be loaded is a located error at its declaration; an alias of ``models`` the program
    does not declare is an :class:`OptionError`."""
    given = dict(models or {})
    unknown = [a for a in given if a not in program.models]
    if unknown:
        declared = ", ".join(program.models) or "none"
        raise OptionError(f"models= names {unknown[0]!r}, which the program does not declare "
                          f"(declared with model NAME = \"...\": {declared})")
    out = {}
    for alias, spec in program.models.items():
        if alias in given:
            out[alias] = given[alias]
            continue
        try:
            out[alias] = get_model(spec.name)
        except Exception as exc:  # noqa: BLE001 - not found, unreadable, unsupported: located at the line
            raise lowering_error(program, spec.span, f"cannot load the model {spec.name!r} of '{alias}': "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                 'a registered name (lmprog models lists them), a .gguf file or a Hugging Face '
                                 'model folder') from None
    return out


def _scorers(lm, judges: Mapping[str, Any]) -> dict:
    """What ``logprob_of`` scores with: ``{None: the program's model, alias: each declared model}``."""
    from lmprog.backends.scoring import scorer_for

    return {None: scorer_for(lm), **{alias: scorer_for(m) for alias, m in judges.items()}}


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
        raise _unknown_strategy(name)
    return int(_given_args(program, name).get("max_tokens", STRATEGIES[name].defaults()["max_tokens"]))


def _unknown_strategy(name) -> OptionError:
    return OptionError(f"unknown strategy {name!r}" + suggestion(str(name), STRATEGIES) + "; valid: "
                       + ", ".join(STRATEGIES))


def build_strategy(program, lowered, *, strategy=None, particles: Optional[int] = None,
                   max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                   enumerate_holes: Optional[bool] = None) -> Strategy:
    """The engine strategy: the program's ``infer`` (or ``strategy``: a name, or a Strategy object), with
    ``particles`` / ``max_tokens`` / ``temperature`` / ``enumerate_holes`` (its ``enumerate`` option) overriding
    its arguments; ``score=``/``key=`` expressions
    become callables on the lowered program's samples."""
    if isinstance(strategy, Strategy):
        st = strategy
    else:
        name = _strategy_name(program, strategy)
        cls = STRATEGIES.get(name)
        if cls is None:
            raise _unknown_strategy(name)
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
    st = st.with_options(max_tokens=max_tokens, temperature=temperature, enumerate=enumerate_holes)
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
    """The run's seed: ``seed`` (already checked by :func:`check_options`), else the program's
    ``infer ...(seed=N)`` (checked here, located at the ``infer`` line), else 0."""
    if seed is not None:
        return int(seed)
    spec = program.strategy
    value = spec.args.get("seed", 0) if spec is not None else 0
    problem = _seed_problem(value)
    if problem:
        raise lowering_error(program, spec.span, problem, "the same seed and options give the same result")
    return int(value)


def _seed_problem(value) -> Optional[str]:
    lo, hi = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return f"seed must be an integer from {lo} to 2**32-1, not {value!r}"
    if not lo <= int(value) <= hi:
        return f"seed must be from {lo} to 2**32-1 ({hi}), not {value}"
    return None


# ------------------------------------------------------------------------------------------ checking a run


def check_options(program, *, particles=None, seed=None, strategy=None, max_tokens=None, temperature=None,
                  host_timeout=None, model=None, lm=None, progress=None) -> None:
    """Raise :class:`OptionError` for the first bad option of a run, naming it and what is valid. Numbers are
    checked against the catalog's parameters (:func:`lmprog.compiler.check_args.value_problem`, as the
    checker checks an ``infer`` line): ``particles=2.5`` is refused, never truncated."""
    if strategy is not None and not isinstance(strategy, (str, Strategy)):
        raise OptionError(f"strategy must be a strategy name ({', '.join(STRATEGIES)}) or a Strategy object, "
                          f"not {type(strategy).__name__} {strategy!r}")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise _unknown_strategy(strategy)
    name = strategy.name if isinstance(strategy, Strategy) else _strategy_name(program, strategy)
    if particles is not None:
        spec = CATALOG.get(name)
        if isinstance(strategy, Strategy):
            if getattr(strategy, "particle_arg", None) is None:
                raise OptionError(f"particles= does not apply to {name}: it has no particle count")
            param = Param("particles", "int", low=1)
        elif spec is None or spec.particle_arg is None:
            raise OptionError(f"particles= does not apply to {name}(): it has no particle count",)
        else:
            param = next(p for p in spec.params if p.name == spec.particle_arg)
        _check_value(Param("particles", param.type, low=param.low), particles,
                     f" (it sets {name}'s {param.name})" if param.name != "particles" else "")
    common = {p.name: p for p in COMMON_OPTIONS}
    if max_tokens is not None:
        _check_value(common["max_tokens"], max_tokens)
    if temperature is not None:
        _check_value(common["temperature"], temperature)
    if seed is not None:
        problem = _seed_problem(seed)
        if problem:
            raise OptionError(problem)
    if host_timeout is not None:
        if isinstance(host_timeout, bool) or not isinstance(host_timeout, (int, float, np.integer, np.floating)) \
                or math.isnan(float(host_timeout)) or host_timeout < 0:
            raise OptionError(f"host_timeout must be a number of seconds >= 0 (0: no limit), not {host_timeout!r}")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise OptionError(f"model must be a model name or a path, not {type(model).__name__} {model!r}")
    if lm is not None and not (hasattr(lm, "tokenizer") and hasattr(lm, "vocab_size")):
        raise OptionError(f"lm must be a loaded language model (lmprog.backends.load_model(...)), "
                          f"not {type(lm).__name__}")
    if progress is not None and not callable(progress):
        raise OptionError(f"progress must be a callable, not {type(progress).__name__}")


def _check_value(param: Param, value, note: str = "") -> None:
    if isinstance(value, (np.integer, np.floating)) and not isinstance(value, np.bool_):
        value = value.item()
    problem = value_problem(param, value)
    if problem:
        raise OptionError(problem + note)


def _resolve(program, given: Mapping[str, Any], from_text: bool) -> dict[str, Any]:
    """``resolve_inputs`` plus what JSON cannot hold: a NaN or infinite number anywhere in an input (given or
    a default) is a located error at its ``input`` statement (``float(10**400)`` too, which overflows)."""
    diags = []
    for name, spec in program.inputs.items():
        if name in given and spec.type == "float" and isinstance(given[name], int) and \
                not isinstance(given[name], bool) and abs(given[name]) > 1.7e308:
            diags.append(diagnostic(program, spec.span, f"bad value for input '{name}' (float): "
                                    f"an integer of {len(str(abs(given[name])))} digits is too large for a float"))
    if diags:
        raise LoweringError(diags)
    values = resolve_inputs(program, given, from_text=from_text)
    for name, value in values.items():
        bad = _non_finite(value)
        if bad is not None:
            spec = program.inputs[name]
            diags.append(diagnostic(program, spec.span, f"bad value for input '{name}' ({spec.type}): "
                                    f"{bad} is not a finite number",
                                    "inputs must be finite numbers (JSON has no NaN or Infinity)"))
    if diags:
        raise LoweringError(diags)
    return values


def _non_finite(value) -> Optional[str]:
    """``'nan'`` / ``'inf'`` / ``'-inf'`` if ``value`` (or anything in its lists and dicts) is not finite."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
            return repr(float(v))
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return None


def check_context(program, values: Mapping[str, Any], lm) -> None:
    """Refuse, before lowering, a program whose unrolled loops need more tokens than the model reads: each
    hole generates at least one token (its terminator, or EOS), so the holes the loops unroll into are a
    lower bound on the context the run needs. (Lowering such a program would take minutes and allocate a
    token table per hole before the engine found out.) Raises a :class:`LoweringError` located at the loop
    that contributes most, naming its bound and how many iterations could fit."""
    limit = getattr(lm, "max_context", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    env = dict(values)
    need, worst = _min_tokens(program.ast.body, env)
    if need <= limit or worst is None:
        return
    loop, times, per = worst
    others = need - times * per
    fit = max(0, (limit - others) // per)
    bound = _loop_bound_text(loop, env)
    raise lowering_error(
        program, loop.span,
        f"this loop runs {times} times{bound} and generates at least {per} token{'s' if per != 1 else ''} per "
        f"iteration (one per hole): the program needs at least {need} tokens, but "
        f"{getattr(lm, 'name', None) or 'the model'} reads at most {limit}",
        f"at most {fit} iterations fit; use a smaller bound")


def _loop_bound_text(loop: A.For, env) -> str:
    """`` (range(n), n = 100000)``: the loop's bound and the inputs it names, for the message."""
    from lmprog.dsl.printer import expr_to_source

    try:
        src = expr_to_source(loop.iter)
    except Exception:  # noqa: BLE001 - a message detail only
        return ""
    names = sorted({n.id for n in A.walk(loop.iter) if isinstance(n, A.Name) and n.id in env})
    shown = ", ".join(f"{n} = {env[n]!r}"[:60] for n in names)
    return f" ({src}{', ' + shown if shown else ''})"


def _min_tokens(body, env) -> tuple[int, Optional[tuple]]:
    """A lower bound on the tokens the statements ``body`` generate (one per hole), and the loop that
    contributes most: ``(For node, iterations, tokens per iteration)``. Loop bounds are evaluated with the
    static values of ``env`` (inputs, static lets); a bound that is not known counts as no iterations."""
    total, worst = 0, None
    for s in body:
        n = 0
        if isinstance(s, A.Template):
            n = sum(_hole_min(h.name, s.where) for h in s.holes)
        elif isinstance(s, A.Gen):
            n = _hole_min(s.name, s.where)
        elif isinstance(s, A.Let):
            try:
                env[s.name] = static_value(s.value, env)
            except (NotStatic, StaticError, Exception):  # noqa: BLE001 - only a lower bound
                env.pop(s.name, None)
        elif isinstance(s, A.If):
            branches = [b.body for b in s.branches] + [s.orelse or ()]
            results = [_min_tokens(b, dict(env)) for b in branches]
            n = min(r[0] for r in results)
        elif isinstance(s, A.For):
            times = _iterations(s, env)
            inner = dict(env)
            inner.pop(s.var, None)
            per, inner_worst = _min_tokens(s.body, inner)
            n = times * per
            if per and (worst is None or n > worst[1] * worst[2]):
                worst = (s, times, per)
            elif inner_worst is not None and (worst is None or inner_worst[1] * inner_worst[2] > worst[1] * worst[2]):
                worst = inner_worst
        total += n
    return total, worst


def _iterations(loop: A.For, env) -> int:
    """How many times ``loop`` runs, if its bound is known from ``env`` (else 0)."""
    try:
        if loop.is_range:
            args = [static_value(a, env) for a in loop.iter.args]
            if not args or len(args) > 3 or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                return 0
            start, stop, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) == 3 else 1)
            if step == 0:
                return 0
            return max(0, -(-(stop - start) // step))  # len(range(...)) without building it
        items = static_value(loop.iter, env)
        return len(items) if isinstance(items, (list, tuple, str, dict)) else 0
    except Exception:  # noqa: BLE001 - not known before the run: no bound
        return 0


def _hole_min(name: str, where) -> int:
    """1, or 0 for a hole whose ``tokens(X)`` bound allows no token at all."""
    if where is None:
        return 1
    for c in A.walk(where):
        if isinstance(c, A.CountBound) and c.kind == "tokens" and c.hole.id == name and isinstance(c.n, A.Int):
            k = c.n.value
            if (c.op == "==" and k <= 0) or (c.op == "<=" and k <= 0) or (c.op == "<" and k <= 1):
                return 0
    return 1


#: Host memory of one returned sample (measured: 1.37 KiB per particle for one hole and three returned values,
#: ``Result.from_inference`` under ``tracemalloc``), plus per engine hole and per byte of text.
HOST_BYTES_PER_SAMPLE = 1536
HOST_BYTES_PER_HOLE = 320


def check_host_memory(low, strategy, memory_limit=None, lm=None) -> None:
    """Refuse a run whose samples cannot be held in host memory: a Result keeps a Python object per particle
    (its values, text and hole log-probabilities), which the device pre-flight (:mod:`lmprog.inference.memory`)
    does not count. When the device is the CPU (``lm`` given), the device's own estimate of the run shares the
    same memory and is added. Raises :class:`~lmprog.inference.memory.MemoryPlanError` saying how many
    particles fit."""
    from lmprog.inference import Hole

    n = int(strategy.num_particles)
    segs = low.program.segments
    holes = sum(1 for s in segs if isinstance(s, Hole))
    tokens = sum(int(s.max_tokens or 0) if getattr(s, "tokens", None) is None else len(s.tokens) for s in segs
                 if not isinstance(s, Hole) and hasattr(s, "max_tokens")) + \
        sum(int(s.max_tokens or 0) for s in segs if isinstance(s, Hole))
    per = HOST_BYTES_PER_SAMPLE + HOST_BYTES_PER_HOLE * holes + 4 * tokens
    need = n * per
    if need < 1 << 30:  # below 1 GiB: not worth reading the system's free memory
        return
    import jax

    limit = int(memory.available_bytes(jax.devices("cpu")[0]) * memory.SAFETY)
    if memory_limit is not None:
        limit = min(limit, memory.parse_size(memory_limit))
    device = 0
    if need <= limit and lm is not None and jax.devices()[0].platform == "cpu":
        # the engine's arrays live in the same memory (its own pre-flight refuses what does not fit there)
        lay = engine.layout(lm, low.program, strategy)
        device = memory.plan(lm, low.program, strategy, 1, lay, engine.FEED_CHUNK, memory_limit).need
    if need + device <= limit:
        return
    fit = max(0, limit - device) // per
    raise memory.MemoryPlanError(
        f"{strategy.name} with {n} particles: its samples need about {need / 2**30:.1f} GiB of host memory "
        f"(about {per / 2**10:.1f} KiB each)" + (f" beside the run's {device / 2**30:.1f} GiB" if device else "")
        + f" and {limit / 2**30:.1f} GiB is available; at most about {fit} particles fit; use fewer particles")


def _lower_row(program, lm, row, *, seed, strategy, particles, max_tokens, temperature, from_text,
               scorers, memory_limit=None, enumerate_holes=None):
    """Resolve a row's inputs, check the context its loops need, lower (``logprob_of`` scored by ``scorers``:
    :func:`_scorers`), build its strategy, check the host memory of its samples. Returns
    ``(values, lowered, strategy, lower_s)``."""
    t0 = time.perf_counter()
    if not isinstance(row, Mapping):
        raise OptionError(f"a batch row must be a mapping of input names to values, not {type(row).__name__}")
    values = _resolve(program, dict(row), from_text)
    check_context(program, values, lm)
    low = lower(program, lm.tokenizer, values, seed=seed,
                default_max_tokens=effective_max_tokens(program, strategy, max_tokens),
                scorers=scorers)
    st = build_strategy(program, low, strategy=strategy, particles=particles, max_tokens=max_tokens,
                        temperature=temperature, enumerate_holes=enumerate_holes)
    check_host_memory(low, st, memory_limit, lm)
    return values, low, st, time.perf_counter() - t0


def _result(raw, low, values, lm, **stats) -> Result:
    return Result.from_inference(raw, low.returns, values, conversation=low.conversation,
                                 constraint_compile_s=low.compile_s,
                                 model=getattr(lm, "name", None) or None, **stats)


def scorer_counts(scorers: Mapping) -> dict:
    """The counters of ``logprob_of``'s scorers (:func:`_scorers`), by model: ``model`` for the program's, else
    the declared alias (a scorer is one per loaded model and process: its counters only grow)."""
    return {("model" if alias is None else alias): sc.counters() for alias, sc in scorers.items()}


def scorer_stats(before: dict, scorers: Mapping, **more) -> Optional[dict]:
    """What ``logprob_of`` cost between ``before`` (:func:`scorer_counts`) and now (``stats.scorer``): per model
    its scoring batches, device calls, distinct requests scored and prefix tokens shared (``more``: added to
    each); ``None`` when nothing was scored."""
    out = {}
    for name, now in scorer_counts(scorers).items():
        delta = {k: v - before.get(name, {}).get(k, 0) for k, v in now.items()}
        if delta["batches"] or delta["rows"]:
            out[name] = {**delta, **more}
    return out or None


def run_program(program, inputs: Mapping[str, Any], *, particles=None, seed=None, strategy=None,
                max_tokens=None, temperature=None, model=None, lm=None, from_text: bool = False,
                progress=None, memory_limit=None, host_timeout=None, devices=None, model_devices=1,
                models=None, enumerate_holes=None) -> Result:
    """Check the options, resolve inputs, load the model, lower, run. ``host_timeout``: seconds each call into
    the user's Python code may take (default 30, 0: no limit). ``devices``: local devices the particles are
    sharded over (default: as many as divide the particle count), ``model_devices``: devices each particle
    shard's weights are split over (:mod:`lmprog.inference.sharding`). ``models``: already loaded second
    models by alias (``model judge = "..."``; the others are loaded once per process).
    ``enumerate_holes``: overrides the strategy's ``enumerate`` option (``True``: small finite holes by exact
    enumeration). Raises OptionError (bad options),
    LoweringError (program/input errors; an :class:`LmpError`), MemoryPlanError (does not fit), RunError /
    InferenceError (runtime failures)."""
    t0 = time.perf_counter()
    check_options(program, particles=particles, seed=seed, strategy=strategy, max_tokens=max_tokens,
                  temperature=temperature, host_timeout=host_timeout, model=model, lm=lm, progress=progress)
    if memory_limit is not None:
        memory.parse_size(memory_limit)  # a ValueError naming the bad size, before the model loads
    check_devices(devices, model_devices)
    seed = _seed(program, seed)
    if lm is None:
        _resolve(program, inputs, from_text)  # input errors before the model loads
        lm = get_model(model or program.model or program.default_model)
    judges = load_models(program, models)
    load_s = time.perf_counter() - t0
    scorers = _scorers(lm, judges)
    scored_before = scorer_counts(scorers)
    values, low, st, lower_s = _lower_row(program, lm, dict(inputs), seed=seed, strategy=strategy,
                                          particles=particles, max_tokens=max_tokens, temperature=temperature,
                                          from_text=from_text, memory_limit=memory_limit, scorers=scorers,
                                          enumerate_holes=enumerate_holes)
    with host_time_limit(host_timeout), sharding.devices(devices, model_devices):
        try:
            raw = engine.run(lm, low.program, st, seed=seed, progress=progress, memory_limit=memory_limit)
            return _result(raw, low, values, lm, lower_s=lower_s, load_s=load_s, wall_s=time.perf_counter() - t0,
                           scorer=scorer_stats(scored_before, scorers))
        except HostAbort as stop:  # user code that must stop the run: its located error
            raise stop.error from None


def run_batch(program, rows, *, particles=None, seed=None, strategy=None, max_tokens=None, temperature=None,
              model=None, lm=None, from_text: bool = False, max_batch_particles: int = MAX_BATCH_PARTICLES,
              progress=None, memory_limit=None, host_timeout=None, devices=None, model_devices=1,
              models=None, enumerate_holes=None) -> list:
    """Run ``program`` once per row of inputs: ``[Result or Exception, ...]`` in input order
    (:func:`iter_batch`, collected)."""
    rows = list(rows)
    out: list = [None] * len(rows)
    for k, outcome in iter_batch(program, rows, particles=particles, seed=seed, strategy=strategy,
                                 max_tokens=max_tokens, temperature=temperature, model=model, lm=lm,
                                 from_text=from_text, max_batch_particles=max_batch_particles, progress=progress,
                                 memory_limit=memory_limit, host_timeout=host_timeout, devices=devices,
                                 model_devices=model_devices, models=models, enumerate_holes=enumerate_holes):
        out[k] = outcome
    return out


def iter_batch(program, rows, *, particles=None, seed=None, strategy=None, max_tokens=None, temperature=None,
               model=None, lm=None, from_text: bool = False, max_batch_particles: int = MAX_BATCH_PARTICLES,
               progress=None, memory_limit=None, host_timeout=None, devices=None,
               model_devices=1, models=None, enumerate_holes=None) -> Iterator[tuple[int, Any]]:
    """Run ``program`` once per row of inputs, yielding ``(row index, Result or Exception)`` as soon as each
    row is done: rows that fail before running (bad inputs) first, then each engine call's rows as the call
    finishes (so a caller can write them at once; the order is not the input order).

    Every row is lowered first; rows with the same structure key (``Lowered.structure_key``) run together as
    groups of one engine call (:func:`lmprog.inference.batch.run_rows`: every row's particles in one batch, one
    compiled kernel, a log Z per row), in calls of equal size (``max_batch_particles`` particles at most; the
    last call padded with a copy of a row, its result dropped). Strategies that are not batchable run the rows
    one after another. A row that fails (bad inputs, every particle dead, a failing expression, user code
    that stops the run) gets its exception and never stops the others: a row that failed inside its call runs
    again alone, so its error is exactly that of a run of its own. ``progress`` is the engine's progress
    callback (:class:`lmprog.inference.Progress`), called for every engine call. ``devices`` /
    ``model_devices``: as for :func:`run_program`, for every engine call.
    """
    t0 = time.perf_counter()
    rows = list(rows)
    check_options(program, particles=particles, seed=seed, strategy=strategy, max_tokens=max_tokens,
                  temperature=temperature, host_timeout=host_timeout, model=model, lm=lm, progress=progress)
    check_devices(devices, model_devices)
    if lm is None:
        lm = get_model(model or program.model or program.default_model)
    seed = _seed(program, seed)
    opts = dict(seed=seed, strategy=strategy, particles=particles, max_tokens=max_tokens, temperature=temperature,
                from_text=from_text, memory_limit=memory_limit, scorers=_scorers(lm, load_models(program, models)),
                enumerate_holes=enumerate_holes)

    lowered: dict[int, tuple] = {}
    for k, row in enumerate(rows):
        try:
            lowered[k] = _lower_row(program, lm, row, **opts)
        except Exception as exc:  # noqa: BLE001 - reported in the row's place
            yield k, exc
    if not lowered:
        return
    st = lowered[next(iter(lowered))][2]
    scorers = opts["scorers"]
    with host_time_limit(host_timeout), sharding.devices(devices, model_devices):
        for chunk, padded in _calls(lowered, st, max_batch_particles):
            programs = [(lowered[k][1].structure_key, lowered[k][1].program) for k in padded]
            scored_before = scorer_counts(scorers)
            try:
                results = run_rows(lm, programs, st, seed=seed, max_batch_particles=max_batch_particles,
                                   progress=progress, memory_limit=memory_limit)[:len(chunk)]
            except HostAbort as stop:  # a row's user code stopped the call: every row of it runs alone
                results = [stop.error] if len(padded) == 1 else [None] * len(chunk)
            wall = time.perf_counter() - t0
            # the rows of one engine call share its host steps, hence their scoring batches
            scored = scorer_stats(scored_before, scorers, rows_sharing=len(padded))
            for k, raw in zip(chunk, results):
                values, low, _, lower_s = lowered[k]
                try:
                    if raw is None:  # failed inside its batch: a run of its own reports its error exactly
                        raw = engine.run(lm, low.program, st, seed=seed, progress=progress, memory_limit=memory_limit)
                    elif isinstance(raw, Exception):
                        raise raw
                    outcome = _result(raw, low, values, lm, lower_s=lower_s, wall_s=wall, scorer=scored)
                except HostAbort as stop:
                    outcome = stop.error
                except Exception as exc:  # noqa: BLE001
                    outcome = exc
                yield k, outcome


def check_devices(devices, model_devices=1) -> None:
    """An :class:`OptionError` for a device request this process cannot serve (before the model loads)."""
    try:
        sharding.check_request(devices, model_devices)
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def _calls(lowered: dict, st, max_batch_particles: int) -> Iterator[tuple[list, list]]:
    """The engine calls of a batch: ``(rows, rows padded to the call size)``. Rows of one structure key go in
    calls of equal size (as many as ``max_batch_particles`` needs), the last padded with copies of its first
    row so every call has the same shape (one compiled kernel set); rows of a strategy that is not batchable
    one at a time. (run_rows may still split a call by memory.)"""
    classes: dict = {}
    for k, (_, low, _, _) in lowered.items():
        classes.setdefault(low.structure_key, []).append(k)
    per = max(1, int(max_batch_particles) // max(1, st.num_particles)) if st.batchable else 1
    for members in classes.values():
        size = -(-len(members) // -(-len(members) // min(per, len(members))))
        for c0 in range(0, len(members), size):
            chunk = members[c0:c0 + size]
            yield chunk, chunk + [chunk[0]] * (size - len(chunk))
