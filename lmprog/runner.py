"""Running programs: model cache, strategy construction, lowering + engine run -> :class:`~lmprog.result.Result`.

Used by :meth:`lmprog.program.Program.run` / ``run_batch`` and the ``lmprog run`` / ``lmprog batch`` commands.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import fields, replace
from typing import Any, Callable, Mapping, Optional

from lmprog.compiler.lower import RunError, lower, resolve_inputs
from lmprog.result import Result, ResultSample

__all__ = ["get_model", "build_strategy", "run_program", "run_batch"]

# LANGUAGE.md's first argument of each strategy: what ``particles=`` overrides.
PARTICLE_ARG = {"sample": "n", "importance": "particles", "smc": "particles", "beam": "width", "best_of": "n",
                "vote": "n", "mcmc": "chains", "particle_gibbs": "particles"}


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
        cls = STRATEGIES[name]
        args = {k: v for k, v in strategy_defaults(name).items() if v is not None}
        args.update(given)
        seed = args.pop("seed", None) if "seed" in given else None
        args.pop("seed", None)
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
    for k in ("vote", "winner", "rejuvenation"):
        if k in raw.extra:
            extra[k] = raw.extra[k]
    if "chains" in raw.extra:  # MCMC: convergence diagnostics of the returned values
        from lmprog.inference.mcmc import diagnostics

        extra["mcmc"] = diagnostics(raw, key=lambda s: _diagnostic_key(lowered.returns(s)))
    return Result(raw.strategy, bool(raw.properly_weighted), samples, posterior,
                  raw.log_evidence if raw.properly_weighted else None, ess, stats, dict(inputs), extra, raw)


def _diagnostic_key(values):
    """A returned value as R-hat/ESS see it: a lone number as a number, anything else as a category."""
    if isinstance(values, dict) and len(values) == 1:
        (v,) = values.values()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return values
    return json.dumps(values, sort_keys=True, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ batches

# Rows per engine call are limited so that rows x particles stays within this many particles.
MAX_BATCH_PARTICLES = 4096


def run_batch(program, rows, *, particles=None, seed=None, strategy=None, max_tokens=None, temperature=None,
              model=None, lm=None, from_text: bool = False, max_batch_particles: int = MAX_BATCH_PARTICLES,
              progress=None) -> list:
    """Run ``program`` once per row of inputs: ``[Result or Exception, ...]`` in input order.

    Rows whose lowerings have the same structure (segment kinds, holes, constraint automata) run together in
    one engine call with ``groups = rows`` (every row's particles in one batch, one compiled kernel, a log Z per
    row); static text that differs between rows is rendered per row (the engine prefills a row's own prompt
    text once and broadcasts it to the row's particles). More rows than ``max_batch_particles`` allows run in
    several calls of equal size (the last one padded with a copy of one of its rows, its result dropped), so
    they share one compiled kernel set. Strategies that run a single group (``best_of``, ``vote``, ``beam``)
    and rows that differ in structure run one after another. A row that fails (bad inputs, every particle
    dead, a failing expression) gets its exception and never stops the others. ``progress`` is the engine's
    progress callback (:class:`lmprog.inference.Progress`), called for every engine call.
    """
    from lmprog.inference.strategies import MCMC, BestOf, ParticleGibbs, Vote

    rows = list(rows)
    out: list = [None] * len(rows)
    if lm is None:
        lm = get_model(model or program.model or program.default_model)
    if seed is None:
        spec = program.strategy
        seed = int(spec.args.get("seed", 0)) if spec is not None else 0
    opts = dict(particles=particles, seed=seed, strategy=strategy, max_tokens=max_tokens, temperature=temperature,
                lm=lm, from_text=from_text, progress=progress)

    def single(k):
        try:
            row = rows[k]
            if not isinstance(row, Mapping):
                raise TypeError(f"a batch row must be a mapping of input names to values, not {type(row).__name__}")
            out[k] = run_program(program, dict(row), **opts)
        except Exception as exc:  # noqa: BLE001 - reported in the row's place
            out[k] = exc

    # lower every row; rows that fail here get their error now
    lowered: dict[int, tuple] = {}
    for k, row in enumerate(rows):
        t0 = time.perf_counter()
        try:
            if not isinstance(row, Mapping):
                raise TypeError(f"a batch row must be a mapping of input names to values, not {type(row).__name__}")
            values = resolve_inputs(program, dict(row), from_text=from_text)
            low = lower(program, lm.tokenizer, values, seed=seed, default_max_tokens=max_tokens or 256)
            st, _ = build_strategy(program, low, strategy=strategy, particles=particles, max_tokens=max_tokens,
                                   temperature=temperature)
        except Exception as exc:  # noqa: BLE001
            out[k] = exc
            continue
        lowered[k] = (values, low, st, time.perf_counter() - t0)

    if not lowered:
        return out
    st0 = next(iter(lowered.values()))[2]
    # MCMC keeps per-chain histories and host snapshots per particle: rows run one after another.
    batchable = not isinstance(st0, (BestOf, Vote, MCMC, ParticleGibbs)) and not getattr(st0, "rejuvenate", 0)
    if batchable:
        try:
            st0.kernel_config(groups=2)
        except ValueError:
            batchable = False
    if not batchable:
        for k in lowered:
            single(k)
        return out

    # group rows by structure, then run each class in equal chunks of at most max_batch_particles particles
    classes: list[list[int]] = []
    for k, (_, low, _, _) in lowered.items():
        for cls in classes:
            if _same_structure(lowered[cls[0]][1].program, low.program):
                cls.append(k)
                break
        else:
            classes.append([k])
    per = max(1, int(max_batch_particles) // max(1, st0.num_particles))
    for cls in classes:
        size = -(-len(cls) // -(-len(cls) // per))  # rows per call: as many calls as needed, all the same size
        for c0 in range(0, len(cls), size):
            chunk = cls[c0:c0 + size]
            if size == 1:
                single(chunk[0])
                continue
            items = [lowered[k] for k in chunk]
            items += [items[0]] * (size - len(chunk))  # same batch shape as the other calls: no new compile
            try:
                results = _run_grouped(lm, items, st0, int(seed), progress)[:len(chunk)]
            except Exception:  # noqa: BLE001 - e.g. every particle of every row died: run the rows alone
                results = [None] * len(chunk)
            for k, res in zip(chunk, results):
                if res is None:  # this row failed inside the batch: a run of its own reports its error exactly
                    single(k)
                else:
                    out[k] = res
    return out


def _same_structure(a, b) -> bool:
    """Whether two segment programs can run as groups of one batch: the same segments (kinds, holes with the
    same names, budgets and starts) and the same token table."""
    import jax
    import numpy as np

    from lmprog.inference import Hole, Host, Observe, Text

    if len(a.segments) != len(b.segments):
        return False
    for x, y in zip(a.segments, b.segments):
        if type(x) is not type(y):
            return False
        if isinstance(x, Hole):
            if (x.name, x.max_tokens, x.value) != (y.name, y.max_tokens, y.value):
                return False
            if callable(x.start) != callable(y.start) or (not callable(x.start) and x.start != y.start):
                return False
        elif isinstance(x, (Text, Observe, Host)):
            pass
    la, lb = jax.tree_util.tree_leaves(a.table), jax.tree_util.tree_leaves(b.table)
    if len(la) != len(lb):
        return False
    for u, v in zip(la, lb):
        if u is v:
            continue
        u, v = np.asarray(u), np.asarray(v)
        if u.shape != v.shape or u.dtype != v.dtype or not np.array_equal(u, v):
            return False
    return True


def _sub_view(view, a: int, b: int):
    """The host view of particles ``a:b`` (one row's group); ``data`` dicts are shared, so writes go through."""
    from dataclasses import fields as dc_fields

    kw = {}
    for f in dc_fields(view):
        v = getattr(view, f.name)
        if f.name == "_values":
            kw[f.name] = None
        elif f.name in ("tokens", "spans", "alive", "data") or (f.name == "hole_logprobs" and v is not None):
            kw[f.name] = v[a:b]
    return replace(view, **kw)


def _combine(programs, n: int, tokenizer, failed: list):
    """One segment program running ``programs[g]`` on particles ``g*n:(g+1)*n``. Errors of a row's callables
    are recorded in ``failed[g]`` (its particles die) instead of stopping the batch."""
    import math

    import numpy as np

    from lmprog.inference import Hole, Host, Observe, SegmentProgram, Text

    G = len(programs)
    rng = [(g * n, (g + 1) * n) for g in range(G)]

    def per_row(fn, view, on_error):
        parts = []
        for g, (a, b) in enumerate(rng):
            if failed[g] is None:
                try:
                    parts.append(fn(g, _sub_view(view, a, b)))
                    continue
                except Exception as exc:  # noqa: BLE001
                    failed[g] = exc
            parts.append(on_error(b - a))
        return parts

    segs = []
    for j, first in enumerate(programs[0].segments):
        col = [p.segments[j] for p in programs]
        if isinstance(first, (Text, Observe)):
            cls = type(first)
            if all(s.tokens is not None for s in col):
                toks = [list(s.tokens) for s in col]
                if all(t == toks[0] for t in toks):
                    segs.append(first)
                    continue
                # the common token prefix stays static (a shared prompt prefix is prefilled once)
                common = 0
                while all(len(t) > common and t[common] == toks[0][common] for t in toks):
                    common += 1
                if common:
                    segs.append(cls(tokens=tuple(toks[0][:common]), label=first.label))
                rest = [t[common:] for t in toks]
                segs.append(cls(render=lambda view, rest=rest: [rest[i // n] for i in range(len(view))],
                                max_tokens=max(len(t) for t in rest), label=first.label))
                continue
            bound = max(len(s.tokens) if s.tokens is not None else int(s.max_tokens) for s in col)

            def render(view, col=col):
                def one(g, sub):
                    s = col[g]
                    return [list(s.tokens)] * len(sub) if s.tokens is not None else s.render(sub)
                return [r for part in per_row(one, view, lambda m: [[]] * m) for r in part]

            segs.append(cls(render=render, max_tokens=bound, label=first.label))
        elif isinstance(first, Hole):
            def row_start(view, col=col):
                parts = per_row(lambda g, sub: np.asarray(col[g].start(sub), np.int64).reshape(-1), view,
                                lambda m: np.full(m, -1, np.int64))
                return np.concatenate(parts)

            def row_prefix_check(view, col=col):  # a row's predicate may depend on its inputs: each row its own
                parts = per_row(lambda g, sub: np.asarray(col[g].prefix_check(sub), bool).reshape(-1), view,
                                lambda m: np.ones(m, bool))
                return np.concatenate(parts)

            segs.append(replace(first, start=row_start if callable(first.start) else first.start,
                                prefix_check=None if first.prefix_check is None else row_prefix_check))
        else:
            def host(view, col=col):
                def one(g, sub):
                    inc = col[g].fn(sub)
                    return np.zeros(len(sub)) if inc is None else np.asarray(inc, np.float64).reshape(-1)
                return np.concatenate(per_row(one, view, lambda m: np.full(m, -math.inf)))

            segs.append(Host(host, first.label))
    return SegmentProgram(segs, programs[0].table)


def _run_grouped(lm, items, st, seed: int, progress=None) -> list:
    """Run the lowered rows ``items`` ((values, lowered, strategy, lower_s) each) as groups of one engine call.
    Returns one Result per row, or None for a row that failed (every particle dead, a failing callable)."""
    import numpy as np

    from lmprog.inference import run as engine_run

    t0 = time.perf_counter()
    G = len(items)
    n = st.num_particles
    failed: list = [None] * G
    prog = _combine([low.program for _, low, _, _ in items], n, lm.tokenizer, failed)
    raw = engine_run(lm, prog, st, seed=seed, groups=G, progress=progress)
    wall = time.perf_counter() - t0
    out = []
    for g, (values, low, _, lower_s) in enumerate(items):
        sl = slice(g, g + 1)
        part = replace(
            raw, tokens=raw.tokens[sl], lengths=raw.lengths[sl], spans=raw.spans[sl],
            log_weights=raw.log_weights[sl], scores=raw.scores[sl], causes=raw.causes[sl],
            hole_logprobs=raw.hole_logprobs[sl], log_z=None if raw.log_z is None else raw.log_z[sl],
            ess=raw.ess[:, sl], resampled=raw.resampled[:, sl], data=[raw.data[g]] if raw.data else [],
            stats=dict(raw.stats, groups=1, batch_rows=G), extra=dict(raw.extra), _samples={})
        if failed[g] is not None or not np.any(part.causes == 0):
            out.append(None)
            continue
        res = make_result(part, low, values, lower_s=lower_s, wall_s=wall, model=getattr(lm, "name", None))
        res.stats["batch_rows"] = G
        out.append(res)
    return out
