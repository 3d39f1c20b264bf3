"""Host predicates: Python functions in a hole's ``where`` clause, checked on the host.

A predicate ``h.pred(X)``, or a formula of predicates on one hole (``not h.p(X)``, ``h.p(X) or h.q(X)``,
``and``), is checked on the complete value in a ``Host`` segment after the hole: one batched call at the
segment boundary, ``-inf`` where false (:func:`value_check`). ``h.pred(X, prefix=true)`` also sets the hole's
``Hole.prefix_check`` (:func:`prefix_check`, called by the engine after every token of the hole), and the
``Host`` segment after the hole checks every prefix of the complete value not yet accepted
(:func:`prefixes_check`), so the meaning does not depend on the engine's calls. Accepted prefixes are
memoised in the particle's ``data`` under :func:`prefix_memo_key`.

Each call is guarded (:meth:`~lmprog.compiler.runtime_eval.Runtime.call`): an exception is a located error naming
the predicate (it kills its particle; for every particle, the run fails); a call past the time limit or a result
that is not a bool (``True``/``False``, NumPy's too) stops the run with a located error.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lmprog.automata.values import ValueRule
from lmprog.compiler.errors import HostAbort, RunError, error_message
from lmprog.compiler.runtime_eval import Runtime, active, callee_name, describe, short_value
from lmprog.dsl import ast as A
from lmprog.dsl.printer import constraint_to_source

__all__ = ["is_predicate_tree", "predicate_atoms", "predicate_fn", "predicate_label", "prefix_check",
           "prefix_memo_key", "prefixes_check", "truth", "value_check"]


def predicate_atoms(c) -> list:
    """The Python predicates of a constraint tree (``not``/``and``/``or`` of ``h.p(X)``)."""
    return [n for n in A.walk(c) if isinstance(n, A.PyPredicate)]


def is_predicate_tree(c) -> bool:
    """Whether ``c`` is a Python predicate or a ``not``/``and``/``or`` of Python predicates only."""
    if isinstance(c, A.PyPredicate):
        return True
    if isinstance(c, A.Not):
        return is_predicate_tree(c.operand)
    if isinstance(c, (A.And, A.Or)):
        return bool(c.operands) and all(is_predicate_tree(x) for x in c.operands)
    return False


def predicate_label(trees) -> str:
    """The label of the host step checking the formulas ``trees``: their locations and source."""
    return " and ".join(f"{c.span}: {constraint_to_source(c)}" for c in trees)


def prefix_memo_key(engine_name: str) -> str:
    """The particle ``data`` key holding the longest prefix of hole ``engine_name`` already accepted."""
    return f"__prefix_ok:{engine_name}"


def predicate_fn(runtime: Runtime, c, scope, view, i) -> Callable[[str], bool]:
    """``value -> bool`` for particle ``i``: a formula (``not``/``and``/``or``) of Python predicates on one
    hole, with each function and its extra arguments evaluated once (``prefix=`` is not passed on)."""
    if isinstance(c, A.PyPredicate):
        fn = runtime.callable_of(c.func)
        kws = [k for k in c.kwargs if k.name != "prefix"]
        if not c.args and not kws:  # (no host view values needed: cheap in the per-token prefix check)
            return lambda v: truth(runtime, c, v, runtime.call(fn, (v,), {}, c))
        args = [runtime.eval_for(a, scope, view, i) for a in c.args]
        kwargs = {k.name: runtime.eval_for(k.value, scope, view, i) for k in kws}
        return lambda v: truth(runtime, c, v, runtime.call(fn, (v, *args), kwargs, c))
    if isinstance(c, A.Not):
        f = predicate_fn(runtime, c.operand, scope, view, i)
        return lambda v: not f(v)
    fs = [predicate_fn(runtime, x, scope, view, i) for x in c.operands]
    if isinstance(c, A.And):
        return lambda v: all(f(v) for f in fs)
    return lambda v: any(f(v) for f in fs)


def truth(runtime: Runtime, c, value, result) -> bool:
    """The predicate ``c``'s ``result`` on ``value`` as a bool; anything but ``True``/``False`` (a forgotten
    ``return`` gives ``None``) stops the run with a located error: coercing it would silently drop or keep
    particles."""
    if isinstance(result, (bool, np.bool_)):
        return bool(result)
    name = callee_name(c.func)
    raise HostAbort(runtime.error(c.span, f"the predicate {name}() returned {describe(result)} for "
                                          f"{c.hole.id} = {short_value(value)}, not a bool",
                                  "a predicate returns True or False for every value (a function without a "
                                  "`return` on some path returns None)"))


def value_check(runtime: Runtime, c) -> Callable:
    """``compute(view, i, scope) -> bool`` for the host step after a hole: whether the formula ``c`` of Python
    predicates (``h.p(X)``, ``not h.p(X)``, ``h.p(X) or h.q(X)``, ...) holds on particle ``i``'s complete
    value."""
    hole = predicate_atoms(c)[0].hole

    def compute(view, i, sc):
        return predicate_fn(runtime, c, sc, view, i)(runtime.eval_for(hole, sc, view, i))

    return compute


def prefixes_check(runtime: Runtime, trees, engine_name: str) -> Callable:
    """``compute(view, i, scope) -> bool`` for ``prefix=true`` predicates, checked on the complete value after
    the hole: every non-empty prefix (in characters) of the value must satisfy every formula. Prefixes the
    per-token ``Hole.prefix_check`` has already accepted (memo in the particle's data) are not checked again."""
    memo = prefix_memo_key(engine_name)
    hole = predicate_atoms(trees[0])[0].hole

    def compute(view, i, sc):
        value = runtime.eval_for(hole, sc, view, i)
        value = "" if value is None else str(value)
        checked = view.data[i].pop(memo, None)
        begin = len(checked) if isinstance(checked, str) and value.startswith(checked) else 0
        fs = [predicate_fn(runtime, c, sc, view, i) for c in trees]
        return all(f(value[:j]) for j in range(max(begin, 0) + 1, len(value) + 1) for f in fs)

    return compute


def prefix_check(runtime: Runtime, tokenizer, trees, scope, guard, engine_name: str, rule: ValueRule,
                 label: str) -> Callable:
    """The hole's ``prefix_check``: ``view -> [P] bool``, False for the particles whose partial value has a
    prefix that fails a ``prefix=true`` formula. The partial value is what is certainly part of the value:
    the generated bytes minus a possible start of the terminator (the longest suffix that begins the
    following text / ``stop_before`` string; a ``stop_at`` string is part of the value), minus the healed
    space, minus an incomplete UTF-8 character at the end. Every character prefix not yet accepted is
    checked (the accepted part is memoised in the particle's data, so each prefix is checked once)."""
    memo = prefix_memo_key(engine_name)

    def check(view) -> np.ndarray:
        ok = np.ones(len(view), bool)
        act = active(guard, view)
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
                fs = [predicate_fn(runtime, c, scope, view, i) for c in trees]
                good = all(f(value[:j]) for j in range(begin + 1, len(value) + 1) for f in fs)
            except Exception as exc:  # noqa: BLE001 - a failing predicate kills its particle
                errors.append(exc)
                good = False
            ok[i] = good
            if good:
                view.data[i][memo] = value
        if errors and len(errors) == in_hole:  # every particle in the hole failed with an error
            raise RunError(f"{label}: failed for every particle: {error_message(errors[0])}")
        return ok

    return check
