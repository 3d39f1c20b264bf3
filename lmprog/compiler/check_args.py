"""Arguments of ``infer STRATEGY(...)`` and ``sample NAME ~ DIST(...)``: names, arity, types and ranges.

Both bind positional arguments to the callee's parameters in order and keyword arguments by name (as Python
does), then check every value that is known before the run against the parameter's type and range. Strategy
options must be literals (the CLI and the API override them, so they must not depend on the program); the
``score=`` / ``key=`` expressions of ``best_of`` / ``vote`` are ordinary expressions checked against the names the
program defines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from lmprog.compiler.check_env import UNKNOWN, CheckContext, Env, show_value
from lmprog.dsl import ast as A
from lmprog.catalog import CATALOG, Param
from lmprog.dsl.catalog import DISTRIBUTIONS
from lmprog.dsl.errors import one_of, suggestion
from lmprog.dsl.source import Span
from lmprog.dsl.static import NotStatic, StaticError, static_value


@dataclass(frozen=True)
class StrategySpec:
    """The checked ``infer`` statement: strategy name and the arguments the program gave.

    ``args`` maps parameter names to Python values (numbers, strings) or, for ``expr`` parameters
    (``score``, ``key``), to the AST expression. Parameters the program did not give are absent; their defaults
    are :meth:`lmprog.catalog.StrategySpec.defaults`.
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    span: Optional[Span] = None

    @property
    def properly_weighted(self) -> bool:
        return CATALOG[self.name].properly_weighted


def bind_params(ck: CheckContext, callee: str, params: tuple[Param, ...], args: tuple[A.Expr, ...],
                kwargs: tuple[A.Keyword, ...], span: Span, positional: int) -> dict[str, A.Expr]:
    """Match arguments to parameters (the first ``positional`` parameters may be given by position).

    Reports too many positional arguments, unknown / repeated keywords and missing required parameters;
    returns the name -> expression mapping of the arguments that could be matched.
    """
    names = [p.name for p in params]
    bound: dict[str, A.Expr] = {}
    if len(args) > positional:
        extra = args[positional]
        ck.error(extra.span, f"{callee}() takes at most {positional} positional argument"
                 f"{'s' if positional != 1 else ''} ({len(args)} given)",
                 f"{callee}() accepts: {', '.join(names)}" if names else f"{callee}() takes no arguments")
    for p, value in zip(params, args[:positional]):
        bound[p.name] = value
    for kw in kwargs:
        if kw.name not in names:
            ck.error(kw.name_span, f"{callee}() has no parameter '{kw.name}'" + suggestion(kw.name, names),
                     f"{callee}() accepts: {', '.join(names)}" if names else f"{callee}() takes no arguments")
        elif kw.name in bound:
            ck.error(kw.name_span, f"{callee}() got two values for '{kw.name}'")
        else:
            bound[kw.name] = kw.value
    for p in params:
        if p.required and p.name not in bound:
            ck.error(span, f"{callee}() is missing its argument '{p.name}'",
                     f"write {callee}({', '.join(q.name + '=...' for q in params if q.required)})")
    return bound


def value_problem(param: Param, value: Any) -> Optional[str]:
    """Why ``value`` is not valid for ``param`` (None if it is)."""
    t = param.type
    if t == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{param.name} must be an integer, not {show_value(value)}"
    if t == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{param.name} must be a number, not {show_value(value)}"
    if t == "str" and not isinstance(value, str):
        return f"{param.name} must be a string, not {show_value(value)}"
    if t == "list" and not isinstance(value, list):
        return f"{param.name} must be a list, not {show_value(value)}"
    if t == "bool" and not isinstance(value, bool):
        return f"{param.name} must be true or false, not {show_value(value)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{param.name} must be finite, not {show_value(value)}"
        if param.low is not None and (value < param.low or (param.open_low and value == param.low)):
            if param.high is not None:
                return f"{param.name} must be between {_num(param.low)} and {_num(param.high)}, not {show_value(value)}"
            relation = "greater than" if param.open_low else "at least"
            return f"{param.name} must be {relation} {_num(param.low)}, not {show_value(value)}"
        if param.high is not None and value > param.high:
            return f"{param.name} must be between {_num(param.low)} and {_num(param.high)}, not {show_value(value)}"
    if param.choices and value not in param.choices:
        return (f"{param.name} must be {one_of([repr(c) for c in param.choices])}, not {show_value(value)}"
                + suggestion(str(value), param.choices).replace("'", '"'))
    return None


