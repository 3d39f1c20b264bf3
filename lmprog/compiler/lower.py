"""Lowering: a checked :class:`~lmprog.program.Program` plus input values -> an engine :class:`SegmentProgram`.

The lowering walks the program's statements once, in order, for *all* particles at once:

* template text is merged into runs and tokenized (``Text`` segments; static where it only interpolates
  inputs and static ``let`` s, else rendered per particle at run time);
* each ``[hole]`` / ``gen`` becomes a ``Hole`` segment with its ``where`` constraints compiled by
  :func:`~lmprog.compiler.constraints.compile_hole`; its terminator is the literal run of the template that
  follows it (then that text is generated *by the hole*, so it is not forced again), a ``stop_at`` string,
  a fixed length, or EOS;
* ``observe`` becomes an ``Observe`` segment; ``let`` / ``condition`` / ``factor`` / ``sample`` and Python
  predicate constraints become ``Host`` segments: one batched Python call for all particles at a segment
  boundary (never per token);
* ``if``/``elif``/``else`` is per particle: a ``Host`` segment records each particle's branch, and every
  segment inside a branch is *guarded* (text rendered empty, holes skipped with start ``-1``, host work
  skipped) for the particles that did not take it;
* ``for`` loops are unrolled (their bound is known before the run); a hole ``[item]`` in iteration ``i`` is
  the engine hole ``item[i]``, and after the loop the name ``item`` is the list of the iterations' values.

Names resolve through *references* (:class:`Ref`): a static value, a hole's value, a per-particle host value
(``view.data``), a list of references (loops), or a per-particle branch choice (after an ``if``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from lmprog.automata.values import ValueRule
from lmprog.compiler import constraints as IR
from lmprog.compiler.automaton import stack_holes
from lmprog.dsl import ast as A
from lmprog.dsl.constraints import conjuncts
from lmprog.dsl.errors import Diagnostic, LmpError, suggestion
from lmprog.dsl.printer import constraint_to_source
from lmprog.dsl.static import PURE_BUILTINS, NotStatic, StaticError, _Eval, static_value

__all__ = ["Lowered", "LoweringError", "RunError", "lower", "resolve_inputs", "coerce_input"]


class LoweringError(LmpError):
    """A program (or its inputs) cannot be lowered: located, like every program error."""


class RunError(RuntimeError):
    """A runtime failure of a program (an expression that fails for every particle, ...)."""


# ------------------------------------------------------------------------------------------------- inputs


def coerce_input(spec, value: Any, from_text: bool = False) -> Any:
    """``value`` as the input's declared type. ``from_text``: the value came from ``--set NAME=VALUE``."""
    import json

    typ = spec.type
    if from_text and isinstance(value, str):
        if typ == "str":
            return value
        if typ == "bool":
            low = value.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if typ == "int":
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if typ == "float":
            try:
                return float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if typ == "list":
            try:
                parsed = json.loads(value)
            except ValueError:
                raise ValueError(f"expected a JSON list such as [\"a\", \"b\"], got {value!r}") from None
            value = parsed
    if typ == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if typ == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"expected true or false, got {value!r}")
        return bool(value)
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if typ == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__} {value!r}")
        return value
    return value


def resolve_inputs(program, given: Mapping[str, Any], from_text: bool = False) -> dict[str, Any]:
    """Every input's value (given, else its default). Raises :class:`LoweringError` naming each missing,
    unknown or ill-typed input, located at its ``input`` statement."""
    diags = []
    out: dict[str, Any] = {}
    anchor = _file_span(program)
    for name in given:
        if name not in program.inputs:
            valid = ", ".join(program.inputs) or "none"
            diags.append(_diag(program, anchor, f"unknown input '{name}'" + suggestion(str(name), program.inputs),
                               f"the program's inputs: {valid}"))
    for name, spec in program.inputs.items():
        if name in given:
            try:
                out[name] = coerce_input(spec, given[name], from_text)
            except ValueError as exc:
                diags.append(_diag(program, spec.span, f"bad value for input '{name}' ({spec.type}): {exc}"))
        elif spec.required:
            diags.append(_diag(program, spec.span, f"missing required input '{name}' ({spec.type})",
                               f"set it with --set {name}=VALUE, or {name}=... in Program.run"))
        else:
            out[name] = spec.default
    if diags:
        raise LoweringError(diags)
    return out


def _file_span(program):
    from lmprog.dsl.source import Span

    return Span(program.filename, 0, 0, 0, 0)


def _diag(program, span, message: str, help: Optional[str] = None) -> Diagnostic:
    line = None
    if span is not None and span.line > 0:
        lines = program.source.split("\n")
        if span.line <= len(lines):
            line = lines[span.line - 1]
    return Diagnostic(span, message, help, line)


# --------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Ref:
    """How a name's value is found for particle ``i``: ``kind`` static / hole / data / list / branch."""

    kind: str
    value: Any = None  # static value, hole name, data key, list of refs, (branch key, {index: ref}, default)


def _static(v):
    return Ref("static", v)


class _Ctx:
    """Per particle: hole values, host data and (after the run) hole log-probabilities."""

    __slots__ = ("values", "data", "logprobs")

    def __init__(self, values, data, logprobs=None):
        self.values, self.data, self.logprobs = values, data, logprobs


def _view_logprobs(view, i: int) -> Optional[dict[str, float]]:
    """``{hole name: log-probability}`` of the holes particle ``i`` of a host view has completed so far."""
    lp = getattr(view, "hole_logprobs", None)
    if lp is None:
        return None
    done = view.spans[i]
    return {name: float(lp[i, h]) for h, name in enumerate(view.holes) if name in done}


def resolve(ref: Ref, ctx: _Ctx) -> Any:
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


