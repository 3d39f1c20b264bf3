"""Run-time evaluation: the values of the program's names and expressions for one particle during the run.

The lowering resolves names through *references* (:class:`Ref`): a static value, a hole's value, a
per-particle host value (``view.data``), a list of references (loops), or a per-particle branch choice (after
an ``if``). At run time an expression is evaluated for particle ``i`` of a host view (:func:`eval_for`) or of a
finished sample, with Python semantics (:class:`RunEvaluator`) and the run-time built-ins: ``tokens`` (the
model's tokenizer), ``logprob`` (of the holes completed so far), ``logprob_of`` / ``M.logprob_of`` (scores of
given text under a model, computed on the device for all particles of a host step at once: :meth:`Runtime.prefetch`)
and the Python callables of the program (:class:`Runtime`: ``functions=`` callables and ``import "file.py" as h``
modules).

**LM scores are batched, in two phases.** A host step (the lowering's ``let``/``condition``/``factor``/``if``/
``sample`` segments and rendered text) first calls :meth:`Runtime.prefetch` with its expressions and its active
particles. If an expression calls ``logprob_of``, prefetch evaluates it for every particle in *collect* mode: each
``logprob_of`` whose score is not known yet records its request ``(model, context, text)`` and returns 0 (a
stand-in; that evaluation's result and errors are discarded), then every recorded request is scored in one batched
call per model (:class:`lmprog.backends.scoring.Scorer`, duplicates once). It repeats while new requests appear (a
request whose text depends on another score needs a second round), then the step evaluates each particle as usual,
every ``logprob_of`` now a look-up. An expression that calls ``logprob_of`` is therefore evaluated more than once
per particle: the Python functions it calls should be pure. Expressions without ``logprob_of`` are evaluated once,
as before.

Every call into the user's Python code (:meth:`Runtime.call`: functions in expressions, predicates, the import
of a module) is guarded: an exception becomes a :class:`~lmprog.compiler.errors.HostError` located at the
``.lmp`` call site (it kills its particle, as before); a call past the time limit (:func:`host_time_limit`,
default :data:`DEFAULT_HOST_TIMEOUT` seconds), ``SystemExit`` or another ``BaseException`` stops the run
(:class:`~lmprog.compiler.errors.HostAbort`); ``KeyboardInterrupt`` passes through (it is the user's Ctrl-C).
A ``factor`` whose value is no number, NaN or ``+inf`` stops the run too (:func:`check_factor`, called by
the lowering of ``factor``; :meth:`Runtime.factor_error` is its located error).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from lmprog.compiler.bytedfa import RegexError, regex_fullmatch
from lmprog.compiler.errors import HostAbort, HostError, diagnostic, lowering_error
from lmprog.compiler.json_text import JsonArray, JsonObject, json_hole_value
from lmprog.compiler.regex_compile import LIMIT_HELP, RegexLimitError
from lmprog.dsl import ast as A
from lmprog.dsl.static import PURE_BUILTINS, Evaluator, StaticError

__all__ = ["DEFAULT_HOST_TIMEOUT", "HostTimeout", "ParticleContext", "Ref", "RunEvaluator", "Runtime", "active",
           "call_limited", "check_factor", "guarded_ref", "hole_names", "host_time_limit", "resolve", "static_ref",
           "to_text", "uses_lm_scores", "view_logprobs"]


# --------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Ref:
    """How a name's value is found for particle ``i``: ``kind`` static / hole / json (a json() hole: its text
    parsed) / data / list / branch."""

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
    if k == "json":  # a json() hole: its parsed value (objects and arrays print as JSON: json_text)
        text = ctx.values.get(ref.value)
        return None if text is None else json_hole_value(text)
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
    if ref.kind in ("hole", "json"):
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
    """A value interpolated into text: booleans as the language writes them, ``None`` as nothing, the objects and
    arrays of a json hole as JSON text (their ``str``: :mod:`lmprog.compiler.json_text`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    return str(v)


# -------------------------------------------------------------------------------------- guarded host calls

#: Seconds one call into the user's Python code may take (``--host-timeout``, ``Program.run(host_timeout=)``).
DEFAULT_HOST_TIMEOUT = 30.0

_TIME_LIMIT: contextvars.ContextVar[float] = contextvars.ContextVar("lmprog_host_timeout",
                                                                      default=DEFAULT_HOST_TIMEOUT)
_LOCAL = threading.local()  # .depth: guarded calls in progress in this thread (nested calls are not timed)


@contextlib.contextmanager
def host_time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Within the block, each call into user code may take ``seconds`` (``None``: the default; ``0`` or
    ``inf``: no limit). Set per thread (a ``ContextVar``), so concurrent runs keep their own limits."""
    token = _TIME_LIMIT.set(DEFAULT_HOST_TIMEOUT if seconds is None else float(seconds))
    try:
        yield
    finally:
        _TIME_LIMIT.reset(token)


class HostTimeout(Exception):
    """A guarded call ran past its time limit; ``where``: the user's line it was running, if known."""

    def __init__(self, seconds: float, where: str = ""):
        super().__init__(f"did not return within {seconds:g} s")
        self.seconds, self.where = seconds, where


class _Alarm(BaseException):
    """Raised by the SIGALRM handler inside the user's code (a BaseException: ``except Exception`` in the
    user's code does not swallow it)."""


def call_limited(fn: Callable, args=(), kwargs=None, seconds: Optional[float] = None) -> Any:
    """``fn(*args, **kwargs)``, raising :class:`HostTimeout` when it takes longer than ``seconds`` (default:
    the current :func:`host_time_limit`).

    On the main thread of a POSIX process the call runs in place under ``SIGALRM`` (``setitimer``): cheap
    (two system calls), and the alarm interrupts Python code wherever it is. Elsewhere (another thread, no
    ``setitimer``, or a timer of someone else's already armed) the call runs in a worker thread that is
    abandoned if it does not finish in time; that also stops waiting on C code that never returns to the
    interpreter, which a signal cannot interrupt."""
    kwargs = kwargs or {}
    limit = _TIME_LIMIT.get() if seconds is None else float(seconds)
    depth = getattr(_LOCAL, "depth", 0)
    if depth or not limit or not limit > 0 or math.isinf(limit):  # nested, or no limit
        return fn(*args, **kwargs)
    _LOCAL.depth = depth + 1
    try:
        if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
                and signal.getitimer(signal.ITIMER_REAL)[0] == 0):
            return _with_alarm(fn, args, kwargs, limit)
        return _in_thread(fn, args, kwargs, limit)
    finally:
        _LOCAL.depth = depth


