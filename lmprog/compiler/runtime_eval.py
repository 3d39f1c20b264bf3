"""Run-time evaluation: the values of the program's names and expressions for one particle during the run.

The lowering resolves names through *references* (:class:`Ref`): a static value, a hole's value, a
per-particle host value (``view.data``), a list of references (loops), or a per-particle branch choice (after
an ``if``). At run time an expression is evaluated for particle ``i`` of a host view (:func:`eval_for`) or of a
finished sample, with Python semantics (:class:`RunEvaluator`) and the run-time built-ins: ``tokens`` (the
model's tokenizer), ``logprob`` (of the holes completed so far), and the Python callables of the program
(:class:`Runtime`: ``functions=`` callables and ``import "file.py" as h`` modules).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from lmprog.compiler.errors import lowering_error
from lmprog.dsl import ast as A
from lmprog.dsl.static import PURE_BUILTINS, Evaluator, StaticError

__all__ = ["ParticleContext", "Ref", "RunEvaluator", "Runtime", "active", "guarded_ref", "hole_names",
           "resolve", "static_ref", "to_text", "view_logprobs"]


# --------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Ref:
    """How a name's value is found for particle ``i``: ``kind`` static / hole / data / list / branch."""

    kind: str
    value: Any = None  # static value, hole name, data key, list of refs, (branch key, {index: ref}, default)


def static_ref(v) -> Ref:
    """A reference to a value known before the run."""
    return Ref("static", v)


def guarded_ref(guard: tuple, inside: Ref, outside: Ref) -> Ref:
    """A name bound inside the branches ``guard`` (``((if key, branch index), ...)``, outermost first):
    ``inside`` for the particles that took every branch of it, ``outside`` (the previous binding) for the
    others."""
    ref = inside
    for key, idx in reversed(guard):
        ref = Ref("branch", (key, {idx: ref}, outside))
    return ref


class ParticleContext:
    """Per particle: hole values, host data and (after the run) hole log-probabilities."""

    __slots__ = ("values", "data", "logprobs")

    def __init__(self, values, data, logprobs=None):
        self.values, self.data, self.logprobs = values, data, logprobs


def view_logprobs(view, i: int) -> Optional[dict[str, float]]:
    """``{hole name: log-probability}`` of the holes particle ``i`` of a host view has completed so far."""
    lp = getattr(view, "hole_logprobs", None)
    if lp is None:
        return None
    done = view.spans[i]
    return {name: float(lp[i, h]) for h, name in enumerate(view.holes) if name in done}


def resolve(ref: Ref, ctx: ParticleContext) -> Any:
    """The value of ``ref`` for one particle."""
    k = ref.kind
    if k == "static":
        return ref.value
    if k == "hole":
        return ctx.values.get(ref.value)
    if k == "data":
        return ctx.data.get(ref.value)
    if k == "list":
        return [resolve(r, ctx) for r in ref.value]
    if k == "branch":
        key, options, default = ref.value
        chosen = options.get(ctx.data.get(key, -1), default)
        return None if chosen is None else resolve(chosen, ctx)
    raise AssertionError(k)


def hole_names(ref: Ref) -> list[str]:
    """The engine holes a reference may read (``logprob(X)`` sums their log-probabilities)."""
    if ref.kind == "hole":
        return [ref.value]
    if ref.kind == "list":
        return [n for r in ref.value for n in hole_names(r)]
    if ref.kind == "branch":
        _, options, default = ref.value
        refs = list(options.values()) + ([default] if default is not None else [])
        return [n for r in refs for n in hole_names(r)]
    return []


def active(guard: tuple, view) -> np.ndarray:
    """``[P] bool``: the particles alive and inside every enclosing branch of ``guard``."""
    ok = np.asarray(view.alive, bool).copy()
    for key, idx in guard:
        ok &= np.array([d.get(key, -1) == idx for d in view.data], bool)
    return ok