def _num(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else str(x)


# ----------------------------------------------------------------------------------------------------- infer


def check_infer(ck: CheckContext, stmt: A.InferStmt, env: Env) -> Optional[StrategySpec]:
    """Check an ``infer`` statement (``env``: the names defined at the end of the program)."""
    if stmt.strategy not in CATALOG:
        ck.error(stmt.name_span, f"unknown strategy '{stmt.strategy}'" + suggestion(stmt.strategy, CATALOG),
                 "strategies: " + ", ".join(CATALOG))
        return None
    own = CATALOG[stmt.strategy].params
    params = CATALOG[stmt.strategy].all_params
    bound = bind_params(ck, stmt.strategy, params, stmt.args, stmt.kwargs, stmt.span, len(own))
    values: dict[str, Any] = {}
    by_name = {p.name: p for p in params}
    for name, expr in bound.items():
        param = by_name[name]
        if param.type == "expr":
            ck.expr(expr, env)
            values[name] = expr
            continue
        try:
            value = static_value(expr)
        except NotStatic:
            ck.error(expr.span, f"the strategy option {name} must be a literal",
                     "the CLI and the API override strategy options; use a number or a string here")
            continue
        except StaticError as exc:
            ck.error(expr.span, f"cannot evaluate {name}: {exc}")
            continue
        problem = value_problem(param, value)
        if problem:
            ck.error(expr.span, problem)
            continue
        values[name] = float(value) if param.type == "float" else value
    _check_strategy_relations(ck, stmt.strategy, bound, values)
    return StrategySpec(stmt.strategy, values, stmt.span)


def _check_strategy_relations(ck: CheckContext, strategy: str, bound: dict[str, A.Expr],
                              values: dict[str, Any]) -> None:
    """Relations between strategy arguments (each one alone was checked against its own range)."""
    if strategy == "mcmc" and "burn_in" in values:
        steps = values.get("steps", 100)
        if values["burn_in"] >= steps:
            ck.error(bound["burn_in"].span, f"burn_in must be less than steps ({steps}): every state would be dropped",
                     f"keep at most {steps - 1} burn-in steps, or raise steps")
    if strategy == "smc" and values.get("lookahead") and values.get("rejuvenate"):
        ck.error(bound["lookahead"].span, "lookahead does not combine with rejuvenate: the MCMC moves would cut "
                 "twisted trajectories (lmprog/inference/lookahead.py)", "use one of lookahead=k or rejuvenate=K")
    if strategy == "particle_gibbs" and values.get("particles") == 1:
        ck.error(bound["particles"].span, "particle_gibbs needs at least 2 particles: one of them is the reference")


# ---------------------------------------------------------------------------------------------- distributions


def check_sample(ck: CheckContext, stmt: A.SampleStmt, env: Env) -> str:
    """Check ``sample x ~ dist(...)``; returns the sampled value's type."""
    for e in (*stmt.args, *(k.value for k in stmt.kwargs)):
        ck.expr(e, env)
    dist = DISTRIBUTIONS.get(stmt.dist)
    if dist is None:
        ck.error(stmt.dist_span, f"unknown distribution '{stmt.dist}'" + suggestion(stmt.dist, DISTRIBUTIONS),
                 "distributions: " + ", ".join(f"{d.name}({', '.join(p.name for p in d.params)})"
                                               for d in DISTRIBUTIONS.values()))
        return "any"
    bound = bind_params(ck, stmt.dist, dist.params, stmt.args, stmt.kwargs, stmt.span, len(dist.params))
    values = {}
    by_name = {p.name: p for p in dist.params}
    for name, expr in bound.items():
        value = ck.fold(expr, env)
        if value is UNKNOWN:
            continue
        problem = value_problem(by_name[name], value)
        if problem:
            ck.error(expr.span, problem)
        else:
            values[name] = value
    _check_dist_values(ck, stmt, bound, values)
    if dist.returns == "element":
        items = values.get("items")
        kinds = {type(v).__name__ for v in items} if isinstance(items, list) else set()
        return kinds.pop() if len(kinds) == 1 and kinds <= {"str", "int", "float", "bool", "list", "dict"} else "any"
    return dist.returns


def _check_dist_values(ck: CheckContext, stmt: A.SampleStmt, bound: dict[str, A.Expr], values: dict[str, Any]) -> None:
    """Relations between arguments that are known before the run."""
    items, probs = values.get("items"), values.get("probs")
    if isinstance(items, list) and not items:
        ck.error(bound["items"].span, "choice() needs at least one item")
    if isinstance(probs, list):
        if any(not isinstance(p, (int, float)) or isinstance(p, bool) for p in probs):
            ck.error(bound["probs"].span, "probs must be a list of numbers")
        elif any(p < 0 or not math.isfinite(p) for p in probs):
            ck.error(bound["probs"].span, "probs must not be negative")
        elif not probs or sum(probs) <= 0:
            ck.error(bound["probs"].span, "probs must have a positive total")
        elif isinstance(items, list) and items and len(items) != len(probs):
            ck.error(bound["probs"].span, f"probs has {len(probs)} entr{'y' if len(probs) == 1 else 'ies'} but there are {len(items)} items")
    lo, hi = values.get("lo"), values.get("hi")
    if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
        ck.error(stmt.span, f"uniform_int(lo, hi) needs lo <= hi (got {lo} > {hi})")