def _with_alarm(fn, args, kwargs, limit: float):
    fired = []

    def on_alarm(signum, frame):
        fired.append(_running_at(frame))
        raise _Alarm()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        # the alarm repeats every 0.1 s: user code that catches BaseException and carries on is interrupted
        # again; once the timer is disarmed, a signal still pending finds the previous handler
        signal.setitimer(signal.ITIMER_REAL, limit, 0.1)
        try:
            result = fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Alarm:
        raise HostTimeout(limit, fired[0] if fired else "") from None
    finally:
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the user's code swallowed the alarm and returned late: still past the limit
        raise HostTimeout(limit, fired[0])
    return result


def _in_thread(fn, args, kwargs, limit: float):
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="lmprog host call", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():  # abandoned: a daemon thread never keeps the process alive
        frame = sys._current_frames().get(worker.ident)
        raise HostTimeout(limit, _running_at(frame) if frame is not None else "")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _running_at(frame) -> str:
    """``file:line, in name`` of the innermost frame of ``frame``'s stack outside this module."""
    for fs in reversed(traceback.extract_stack(frame)):
        if fs.filename != __file__:
            return f"{os.path.basename(fs.filename)}:{fs.lineno}, in {fs.name}"
    return ""


def _raised_at(exc: BaseException) -> str:
    """``file:line, in name`` of the innermost frame of ``exc``'s traceback outside this module."""
    for fs in reversed(traceback.extract_tb(exc.__traceback__)):
        if fs.filename != __file__:
            return f"{os.path.basename(fs.filename)}:{fs.lineno}, in {fs.name}"
    return ""