def to_text(v) -> str:
    """A value interpolated into text: booleans as the language writes them, ``None`` as nothing."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    return str(v)


# --------------------------------------------------------------------------------------------- the runtime


class Runtime:
    """What expressions evaluated during the run can use besides their names: ``functions=`` callables (by
    bare name), the program's imported modules (``import "helpers.py" as h``, loaded once, relative to the
    program's file) and the model's tokenizer (``tokens(X)``)."""

    def __init__(self, program, tokenizer):
        self.program = program
        self.tokenizer = tokenizer
        self.functions = dict(program.functions)
        self.modules: dict[str, Any] = {}

    def count_tokens(self, text: str) -> int:
        """``tokens(text)``: its token count (no BOS)."""
        return len(self.tokenizer.encode(text, add_bos=False))

    def callable_of(self, f: A.Expr):
        """The Python callable ``f`` names: a ``functions=`` callable or ``alias.name`` of an import."""
        if isinstance(f, A.Name) and f.id in self.functions:
            return self.functions[f.id]
        if isinstance(f, A.Attribute) and isinstance(f.value, A.Name):
            mod = self.module(f.value.id, f.span)
            fn = getattr(mod, f.attr, None)
            if fn is None or not callable(fn):
                raise StaticError(f"{f.value.id}.{f.attr} is not a function")
            return fn
        raise StaticError("not a callable")

    def module(self, alias: str, span=None):
        """The module imported as ``alias`` (loaded on first use; a failing import is a located
        :class:`~lmprog.compiler.errors.LoweringError`)."""
        if alias in self.modules:
            return self.modules[alias]
        p = self.program
        spec = p.imports.get(alias)
        if spec is None:
            raise StaticError(f"no import named '{alias}'")
        path = Path(spec.path)
        if not path.is_absolute():
            named = p.filename and not p.filename.startswith("<")
            base = Path(p.filename).parent if named else Path.cwd()
            path = base / path
        name = f"lmprog_import_{alias}_{abs(hash(str(path)))}"
        try:
            mspec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[name] = mod
            mspec.loader.exec_module(mod)
        except Exception as exc:
            raise lowering_error(p, spec.span, f"importing {spec.path} failed: {type(exc).__name__}: {exc}") from None
        self.modules[alias] = mod
        return mod

    def evaluate(self, expr: A.Expr, scope: Mapping[str, Ref], ctx: ParticleContext) -> Any:
        """The value of ``expr`` for the particle ``ctx``, names resolved through ``scope``."""
        return RunEvaluator(scope, ctx, self).eval(expr)

    def eval_for(self, expr: A.Expr, scope: Mapping[str, Ref], view, i: int) -> Any:
        """The value of ``expr`` for particle ``i`` of a host view."""
        ctx = ParticleContext(view.values[i], view.data[i], view_logprobs(view, i))
        return self.evaluate(expr, scope, ctx)


# ----------------------------------------------------------------------------------------------- evaluator


class RunEvaluator(Evaluator):
    """Python semantics for one particle (names resolved through references), with the run-time built-ins:
    ``tokens`` (the model's tokenizer), ``logprob`` (of the holes completed so far), imported and ``functions=``
    callables."""

    def __init__(self, scope: Mapping[str, Ref], ctx: ParticleContext, runtime: Runtime):
        super().__init__({})
        self.scope, self.ctx, self.runtime = scope, ctx, runtime

    def _Name(self, e: A.Name):
        ref = self.scope.get(e.id)
        if ref is None:
            if e.id in self.runtime.functions:
                return self.runtime.functions[e.id]
            raise StaticError(f"name '{e.id}' has no value here")
        return resolve(ref, self.ctx)

    def _Compare(self, e: A.Compare):
        if "matches" not in e.ops:
            return super()._Compare(e)
        left = self.eval(e.left)
        for op, right_e in zip(e.ops, e.comparators):
            right = self.eval(right_e)
            if op == "matches":
                ok = re.fullmatch(right, left) is not None
            elif op == "in":
                ok = left in right
            elif op == "not in":
                ok = left not in right
            else:
                ok = {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right,
                      "==": left == right, "!=": left != right}[op]
            if not ok:
                return False
            left = right
        return True

    def _FString(self, e: A.FString):
        return "".join(p.value if isinstance(p, A.Text) else format(self.eval(p.expr), p.fmt or "")
                       for p in e.parts)

    def _Call(self, e: A.Call):
        f = e.func
        if isinstance(f, A.Name) and f.id == "logprob":
            arg = e.args[0] if e.args else None
            names = hole_names(self.scope.get(arg.id, Ref("static"))) if isinstance(arg, A.Name) else []
            if self.ctx.logprobs is None:
                raise StaticError("logprob(X) needs the hole log-probabilities of a run (this host view has none)")
            return sum(self.ctx.logprobs.get(n, 0.0) for n in names)
        if isinstance(f, A.Name) and f.id == "tokens":
            value = self.eval(e.args[0])
            return self.runtime.count_tokens(str(value))
        if isinstance(f, A.Name) and f.id in PURE_BUILTINS:
            return super()._Call(e)
        fn = self.runtime.callable_of(f)
        args = [self.eval(a) for a in e.args]
        kwargs = {k.name: self.eval(k.value) for k in e.kwargs}
        return fn(*args, **kwargs)