def _hole_names(ref: Ref) -> list[str]:
    if ref.kind == "hole":
        return [ref.value]
    if ref.kind == "list":
        return [n for r in ref.value for n in _hole_names(r)]
    if ref.kind == "branch":
        _, options, default = ref.value
        refs = list(options.values()) + ([default] if default is not None else [])
        return [n for r in refs for n in _hole_names(r)]
    return []


# ----------------------------------------------------------------------------------------------- evaluator


class _RunEval(_Eval):
    """Python semantics for one particle (names resolved through references), with the run-time built-ins:
    ``tokens`` (the model's tokenizer), ``logprob`` (of the holes completed so far), imported and ``functions=``
    callables."""

    def __init__(self, scope: Mapping[str, Ref], ctx: _Ctx, lowering: "_Lowering"):
        super().__init__({})
        self.scope, self.ctx, self.low = scope, ctx, lowering

    def _Name(self, e: A.Name):
        ref = self.scope.get(e.id)
        if ref is None:
            if e.id in self.low.functions:
                return self.low.functions[e.id]
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
            names = _hole_names(self.scope.get(arg.id, Ref("static"))) if isinstance(arg, A.Name) else []
            if self.ctx.logprobs is None:
                raise StaticError("logprob(X) needs the hole log-probabilities of a run (this host view has none)")
            return sum(self.ctx.logprobs.get(n, 0.0) for n in names)
        if isinstance(f, A.Name) and f.id == "tokens":
            value = self.eval(e.args[0])
            return len(self.low.encode(str(value)))
        if isinstance(f, A.Name) and f.id in PURE_BUILTINS:
            return super()._Call(e)
        fn = self.low.callable_of(f)
        args = [self.eval(a) for a in e.args]
        kwargs = {k.name: self.eval(k.value) for k in e.kwargs}
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------- output


@dataclass
class Lowered:
    """A lowered program: the engine program, how to compute each sample's returned values, and strategy
    callables (``best_of`` score, ``vote`` key)."""

    program: Any  # SegmentProgram
    returns: Callable[[Any], dict]  # engine Sample -> {key: value}
    display: dict[str, str]  # engine hole name -> name shown to users
    inputs: dict[str, Any]
    evaluate: Callable[[A.Expr, Any], Any]  # (expr, engine Sample) -> value (final scope)
    compile_s: float = 0.0


# ------------------------------------------------------------------------------------------------ lowering


def lower(program, tokenizer, inputs: Mapping[str, Any], *, seed: int = 0,
          default_max_tokens: int = 256, heal: bool = True) -> Lowered:
    """Lower ``program`` with the (already resolved) ``inputs`` for ``tokenizer``. ``heal``: move a space that
    ends the prompt before a hole into the hole (see :meth:`_Lowering.heal_space`)."""
    low = _Lowering(program, tokenizer, dict(inputs), seed, default_max_tokens)
    low.healing = heal
    return low.run()


@dataclass
class _Pending:
    parts: list = field(default_factory=list)  # str or (expr, fmt, scope)
    guard: tuple = ()
    node: Any = None  # the statement of the first part