def callee_name(f) -> str:
    """How a message names the called function: ``h.pred``, ``score``."""
    if isinstance(f, A.Attribute) and isinstance(f.value, A.Name):
        return f"{f.value.id}.{f.attr}"
    if isinstance(f, A.Name):
        return f.id
    return "the function"


def short_value(v: Any, limit: int = 60) -> str:
    """``repr(v)``, cut to about ``limit`` characters (values in messages)."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _source(expr) -> str:
    """An expression as the program spells it (for messages)."""
    from lmprog.dsl.printer import expr_to_source

    try:
        return expr_to_source(expr)
    except Exception:  # noqa: BLE001 - a message detail only
        return "value"


def describe(v: Any) -> str:
    """A value in a message: ``None``, ``str 'high'``, ``int 3``."""
    return "None" if v is None else f"{type(v).__name__} {short_value(v)}"


def check_factor(value: Any) -> Optional[str]:
    """Why ``value`` cannot be a factor's log-weight increment (None if it can): a factor is an int or a float
    (NumPy numbers too), finite or ``-inf`` (which rejects the particle); a bool is refused (it is almost
    always a ``condition`` written as ``factor``)."""
    if isinstance(value, (bool, np.bool_)):
        return f"is a bool ({'true' if value else 'false'}), not a number"
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return f"is {describe(value)}, not a number"
    x = float(value)
    if math.isnan(x):
        return "is NaN"
    if x == math.inf:
        return "is +inf"
    return None


# --------------------------------------------------------------------------------------------- LM scores

#: Collect rounds of one host step before its remaining ``logprob_of`` requests count as failed (each round
#: resolves one level of scores whose arguments depend on other scores).
MAX_SCORE_ROUNDS = 8

_MISSING = object()


def lm_score_model(f: A.Expr) -> Any:
    """For a call's function: ``None`` for ``logprob_of`` (the program's model), the alias for
    ``M.logprob_of``, else ``_MISSING`` (not an LM score)."""
    if isinstance(f, A.Name) and f.id == "logprob_of":
        return None
    if isinstance(f, A.Attribute) and f.attr == "logprob_of" and isinstance(f.value, A.Name):
        return f.value.id
    return _MISSING


def uses_lm_scores(expr: A.Node) -> bool:
    """Whether ``expr`` calls ``logprob_of`` (of any model)."""
    return any(isinstance(n, A.Call) and lm_score_model(n.func) is not _MISSING for n in A.walk(expr))


# --------------------------------------------------------------------------------------------- the runtime


class Runtime:
    """What expressions evaluated during the run can use besides their names: ``functions=`` callables (by
    bare name), the program's imported modules (``import "helpers.py" as h``, loaded once, relative to the
    program's file) and the model's tokenizer (``tokens(X)``)."""

    def __init__(self, program, tokenizer, scorers: Optional[Mapping[Optional[str], Any]] = None):
        self.program = program
        self.tokenizer = tokenizer
        self.functions = dict(program.functions)
        self.modules: dict[str, Any] = {}
        # logprob_of: the scorer of each model (None: the program's own; aliases of `model M = "..."`), and the
        # scores of the current host step, {(model, context, text): float or the error that request gave}
        self.scorers: dict[Optional[str], Any] = dict(scorers or {})
        self.scores: dict[tuple, Any] = {}
        self._uses_scores: dict[int, bool] = {}

    def prefetch(self, items, view, idx) -> None:
        """Score, in one batched call per model, every ``logprob_of`` that the expressions ``items``
        (``[(expr, scope), ...]``) make for the particles ``idx`` of ``view`` (module docstring); afterwards
        :meth:`eval_for` finds each score in :attr:`scores`. A no-op for expressions without ``logprob_of``."""
        self.prefetch_contexts(items, [ParticleContext(view.values[i], view.data[i], view_logprobs(view, i))
                                       for i in idx])

    def prefetch_contexts(self, items, contexts) -> None:
        """:meth:`prefetch` for the particles ``contexts`` (:class:`ParticleContext` each); a finished sample's
        displayed text uses it too (its requests were scored during the run: the scorer remembers them)."""
        items = [(e, sc) for e, sc in items if self._needs_scores(e)]
        self.scores = {}
        if not items or not contexts:
            return
        for _ in range(MAX_SCORE_ROUNDS):
            missing: dict[tuple, None] = {}
            for ctx in contexts:
                for expr, scope in items:
                    try:
                        RunEvaluator(scope, ctx, self, collect=missing).eval(expr)
                    except (Exception, HostAbort):  # noqa: BLE001 - a stand-in pass: the real one reports it
                        pass
            if not missing:
                return
            self._score(list(missing))

    def _needs_scores(self, expr) -> bool:
        key = id(expr)
        if key not in self._uses_scores:
            self._uses_scores[key] = uses_lm_scores(expr)
        return self._uses_scores[key]

    def _score(self, requests: list[tuple]) -> None:
        """Score ``requests`` (``(model, context, text)``) into :attr:`scores`: one batch per scorer (a judge
        that is the program's own model, e.g. both "smollm2-135m", shares its batch)."""
        by_scorer: dict[int, tuple[Any, list[tuple]]] = {}
        for r in requests:
            scorer = self.scorers.get(r[0])
            if scorer is None:
                what = "the program's model" if r[0] is None else f"the model '{r[0]}'"
                self.scores[r] = StaticError(f"{what} is not available to score text (lower(..., scorers=...))")
                continue
            by_scorer.setdefault(id(scorer), (scorer, []))[1].append(r)
        for scorer, reqs in by_scorer.values():
            for r, v in zip(reqs, scorer.score([(c, t) for _, c, t in reqs])):
                self.scores[r] = v

    def error(self, span, message: str, help: Optional[str] = None) -> HostError:
        """A :class:`HostError` located at ``span`` of the program."""
        return HostError(diagnostic(self.program, span, message, help))

    def factor_error(self, expr: A.Expr, problem: str) -> HostError:
        """The located error for a ``factor`` whose value ``expr`` gave cannot be a log-weight increment
        (``problem``: what :func:`check_factor` said); the lowering raises it as a :class:`HostAbort`."""
        return self.error(expr.span, f"the factor {_source(expr)} {problem}",
                          "a factor adds a number to the particle's log-weight: a finite int or float, or -inf "
                          "to reject the particle (use `condition` for a true/false test)")

    def call(self, fn: Callable, args, kwargs, node, what: Optional[str] = None) -> Any:
        """``fn(*args, **kwargs)``: a call into the user's code at ``node`` (a call, a predicate; ``what``: how
        messages name it, default ``h.pred()`` from the node's function), guarded. An exception becomes a :class:`HostError` naming the function, the call site and
        the user's line that raised (it kills the particle); a call past the time limit, ``SystemExit`` or any
        other ``BaseException`` raises :class:`HostAbort` (the run stops); ``KeyboardInterrupt`` passes."""
        name = what or callee_name(getattr(node, "func", None)) + "()"
        try:
            return call_limited(fn, args, kwargs)
        except (KeyboardInterrupt, HostAbort):
            raise
        except HostTimeout as exc:
            where = f" (it was running {exc.where})" if exc.where else ""
            raise HostAbort(self.error(node.span, f"{name} did not return within {exc.seconds:g} s{where}",
                                       "a call into Python code may take at most --host-timeout SECONDS "
                                       f"(Program.run(host_timeout=...); default {DEFAULT_HOST_TIMEOUT:g} s, "
                                       "0 for no limit)")) from None
        except Exception as exc:
            # one line, the exception first: it kills its particle, and a host step that fails for every
            # particle reports it after its own location ("...: failed for every particle: ValueError: ...")
            at = _raised_at(exc)
            text = f"{type(exc).__name__}: {exc} (raised by {name} called at {node.span}" + \
                (f"; {at})" if at else ")")
            raise HostError(diagnostic(self.program, node.span, f"{name} raised {type(exc).__name__}: {exc}"),
                            text) from exc
        except BaseException as exc:  # SystemExit (sys.exit, exit()), GeneratorExit, the user's own subclasses
            at = _raised_at(exc)
            kind = f"{type(exc).__name__}({short_value(exc.code) if isinstance(exc, SystemExit) else exc})"
            raise HostAbort(self.error(node.span, f"{name} raised {kind}" + (f" ({at})" if at else ""),
                                       "Python code called from a program must return a value; "
                                       "sys.exit() there stops nothing but the run")) from None

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
            # the module's top-level code is user code: timed and guarded like a call
            self.call(mspec.loader.exec_module, (mod,), {}, spec, what=f'the import of "{spec.path}"')
        except HostAbort:
            sys.modules.pop(name, None)
            raise
        except Exception as exc:
            sys.modules.pop(name, None)
            cause = exc.__cause__ if isinstance(exc, HostError) and exc.__cause__ is not None else exc
            raise lowering_error(p, spec.span, f"importing {spec.path} failed: {type(cause).__name__}: {cause}") from None
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
    ``tokens`` (the model's tokenizer), ``logprob`` (of the holes completed so far), ``logprob_of`` (a look-up of
    the score :meth:`Runtime.prefetch` computed; ``collect`` mode records unknown requests), imported and
    ``functions=`` callables."""

    def __init__(self, scope: Mapping[str, Ref], ctx: ParticleContext, runtime: Runtime,
                 collect: Optional[dict] = None):
        super().__init__({})
        self.scope, self.ctx, self.runtime = scope, ctx, runtime
        self.collect = collect  # collect mode (Runtime.prefetch): unknown LM scores are recorded here, 0 returned

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
                ok = self._matches(left, right, right_e)
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

    def _matches(self, text: Any, pattern: Any, pattern_e: A.Expr) -> bool:
        """``text matches pattern`` on the constraint compiler's byte DFA (linear in the text, never
        backtracking, the same semantics as static ``matches`` and ``where``). A pattern with no automaton (past
        the automaton bounds, or syntax the compiler does not support) stops the run with an error located at
        the regex."""
        if not isinstance(text, str) or not isinstance(pattern, str):
            raise StaticError(f"'matches' needs two strings, not {describe(text)} matches {describe(pattern)}")
        try:
            return regex_fullmatch(pattern, text)
        except RegexError as exc:
            help = (LIMIT_HELP if isinstance(exc, RegexLimitError) else
                    "`matches` uses constraint regexes: the common subset of Python re and Rust regex syntax")
            raise HostAbort(self.runtime.error(pattern_e.span, f"cannot match against the regex "
                                               f"{short_value(pattern)}: {exc.reason}", help)) from None

    def _logprob_of(self, e: A.Call, model: Optional[str]) -> float:
        """``logprob_of(TEXT, given=CONTEXT)``: the score :meth:`Runtime.prefetch` computed for this request."""
        name = "logprob_of" if model is None else f"{model}.logprob_of"
        text = self.eval(e.args[0])
        context = self.eval(next(k.value for k in e.kwargs if k.name == "given"))
        if not isinstance(text, str) or not isinstance(context, str):
            raise StaticError(f"{name}() scores strings, not {describe(text)} given {describe(context)}")
        key = (model, context, text)
        got = self.runtime.scores.get(key, _MISSING)
        if got is _MISSING:
            if self.collect is not None:
                self.collect[key] = None
                return 0.0
            raise StaticError(f"{name}() is scored only in the statements of a program (let, condition, factor, "
                              "if, a template), for all particles at once")
        if isinstance(got, Exception):
            raise StaticError(f"{name}(): {got}")
        return got

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
        model = lm_score_model(f)
        if model is not _MISSING and (model is None or model not in self.runtime.program.imports):
            return self._logprob_of(e, model)
        if isinstance(f, A.Name) and f.id == "str" and len(e.args) == 1 and not e.kwargs:
            value = self.eval(e.args[0])  # a json hole's object/array: its JSON text (a plain collection: error)
            return str(value) if isinstance(value, (JsonObject, JsonArray)) else PURE_BUILTINS["str"](value)
        if isinstance(f, A.Name) and f.id in PURE_BUILTINS:
            return super()._Call(e)
        fn = self.runtime.callable_of(f)
        args = [self.eval(a) for a in e.args]
        kwargs = {k.name: self.eval(k.value) for k in e.kwargs}
        return self.runtime.call(fn, args, kwargs, e)