class _Lowering:
    def __init__(self, program, tokenizer, inputs, seed, default_max_tokens):
        self.p = program
        self.tokenizer = tokenizer
        self.inputs = inputs
        self.seed = int(seed)
        self.default_max_tokens = int(default_max_tokens)
        self.functions = dict(program.functions)
        self.modules: dict[str, Any] = {}
        self.segments: list = []
        self.compiled: list = []  # CompiledHole per engine hole, in order
        self.hole_index: dict[str, int] = {}  # engine hole name -> index into compiled
        self.display: dict[str, str] = {}
        self.pending = _Pending()
        self.counter = 0
        self.compile_s = 0.0
        self.max_hole_tokens = 0
        self.first_node = None  # the AST node that produced the first segment (for the no-BOS diagnostic)

    # ---- helpers --------------------------------------------------------------------------------------

    def error(self, span, message, help=None):
        return LoweringError([_diag(self.p, span, message, help)])

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"__{prefix}{self.counter}"

    def label(self, node) -> str:
        span = node.span
        text = ""
        if span is not None and span.line > 0:
            lines = self.p.source.split("\n")
            if span.line == span.end_line:  # the node's own text
                text = lines[span.line - 1][span.col - 1:span.end_col - 1]
            else:
                text = lines[span.line - 1][span.col - 1:] + " ..."
        return f"{span}: {text.strip()}" if text else str(span)

    def encode(self, text: str, first: bool = False) -> list[int]:
        """Token ids of ``text`` (BOS only at the very start of the program, if the model asks for it)."""
        ids = self.tokenizer.encode(text, add_bos=False)
        if first and getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos_id is not None:
            ids = [int(self.tokenizer.bos_id), *ids]
        return ids

    def callable_of(self, f: A.Expr):
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
        if alias in self.modules:
            return self.modules[alias]
        spec = self.p.imports.get(alias)
        if spec is None:
            raise StaticError(f"no import named '{alias}'")
        path = Path(spec.path)
        if not path.is_absolute():
            named = self.p.filename and not self.p.filename.startswith("<")
            base = Path(self.p.filename).parent if named else Path.cwd()
            path = base / path
        name = f"lmprog_import_{alias}_{abs(hash(str(path)))}"
        try:
            mspec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[name] = mod
            mspec.loader.exec_module(mod)
        except Exception as exc:
            raise self.error(spec.span, f"importing {spec.path} failed: {type(exc).__name__}: {exc}") from None
        self.modules[alias] = mod
        return mod

    def static(self, expr, scope) -> Any:
        """The value of ``expr`` if it only depends on static references (raises NotStatic otherwise)."""
        env = {}
        for name, ref in scope.items():
            if ref.kind == "static":
                env[name] = ref.value
        return static_value(expr, env)

    def is_static(self, expr, scope) -> bool:
        try:
            self.static(expr, scope)
            return True
        except (NotStatic, StaticError):
            return False

    def eval_for(self, expr, scope, view, i):
        return _RunEval(scope, _Ctx(view.values[i], view.data[i], _view_logprobs(view, i)), self).eval(expr)

    @staticmethod
    def active(guard, view) -> np.ndarray:
        """``[P] bool``: the particles alive and inside every enclosing branch."""
        ok = np.asarray(view.alive, bool).copy()
        for key, idx in guard:
            ok &= np.array([d.get(key, -1) == idx for d in view.data], bool)
        return ok

    # ---- driver ---------------------------------------------------------------------------------------

    def run(self) -> Lowered:
        from lmprog.inference import SegmentProgram

        scope: dict[str, Ref] = {name: _static(v) for name, v in self.inputs.items()}
        scope = self.block(self.p.ast.body, scope, (), ())
        self.flush()
        self.check_starts_with_text()
        if not self.compiled:  # the engine needs a token table: a trivial one
            table = self._empty_table()
        else:
            table, offsets = stack_holes(self.compiled)
            self.segments = [self._fix_start(s, offsets) for s in self.segments]
        prog = SegmentProgram(self.segments, table)
        final_scope = dict(scope)
        returns = self.p.returns

        def evaluate(expr, sample):
            ctx = _Ctx(sample.values, sample.data, getattr(sample, "hole_logprobs", None))
            return _RunEval(final_scope, ctx, self).eval(expr)

        def ret(sample):
            return {key: _jsonable(evaluate(expr, sample)) for key, expr in returns}

        return Lowered(prog, ret, dict(self.display), dict(self.inputs), evaluate, self.compile_s)

    def check_starts_with_text(self):
        """On a model without a BOS token the engine conditions on the program's leading static prompt text,
        so there must be some: report the first statement that comes before any, located."""
        from lmprog.inference import Text

        if self.tokenizer.bos_id is not None:
            return
        first = self.segments[0] if self.segments else None
        if isinstance(first, Text) and first.tokens:
            return
        node = self.first_node
        if node is None:
            body = [s for s in self.p.ast.body
                    if not isinstance(s, (A.ModelStmt, A.InferStmt, A.InputStmt, A.ImportStmt))]
            node = body[0] if body else None
        what = _describe_start(node, first)
        span = node.span if node is not None else _file_span(self.p)
        raise self.error(
            span, f"the program starts with {what}, but the model has no BOS token to condition on: "
                  "it must start with prompt text",
            "put prompt text before it (a template string such as \"Q: \" as the first statement); "
            "the prompt must be known before the run (no holes, samples or Python values in it)")

    def _empty_table(self):
        hole = IR.compile_hole([IR.Choices(("x",))], self.tokenizer, name="__none")
        table, _ = stack_holes([hole])
        return table

    def _fix_start(self, seg, offsets):
        from lmprog.inference import Hole

        if isinstance(seg, Hole) and isinstance(seg.start, _Start):
            st = seg.start
            start = offsets[st.index] + int(self.compiled[st.index].automaton.start)
            if not st.guard:
                return dataclasses.replace(seg, start=start)
            guard = st.guard
            return dataclasses.replace(
                seg, start=lambda view: np.where(_Lowering.active(guard, view), start, -1).astype(np.int32))
        return seg

    def block(self, body, scope, guard, loop_index) -> dict:
        for s in body:
            scope = self.stmt(s, scope, guard, loop_index)
        return scope

    def stmt(self, s, scope, guard, loop_index) -> dict:
        if isinstance(s, (A.ModelStmt, A.InferStmt, A.InputStmt, A.ImportStmt, A.Return)):
            return scope
        method = getattr(self, "s_" + type(s).__name__)
        if not self.pending.parts:
            self.pending.node = s
        was_empty = not self.segments
        out = method(s, scope, guard, loop_index)
        if was_empty and self.segments and self.first_node is None:
            self.first_node = s
        return out

    # ---- text -----------------------------------------------------------------------------------------

    def add_text(self, part, guard):
        if self.pending.parts and self.pending.guard != guard:
            self.flush()
        self.pending.guard = guard
        self.pending.parts.append(part)

    def flush(self):
        from lmprog.inference import Text

        parts, guard, node = self.pending.parts, self.pending.guard, self.pending.node
        self.pending = _Pending()
        if not parts:
            return
        seg = self.forced(Text, parts, guard, "text")
        if seg is not None:
            if not self.segments and self.first_node is None:
                self.first_node = node
            self.segments.append(seg)

    def forced(self, cls, parts, guard, what, label=""):
        """A Text/Observe segment for ``parts`` (strings and ``(expr, fmt, scope)`` interpolations)."""
        if all(isinstance(p, str) for p in parts):
            text = "".join(parts)
            if not text:
                return None
            ids = self.encode(text, first=not self.segments and not guard)
            if not guard:
                return cls(tokens=tuple(ids), label=label)
            return cls(render=lambda view: [list(ids) if a else [] for a in _Lowering.active(guard, view)],
                       max_tokens=len(ids), label=label)
        static_len = len(self.encode("".join(p for p in parts if isinstance(p, str))))
        n_dyn = sum(1 for p in parts if not isinstance(p, str))
        bound = static_len + n_dyn * (2 * max(self.max_hole_tokens, 32) + 32)

        def render(view):
            act = _Lowering.active(guard, view)
            out = []
            for i in range(len(view)):
                if not act[i]:
                    out.append([])
                    continue
                pieces = []
                for p in parts:
                    if isinstance(p, str):
                        pieces.append(p)
                    else:
                        expr, fmt, sc = p
                        try:
                            v = self.eval_for(expr, sc, view, i)
                            pieces.append(format(v, fmt or "") if fmt else _to_text(v))
                        except Exception as exc:
                            raise RunError(f"{expr.span}: cannot interpolate: {_msg(exc)}") from None
                ids = self.encode("".join(pieces))
                if len(ids) > bound:
                    ids = ids[:bound]
                out.append(list(ids))
            return out

        return cls(render=render, max_tokens=bound, label=label)

    def template_parts(self, parts, scope, guard, holes_ok: bool):
        """Yield ('text', part) and ('hole', name, following_text) items, folding static interpolations."""
        out = []
        for k, part in enumerate(parts):
            if isinstance(part, A.Text):
                out.append(("text", part.value))
            elif isinstance(part, A.Interp):
                try:
                    v = self.static(part.expr, scope)
                    out.append(("text", format(v, part.fmt) if part.fmt else _to_text(v)))
                except (NotStatic, StaticError):
                    out.append(("dyn", (part.expr, part.fmt, dict(scope))))
            elif isinstance(part, A.Hole):
                following = []
                for q in parts[k + 1:]:
                    if isinstance(q, A.Text):
                        following.append(q.value)
                    else:
                        break
                out.append(("hole", part, "".join(following)))
        return out

    # ---- statements -----------------------------------------------------------------------------------

    def s_Template(self, s: A.Template, scope, guard, loop_index):
        items = self.template_parts(s.parts, scope, guard, True)
        skip = 0
        for item in items:
            if item[0] == "text":
                text = item[1]
                if skip:
                    cut = min(skip, len(text))
                    text, skip = text[cut:], skip - cut
                if text:
                    self.add_text(text, guard)
            elif item[0] == "dyn":
                skip = 0
                self.add_text(item[1], guard)
            else:
                _, hole, following = item
                scope, consumed = self.hole(hole.name, hole, s.where, following, scope, guard, loop_index)
                skip = len(following) if consumed else 0
        return scope

    def s_Gen(self, s: A.Gen, scope, guard, loop_index):
        scope, _ = self.hole(s.name, s, s.where, "", scope, guard, loop_index)
        return scope

    def hole(self, name, node, where, following, scope, guard, loop_index):
        from lmprog.inference import Hole

        mine = [c for c in conjuncts(where) if _constraint_hole(c) == name]
        ir, preds = [], []
        for c in mine:
            if _is_predicate_tree(c):
                preds.append(c)
                continue
            try:
                conv = self.to_ir(c, scope)
            except (NotStatic, StaticError) as exc:
                raise self.error(c.span, f"this constraint's arguments must be known before the run ({_msg(exc)})",
                                 "use literals, inputs or lets of those") from None
            ir.append(conv)
        engine_name = name + "".join(f"[{i}]" for i in loop_index)
        if engine_name in self.hole_index:
            k = 2
            while f"{engine_name}#{k}" in self.hole_index:
                k += 1
            engine_name = f"{engine_name}#{k}"
        rule = None  # ValueRule of the hole: the compiled hole's, with the healed space as its head
        healed = self.heal_space(ir, guard, following)
        compiled = None
        if healed is not None:
            try:
                compiled = IR.compile_hole(healed, self.tokenizer, following_text=following or None, name=name,
                                           loc=node.span)
                ir, rule = healed, ValueRule(head=1, stop=compiled.value_rule.stop)
            except IR.ConstraintError:  # e.g. a token bound the extra space no longer fits: keep the space
                self.pending.parts[-1] += " "
        try:
            if compiled is None:
                compiled = IR.compile_hole(ir, self.tokenizer, following_text=following or None, name=name,
                                           loc=node.span)
        except IR.ConstraintError as exc:
            msg = str(exc)
            prefix = f"{exc.loc}: " if exc.loc is not None else ""
            if prefix and msg.startswith(prefix):
                msg = msg[len(prefix):]
            raise self.error(exc.loc if hasattr(exc.loc, "line") else node.span, msg) from None
        rule = rule or compiled.value_rule
        self.compile_s += compiled.compile_s
        index = len(self.compiled)
        self.compiled.append(compiled)
        self.hole_index[engine_name] = index
        self.display[engine_name] = engine_name.split("#")[0]
        term = compiled.terminator
        consumed = bool(following) and term.kind == "text" and term.text == following and \
            not any(isinstance(c, IR.StopAt) for c in ir)
        budget = None
        for c in ir:
            if isinstance(c, IR.Count) and c.kind == "tokens" and c.op in ("<=", "<", "=="):
                n = c.n - 1 if c.op == "<" else c.n
                budget = n if budget is None else min(budget, n)
        self.max_hole_tokens = max(self.max_hole_tokens, budget or self.default_max_tokens)
        where_text = " and ".join(constraint_to_source(c) for c in mine)
        label = f"{node.span}: hole '{engine_name}'" + (f" where {where_text}" if where_text else "")
        self.flush()  # the prompt text before the hole (after healing took its trailing space)
        prefix_trees = [c for c in preds if any(a.prefix for a in _predicate_atoms(c))]
        prefix_check = None
        if prefix_trees:
            prefix_check = self.prefix_check(prefix_trees, dict(scope), guard, engine_name, rule, label)
        if not self.segments and self.first_node is None:
            self.first_node = node
        self.segments.append(Hole(engine_name, _Start(index, guard), budget, rule, label, prefix_check))
        scope = dict(scope)
        scope[name] = Ref("hole", engine_name)
        complete_trees = [c for c in preds if not any(a.prefix for a in _predicate_atoms(c))]
        for c in complete_trees:
            self.predicate(c, scope, guard)
        if prefix_trees:
            self.prefix_predicates(prefix_trees, scope, guard, engine_name)
        return scope, consumed

    def heal_space(self, ir, guard, following: str = ""):
        """Move the space that ends the prompt text into the hole ("token healing" for the common case).

        ``"A: [answer]"`` would force the prompt to end in a lone space token, which BPE models almost never
        see before a word (they write " Paris" as one token), and distorts the answer. The text is the same if
        the hole generates " " + value instead: the prompt's trailing space is dropped and the hole's
        constraints are rewritten so that the hole's language is exactly " " + (the old language)
        (:func:`_heal_constraint`; ``len`` bounds grow by one, ``words`` and ``tokens`` are unchanged); the
        value is the generated text without its first byte.

        Returns the new constraints, or None where the rewrite does not apply (the space then stays in the
        prompt): healing is off, the prompt does not end in exactly one space, the hole's terminator (the
        following text or a ``stop_at``/``stop_before`` string) starts with a space (the generated space
        could then begin the terminator, so the healed hole would end at a different place: not exact), a
        constraint that cannot be rewritten (``grammar``/``json``), or a program that would then start
        with no prompt at all on a model without a BOS token."""
        if not self.healing:
            return None
        parts = self.pending.parts
        if not parts or self.pending.guard != guard or not isinstance(parts[-1], str) or \
                not parts[-1].endswith(" ") or parts[-1].endswith("  "):
            return None
        try:
            term = IR.plan_hole(ir, following or None).terminator
        except IR.ConstraintError:
            return None  # reported by compile_hole, unhealed
        if term.kind == "text" and term.text.startswith(" "):
            return None
        if not self.segments and not guard and self.tokenizer.bos_id is None and \
                all(isinstance(p, str) for p in parts) and "".join(parts) == " ":
            return None  # the prompt would be empty and there is no BOS to condition on
        out: list = [IR.StartsWith(" ")]
        for c in ir:
            h = _heal_constraint(c)
            if h is None:
                return None
            out.append(h)
        parts[-1] = parts[-1][:-1]
        return out

    def to_ir(self, c, scope):
        """The IR of an AST constraint, or None for a Python predicate (checked on the host)."""
        st = lambda e: self.static(e, scope)  # noqa: E731
        loc = c.span
        if isinstance(c, A.Matches):
            return IR.Regex(st(c.pattern), loc=loc)
        if isinstance(c, A.InChoices):
            return IR.Choices(tuple(str(x) for x in st(c.choices)), loc=loc)
        if isinstance(c, A.StopAt):
            return IR.StopAt(st(c.text), c.keep, loc=loc)
        if isinstance(c, A.CountBound):
            return IR.Count(c.kind, c.op, int(st(c.n)), loc=loc)
        if isinstance(c, A.IsInt):
            return IR.IsInt(loc=loc)
        if isinstance(c, A.IsFloat):
            return IR.IsFloat(loc=loc)
        if isinstance(c, A.Contains):
            return IR.Contains(st(c.text), loc=loc)
        if isinstance(c, A.StartsWith):
            return IR.StartsWith(st(c.text), loc=loc)
        if isinstance(c, A.EndsWith):
            return IR.EndsWith(st(c.text), loc=loc)
        if isinstance(c, A.GrammarC):
            return IR.Grammar(str(st(c.path)), loc=loc)
        if isinstance(c, A.JsonC):
            return IR.JsonSchema(str(st(c.schema)) if c.schema is not None else "", loc=loc)
        if isinstance(c, A.PyPredicate) or (isinstance(c, (A.Not, A.And, A.Or)) and _predicate_atoms(c)):
            raise self.error(c.span, "a Python predicate cannot be combined with other kinds of constraints "
                                     "under `or`/`not`",
                             "combine predicates with predicates (checked on the host), and the other "
                             "constraints with each other")
        if isinstance(c, A.Not):
            return IR.Not(self.to_ir(c.operand, scope), loc=loc)
        if isinstance(c, (A.And, A.Or)):
            items = [self.to_ir(x, scope) for x in c.operands]
            return (IR.And if isinstance(c, A.And) else IR.Or)(tuple(items), loc=loc)
        raise self.error(c.span, f"unsupported constraint {type(c).__name__}")

    def predicate_fn(self, c, scope, view, i) -> Callable[[str], bool]:
        """``value -> bool`` for particle ``i``: a formula (``not``/``and``/``or``) of Python predicates on one
        hole, with each function and its extra arguments evaluated once (``prefix=`` is not passed on)."""
        if isinstance(c, A.PyPredicate):
            fn = self.callable_of(c.func)
            kws = [k for k in c.kwargs if k.name != "prefix"]
            if not c.args and not kws:  # (no host view values needed: cheap in the per-token prefix check)
                return lambda v: bool(fn(v))
            args = [self.eval_for(a, scope, view, i) for a in c.args]
            kwargs = {k.name: self.eval_for(k.value, scope, view, i) for k in kws}
            return lambda v: bool(fn(v, *args, **kwargs))
        if isinstance(c, A.Not):
            f = self.predicate_fn(c.operand, scope, view, i)
            return lambda v: not f(v)
        fs = [self.predicate_fn(x, scope, view, i) for x in c.operands]
        if isinstance(c, A.And):
            return lambda v: all(f(v) for f in fs)
        return lambda v: any(f(v) for f in fs)

    def predicate(self, c, scope, guard):
        """A formula of Python predicates on a complete hole value (``h.p(X)``, ``not h.p(X)``,
        ``h.p(X) or h.q(X)``, ...): one host call over all particles at the segment boundary after the hole
        (-inf where false)."""
        hole = _predicate_atoms(c)[0].hole

        def compute(view, i, sc):
            return self.predicate_fn(c, sc, view, i)(self.eval_for(hole, sc, view, i))

        self.host(lambda v: 0.0 if v else -math.inf, None, scope, guard,
                  f"{c.span}: {constraint_to_source(c)}", compute=compute)

    def prefix_predicates(self, trees, scope, guard, engine_name):
        """``prefix=true`` predicates, checked on the complete value after the hole: every non-empty prefix
        (in characters) of the value must satisfy every formula. Prefixes the per-token ``Hole.prefix_check``
        has already accepted (memo in the particle's data) are not checked again."""
        memo = f"__prefix_ok:{engine_name}"
        hole = _predicate_atoms(trees[0])[0].hole
        label = " and ".join(f"{c.span}: {constraint_to_source(c)}" for c in trees)

        def compute(view, i, sc):
            value = self.eval_for(hole, sc, view, i)
            value = "" if value is None else str(value)
            checked = view.data[i].pop(memo, None)
            begin = len(checked) if isinstance(checked, str) and value.startswith(checked) else 0
            fs = [self.predicate_fn(c, sc, view, i) for c in trees]
            return all(f(value[:j]) for j in range(max(begin, 0) + 1, len(value) + 1) for f in fs)

        self.host(lambda v: 0.0 if v else -math.inf, None, scope, guard, label, compute=compute)

    def prefix_check(self, trees, scope, guard, engine_name, rule: ValueRule, label: str):
        """The hole's ``prefix_check``: ``view -> [P] bool``, False for the particles whose partial value has a
        prefix that fails a ``prefix=true`` formula. The partial value is what is certainly part of the value:
        the generated bytes minus a possible start of the terminator (the longest suffix that begins the
        following text / ``stop_before`` string; a ``stop_at`` string is part of the value), minus the healed
        space, minus an incomplete UTF-8 character at the end. Every character prefix not yet accepted is
        checked (the accepted part is memoised in the particle's data, so each prefix is checked once)."""
        memo = f"__prefix_ok:{engine_name}"
        tokenizer = self.tokenizer

        def check(view) -> np.ndarray:
            ok = np.ones(len(view), bool)
            act = _Lowering.active(guard, view)
            errors, in_hole = [], 0
            for i in np.flatnonzero(act):
                span = view.spans[i].get(engine_name)
                if span is None or span[1] <= span[0]:
                    continue
                in_hole += 1
                value = rule.of_tokens(tokenizer, view.tokens[i][span[0]:span[1]], partial=True)
                checked = view.data[i].get(memo)
                begin = len(checked) if isinstance(checked, str) and value.startswith(checked) else 0
                if len(value) <= begin:
                    continue
                try:
                    fs = [self.predicate_fn(c, scope, view, i) for c in trees]
                    good = all(f(value[:j]) for j in range(begin + 1, len(value) + 1) for f in fs)
                except Exception as exc:  # noqa: BLE001 - a failing predicate kills its particle
                    errors.append(exc)
                    good = False
                ok[i] = good
                if good:
                    view.data[i][memo] = value
            if errors and len(errors) == in_hole:  # every particle in the hole failed with an error
                raise RunError(f"{label}: failed for every particle: {_msg(errors[0])}")
            return ok

        return check

    def host(self, to_logw, expr, scope, guard, label, store: Optional[str] = None, compute=None):
        """A Host segment evaluating ``expr`` (or ``compute(view, i, scope)``) for every active particle;
        ``to_logw(value)`` -> log-weight increment; ``store``: data key to write the value to. An error kills
        that particle; an error for every active particle is a :class:`RunError`."""
        from lmprog.inference import Host

        self.flush()
        scope = dict(scope)

        def fn(view):
            act = _Lowering.active(guard, view)
            inc = np.zeros(len(view), np.float64)
            errors = []
            for i in np.flatnonzero(act):
                try:
                    v = self.eval_for(expr, scope, view, i) if compute is None else compute(view, i, scope)
                except Exception as exc:
                    errors.append(exc)
                    inc[i] = -math.inf
                    continue
                if store is not None:
                    view.data[i][store] = v
                if to_logw is not None:
                    inc[i] = to_logw(v)
            if errors and len(errors) == int(act.sum()):
                raise RunError(f"{label}: failed for every particle: {_msg(errors[0])}")
            return inc

        self.segments.append(Host(fn, label))

    def s_Observe(self, s: A.Observe, scope, guard, loop_index):
        from lmprog.inference import Observe

        self.flush()
        parts = [p[1] for p in self.template_parts(s.parts, scope, guard, False)]
        seg = self.forced(Observe, parts, guard, "observe", self.label(s))
        if seg is not None:
            self.segments.append(seg)
        return scope

    def s_Let(self, s: A.Let, scope, guard, loop_index):
        scope = dict(scope)
        if not guard and self.is_static(s.value, scope):
            scope[s.name] = _static(self.static(s.value, scope))
            return scope
        key = self.fresh(f"let_{s.name}_")
        previous = scope.get(s.name)
        self.host(None, s.value, scope, guard, self.label(s), store=key)
        if guard and previous is not None:
            # particles outside the branch keep the old value
            scope[s.name] = _GuardedRef(guard, Ref("data", key), previous).ref()
        else:
            scope[s.name] = Ref("data", key)
        return scope

    def s_Condition(self, s: A.Condition, scope, guard, loop_index):
        self.host(lambda v: 0.0 if v else -math.inf, s.test, scope, guard, self.label(s))
        return scope

    def s_Factor(self, s: A.Factor, scope, guard, loop_index):
        def logw(v):
            x = float(v)
            if math.isnan(x):
                raise ValueError("factor is NaN")
            return x

        self.host(logw, s.value, scope, guard, self.label(s))
        return scope

    def s_SampleStmt(self, s: A.SampleStmt, scope, guard, loop_index):
        from lmprog.inference import Host

        self.flush()
        key = self.fresh(f"sample_{s.name}_")
        sc = dict(scope)
        seg_no = len(self.segments)
        label = self.label(s)
        dist_name = s.dist
        params = _dist_params(dist_name)

        def fn(view):
            act = _Lowering.active(guard, view)
            idx = np.flatnonzero(act)
            if idx.size == 0:
                return None
            args = []
            for i in idx:
                try:
                    pos = [self.eval_for(a, sc, view, i) for a in s.args]
                    kw = {k.name: self.eval_for(k.value, sc, view, i) for k in s.kwargs}
                except Exception as exc:
                    raise RunError(f"{label}: {_msg(exc)}") from None
                args.append(_bind_params(params, pos, kw))
            values = _draw(dist_name, args, self.seed, seg_no, view)
            for i, v in zip(idx, values):
                view.data[i][key] = v
            return None

        self.segments.append(Host(fn, label))
        scope = dict(scope)
        scope[s.name] = Ref("data", key)
        return scope

    def s_If(self, s: A.If, scope, guard, loop_index):
        from lmprog.inference import Host

        self.flush()
        key = self.fresh("if")
        tests = [b.test for b in s.branches]
        sc = dict(scope)
        label = self.label(s.branches[0]).split("\n")[0]

        def choose(view):
            act = _Lowering.active(guard, view)
            inc = np.zeros(len(view))
            errors = 0
            for i in np.flatnonzero(act):
                chosen = len(tests)
                try:
                    for k, t in enumerate(tests):
                        if self.eval_for(t, sc, view, i):
                            chosen = k
                            break
                except Exception as exc:
                    errors += 1
                    inc[i] = -math.inf
                    last = exc
                    continue
                view.data[i][key] = chosen
            if errors and errors == int(act.sum()):
                raise RunError(f"{label}: the condition failed for every particle: {_msg(last)}")
            return inc

        self.segments.append(Host(choose, label))
        outcomes = []
        bodies = [b.body for b in s.branches] + [s.orelse or ()]
        for k, body in enumerate(bodies):
            out = self.block(body, dict(scope), guard + ((key, k),), loop_index)
            self.flush()
            outcomes.append(out)
        merged = dict(scope)
        names = set().union(*[set(o) for o in outcomes])
        for name in names:
            refs = [o.get(name) for o in outcomes]
            if all(r == refs[0] for r in refs) and refs[0] is not None:
                merged[name] = refs[0]
            else:
                merged[name] = Ref("branch", (key, {k: r for k, r in enumerate(refs) if r is not None},
                                             scope.get(name)))
        return merged

    def s_For(self, s: A.For, scope, guard, loop_index):
        try:
            if s.is_range:
                args = [self.static(a, scope) for a in s.iter.args]
                items = list(range(*args))
            else:
                items = list(self.static(s.iter, scope))
        except (NotStatic, StaticError) as exc:
            raise self.error(s.iter.span, f"the loop's iterable must be known before the run ({_msg(exc)})") from None
        indexed = _indexed_names(s.body)
        per_iter: dict[str, list] = {n: [] for n in indexed}
        current = dict(scope)
        for i, item in enumerate(items):
            current = dict(current)
            current[s.var] = _static(item)
            current = self.block(s.body, current, guard, loop_index + (i,))
            for n in indexed:
                per_iter[n].append(current.get(n, _static(None)))
        out = dict(current)
        out.pop(s.var, None)
        if s.var in scope:
            out[s.var] = scope[s.var]
        for n in indexed:
            out[n] = Ref("list", tuple(per_iter[n]))
        return out


class _GuardedRef:
    def __init__(self, guard, inside: Ref, outside: Ref):
        self.guard, self.inside, self.outside = guard, inside, outside

    def ref(self) -> Ref:
        ref = self.inside
        for key, idx in reversed(self.guard):
            ref = Ref("branch", (key, {idx: ref}, self.outside))
        return ref


@dataclass(frozen=True)
class _Start:
    index: int
    guard: tuple


def _constraint_hole(c) -> Optional[str]:
    h = getattr(c, "hole", None)
    if isinstance(h, A.Name):
        return h.id
    for attr in ("operand",):
        if hasattr(c, attr):
            return _constraint_hole(getattr(c, attr))
    for x in getattr(c, "operands", ()):
        name = _constraint_hole(x)
        if name is not None:
            return name
    return None


def _describe_start(node, seg) -> str:
    """What comes first in a program, for the no-BOS diagnostic."""
    from lmprog.inference import Hole, Observe, Text

    if node is None:
        return "no prompt text"
    if isinstance(seg, Hole) or isinstance(node, (A.Hole, A.Gen)):
        return "a hole"
    if isinstance(seg, Observe):
        return "observed text (`observe` scores text given what comes before it)"
    if isinstance(seg, Text):
        return "text computed during the run"
    words = {A.Let: "`let`", A.SampleStmt: "`sample`", A.Condition: "`condition`", A.Factor: "`factor`",
             A.If: "`if`", A.For: "`for`"}
    return f"host work ({words.get(type(node), type(node).__name__)})"


def _predicate_atoms(c) -> list:
    """The Python predicates of a constraint tree (``not``/``and``/``or`` of ``h.p(X)``)."""
    return [n for n in A.walk(c) if isinstance(n, A.PyPredicate)]


def _is_predicate_tree(c) -> bool:
    """Whether ``c`` is a Python predicate or a ``not``/``and``/``or`` of Python predicates only."""
    if isinstance(c, A.PyPredicate):
        return True
    if isinstance(c, A.Not):
        return _is_predicate_tree(c.operand)
    if isinstance(c, (A.And, A.Or)):
        return bool(c.operands) and all(_is_predicate_tree(x) for x in c.operands)
    return False


def _heal_constraint(c):
    """The constraint on ``" " + v`` that holds iff ``c`` holds on ``v``, given that the healed hole also
    starts with a space (the lowering adds ``StartsWith(" ")``): with ``S`` the strings starting with a space,
    ``heal(c) ∩ S == " " + L(c)`` for every ``c``, so ``not``/``and``/``or`` carry over (``S`` minus
    ``heal(c)`` is ``" "`` + the complement of ``L(c)``). None: no such rewrite (grammar, JSON)."""
    from lmprog.compiler.bytedfa import _strip_anchors, escape_regex

    any_text = "(?s:.*)"
    if isinstance(c, IR.Regex):
        return IR.Regex(" (?:" + _strip_anchors(c.pattern) + ")", loc=c.loc)
    if isinstance(c, IR.IsInt):
        return IR.Regex(" (?:" + IR.INT_PATTERN + ")", loc=c.loc)
    if isinstance(c, IR.IsFloat):
        return IR.Regex(" (?:" + IR.FLOAT_PATTERN + ")", loc=c.loc)
    if isinstance(c, IR.Choices):
        return IR.Choices(tuple(" " + str(x) for x in c.items), loc=c.loc)
    if isinstance(c, IR.StartsWith):
        return IR.StartsWith(" " + c.s, loc=c.loc)
    if isinstance(c, IR.Contains):
        # an occurrence of s in " " + v that is not in v would start at the added space
        if not c.s.startswith(" "):
            return c
        return IR.Regex(" " + any_text + escape_regex(c.s) + any_text, loc=c.loc)
    if isinstance(c, IR.EndsWith):
        # " " + v ends with s but v does not only if s == " " + v
        if not c.s.startswith(" "):
            return c
        return IR.Regex(" " + any_text + escape_regex(c.s), loc=c.loc)
    if isinstance(c, IR.Not):
        inner = _heal_constraint(c.c)
        return None if inner is None else IR.Not(inner, loc=c.loc)
    if isinstance(c, (IR.And, IR.Or)):
        items = [_heal_constraint(x) for x in c.items]
        return None if any(x is None for x in items) else type(c)(tuple(items), loc=c.loc)
    if isinstance(c, IR.Count):
        # len(" " + v) == len(v) + 1; words(" " + v) == words(v); tokens: the hole's token budget
        return IR.Count("len", c.op, c.n + 1, loc=c.loc) if c.kind == "len" else c
    if isinstance(c, IR.StopAt):
        # exact when s does not start with a space (heal_space checks): its first occurrence in " " + w is
        # one byte after its first occurrence in w
        return None if c.s.startswith(" ") else c
    return None


def _indexed_names(body) -> list[str]:
    """Holes and samples defined inside a loop body (their names become lists after the loop)."""
    out: list[str] = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, A.Template):
                out.extend(p.name for p in s.parts if isinstance(p, A.Hole))
            elif isinstance(s, A.Gen):
                out.append(s.name)
            elif isinstance(s, A.SampleStmt):
                out.append(s.name)
            elif isinstance(s, A.If):
                for b in s.branches:
                    visit(b.body)
                visit(s.orelse or ())
            elif isinstance(s, A.For):
                visit(s.body)

    visit(body)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------- distributions


def _dist_params(name: str) -> list[str]:
    from lmprog.dsl.catalog import DISTRIBUTIONS

    return [p.name for p in DISTRIBUTIONS[name].params]


def _bind_params(params, pos, kw) -> dict:
    out = dict(zip(params, pos))
    out.update(kw)
    return out


def _draw(name: str, args: list[dict], seed: int, seg_no: int, view) -> list:
    """One value per active particle from the prior (NumPyro distributions), in one batched call when all
    particles share their arguments. The key is the engine's fresh key for this host step (``view.key``: the
    same seed gives the same draws, and re-running the step, as MCMC moves do, draws anew), folded with the
    segment number; without one, the program's seed."""
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    n = len(args)
    base = getattr(view, "key", None)
    key = jax.random.fold_in(base if base is not None else jax.random.PRNGKey(seed), 7919 + seg_no)

    def col(k, dtype=jnp.float32):
        return jnp.asarray([a[k] for a in args], dtype)

    if name == "choice":
        items = [a["items"] for a in args]
        probs = []
        for a in args:
            p = a.get("probs")
            m = len(a["items"])
            probs.append(np.full(m, 1.0 / m) if p is None else np.asarray(p, np.float64) / np.sum(p))
        width = max(len(p) for p in probs)
        table = np.zeros((n, width))
        for i, p in enumerate(probs):
            table[i, : len(p)] = p
        idx = np.asarray(dist.Categorical(probs=jnp.asarray(table, jnp.float32)).sample(key))
        return [items[i][int(j)] for i, j in enumerate(idx)]
    if name == "uniform_int":
        v = dist.DiscreteUniform(col("lo", jnp.int32), col("hi", jnp.int32)).sample(key)
        return [int(x) for x in np.asarray(v)]
    if name == "bernoulli":
        return [bool(x) for x in np.asarray(dist.Bernoulli(probs=col("p")).sample(key))]
    if name == "poisson":
        return [int(x) for x in np.asarray(dist.Poisson(col("rate")).sample(key))]
    if name == "categorical":
        width = max(len(a["probs"]) for a in args)
        table = np.zeros((n, width))
        for i, a in enumerate(args):
            p = np.asarray(a["probs"], np.float64)
            table[i, : len(p)] = p / p.sum()
        return [int(x) for x in np.asarray(dist.Categorical(probs=jnp.asarray(table, jnp.float32)).sample(key))]
    if name == "normal":
        return [float(x) for x in np.asarray(dist.Normal(col("mu"), col("sigma")).sample(key))]
    if name == "beta":
        return [float(x) for x in np.asarray(dist.Beta(col("a"), col("b")).sample(key))]
    raise RunError(f"unknown distribution {name!r}")


# ---------------------------------------------------------------------------------------------- utilities


def _to_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    return str(v)


def _msg(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, (StaticError, RunError)) else text


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
