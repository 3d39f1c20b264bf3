"""Checks of ``where`` clauses: holes, arguments, how constraints combine, regexes, and cheap emptiness.

For each statement with a ``where`` clause, :func:`check_where`

1. reports terms that are no constraint (``InvalidConstraint``), and checks ``grammar()`` / ``json()``: their
   files exist and compile on the regular path (:mod:`lmprog.compiler.structured`; errors in a grammar file are
   located in it);
2. checks every constraint names a hole *of its own statement* (``[answer]`` in the template, or the ``gen``
   name);
3. checks arguments: regexes, stop strings, choice lists and bounds are strings / lists of strings / integers known
   before the run (literals, inputs, lets of those), regexes are valid constraint regexes
   (:mod:`lmprog.compiler.check_regex`), predicates exist (``functions=`` or ``h.f`` in an imported file);
4. checks combinations: each ``and`` term constrains one hole; ``or`` joins terms on the same hole and of the
   same kind (regex-like with regex-like, bounds of the same count, predicates with the same ``prefix=``);
   ``not`` applies to regex-like terms, bounds and complete-string predicates; ``stop_at`` / ``stop_before``
   appear once per hole, at the top level;
5. detects, where cheap, constraints that admit no string at all: choice lists (and literal regexes) filtered by
   every other constraint on the hole that can be evaluated on a string, contradictory count bounds, incompatible
   prefixes / suffixes, forbidden substrings that a required prefix contains, and regexes that match nothing.

It returns, per hole, the ``and`` of the terms that constrain it (what the lowering compiles).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from lmprog.compiler.check_env import KIND_WORD, UNKNOWN, CheckContext, Env, regex_span, show_value
from lmprog.compiler.check_regex import fullmatch, regex_problem
from lmprog.dsl import ast as A
from lmprog.dsl.catalog import BUILTINS, CONSTRAINT_HELP, CONSTRAINT_WORDS, IS_FLOAT_REGEX, IS_INT_REGEX
from lmprog.dsl.constraints import conjuncts, join
from lmprog.dsl.errors import suggestion
from lmprog.dsl.printer import constraint_to_source
from lmprog.dsl.source import Span, normalize_source

REGEX_LIKE = (A.Matches, A.InChoices, A.IsInt, A.IsFloat, A.Contains, A.StartsWith, A.EndsWith)
OR_HELP = ("'or' and 'not' work on regex-like constraints (matches, in, is_int, is_float, contains, startswith,\n"
           "endswith), on bounds of one count (tokens, len or words), and on predicates with the same prefix=")
_KIND_TEXT = {"regex": "a regex-like constraint", "stop": "stop_at/stop_before", "predicate": "a predicate",
              "prefix predicate": "a prefix=true predicate", "grammar": "grammar()", "json": "json()",
              "count:tokens": "a bound on tokens()", "count:len": "a bound on len()",
              "count:words": "a bound on words()"}
_META = set(".^$*+?{}[]\\|()")


def check_where(ck: CheckContext, where: Optional[A.Constraint], holes: dict[str, Span], before: Env,
                after: Env) -> dict[str, A.Constraint]:
    """Check a statement's ``where`` clause; returns each hole's constraint (only holes that have one)."""
    if where is None:
        return {}
    per_hole: dict[str, list[A.Constraint]] = {}
    for term in conjuncts(where):
        if not _check_tree(ck, term, holes, before, after):
            continue
        names = _holes_of(term)
        if len(names) == 1:
            per_hole.setdefault(names.pop(), []).append(term)
    result = {}
    for name, terms in per_hole.items():
        stops = [t for t in terms if isinstance(t, A.StopAt)]
        for extra in stops[1:]:
            ck.error(extra.span, f"hole '{name}' has more than one stop_at/stop_before",
                     f"the first is at line {stops[0].span.line}; a hole ends at one stop string")
        _emptiness(ck, name, terms, after)
        result[name] = join(terms, terms[0].span)
    return result


# ------------------------------------------------------------------------------------------------ structure


def _holes_of(c: A.Constraint) -> set[str]:
    out = set()
    for node in A.walk(c):
        if isinstance(node, A.CONSTRAINT_ATOMS):
            out.add(node.hole.id)
    return out


def kind_of(c: A.Constraint) -> Optional[str]:
    """What a constraint compiles to: regex, count:KIND, stop, predicate, prefix predicate, grammar, json, mixed."""
    if isinstance(c, REGEX_LIKE):
        return "regex"
    if isinstance(c, A.CountBound):
        return "count:" + c.kind
    if isinstance(c, A.StopAt):
        return "stop"
    if isinstance(c, A.PyPredicate):
        return "prefix predicate" if c.prefix else "predicate"
    if isinstance(c, A.GrammarC):
        return "grammar"
    if isinstance(c, A.JsonC):
        return "json"
    if isinstance(c, A.Not):
        return kind_of(c.operand)
    if isinstance(c, (A.And, A.Or)):
        kinds = {kind_of(o) for o in c.operands}
        kinds.discard(None)
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)
    return None


def _check_tree(ck: CheckContext, c: A.Constraint, holes: dict[str, Span], before: Env, after: Env) -> bool:
    """Check one top-level ``and`` term (recursively); True when it is fully valid."""
    if isinstance(c, A.InvalidConstraint):
        ck.error(c.span, c.message, c.help)
        return False
    if isinstance(c, (A.And, A.Or, A.Not)):
        children = c.operands if not isinstance(c, A.Not) else (c.operand,)
        ok = all([_check_tree(ck, o, holes, before, after) for o in children])
        return ok and _check_combination(ck, c)
    return _check_atom(ck, c, holes, before, after)


def _check_combination(ck: CheckContext, c: A.Constraint) -> bool:
    word = "not" if isinstance(c, A.Not) else ("or" if isinstance(c, A.Or) else "and")
    if word == "and":
        names = _holes_of(c)
        if len(names) > 1:
            ck.error(c.span, f"this part of the where clause constrains several holes ({', '.join(sorted(names))})",
                     "split it into separate terms joined by 'and' at the top level")
            return False
        return True
    names = _holes_of(c)
    if len(names) > 1:
        ck.error(c.span, f"'{word}' combines constraints on different holes ({', '.join(sorted(names))})",
                 f"each side of '{word}' must constrain the same hole")
        return False
    for node in A.walk(c):
        if isinstance(node, A.StopAt):
            ck.error(node.span, f"{'stop_at' if node.keep else 'stop_before'}() cannot be used under 'or' or 'not'",
                     "a hole ends at one stop string: put it at the top level of the where clause")
            return False
        if isinstance(node, (A.GrammarC, A.JsonC)):
            name = "grammar" if isinstance(node, A.GrammarC) else "json"
            ck.error(node.span, f"{name}() cannot be combined with 'or' or 'not'")
            return False
    if isinstance(c, A.Not) and kind_of(c.operand) == "prefix predicate":
        ck.error(c.span, "'not' cannot be applied to a prefix=true predicate",
                 "prefix=true checks that every prefix can still be completed, and its negation is no such check;\n"
                 "drop prefix=true to check the complete hole")
        return False
    kinds = [kind_of(o) for o in (c.operands if isinstance(c, A.Or) else (c.operand,))]
    distinct = []
    for k in kinds:
        if k not in distinct:
            distinct.append(k)
    if "mixed" in distinct or len(distinct) > 1:
        atoms = [kind_of(n) for n in A.walk(c) if isinstance(n, A.CONSTRAINT_ATOMS)]
        shown = list(dict.fromkeys(atoms))
        what = " and ".join(_KIND_TEXT.get(k, k) for k in shown[:2])
        ck.error(c.span, f"'{word}' needs constraints of the same kind on both sides; here: {what}", OR_HELP)
        return False
    return True


# -------------------------------------------------------------------------------------------------- atoms


def _check_atom(ck: CheckContext, c: A.Constraint, holes: dict[str, Span], before: Env, after: Env) -> bool:
    ok = _check_hole(ck, c.hole, holes, after)
    if isinstance(c, A.Matches):
        ok &= _static_arg(ck, c.pattern, after, "str", "the regex of matches")
        pattern = ck.fold(c.pattern, after, report=False)
        if isinstance(pattern, str):
            problem = regex_problem(pattern)
            if problem:
                message, pos, help = problem
                ck.error(regex_span(ck, c.pattern, pos), message, help)
                ok = False
    elif isinstance(c, A.InChoices):
        ok &= _static_arg(ck, c.choices, after, "list", "the choices of 'in'")
        ok &= _check_choices(ck, c)
    elif isinstance(c, A.StopAt):
        word = "stop_at" if c.keep else "stop_before"
        ok &= _static_arg(ck, c.text, after, "str", f"the stop string of {word}()")
        if ck.fold(c.text, after, report=False) == "":
            ck.error(c.text.span, f"the stop string of {word}() must not be empty")
            ok = False
    elif isinstance(c, A.CountBound):
        if _static_arg(ck, c.n, after, "int", f"the bound of {c.kind}()"):
            n = ck.fold(c.n, after, report=False)
            if n is not UNKNOWN and (not isinstance(n, int) or isinstance(n, bool)):
                ck.error(c.n.span, f"the bound of {c.kind}() must be an integer, not {show_value(n)}")
                ok = False
        else:
            ok = False
    elif isinstance(c, (A.Contains, A.StartsWith, A.EndsWith)):
        name = {A.Contains: "contains", A.StartsWith: "startswith", A.EndsWith: "endswith"}[type(c)]
        ok &= _static_arg(ck, c.text, after, "str", f"the string of {name}()")
    elif isinstance(c, A.GrammarC):
        ok &= _static_arg(ck, c.path, after, "str", "the grammar file") and _check_structured(ck, c, c.path, after)
    elif isinstance(c, A.JsonC):
        if c.schema is not None:
            ok &= _static_arg(ck, c.schema, after, "str", "the JSON schema file") and \
                _check_structured(ck, c, c.schema, after)
        else:
            ok &= _check_structured(ck, c, None, after)
    elif isinstance(c, A.PyPredicate):
        ok &= _check_predicate(ck, c, before, after)
    return bool(ok)


def _check_hole(ck: CheckContext, hole: A.Name, holes: dict[str, Span], env: Env) -> bool:
    if hole.id in holes:
        return True
    if not holes:
        ck.error(hole.span, f"'{hole.id}' is not a hole of this statement: it has no holes",
                 "a where clause constrains the [holes] of its own template (or the gen name)")
        return False
    b = env.get(hole.id)
    here = ", ".join(holes)
    if b is not None and b.kind == "hole":
        ck.error(hole.span, f"'{hole.id}' is a hole of another statement (line {b.span.line})",
                 f"a where clause constrains the holes of its own statement; holes here: {here}")
    else:
        ck.error(hole.span, f"'{hole.id}' is not a hole of this statement" + suggestion(hole.id, holes),
                 f"holes here: {here}")
    return False


def _static_arg(ck: CheckContext, e: A.Expr, env: Env, typ: str, what: str) -> bool:
    """Check an argument that must be known before the run and have type ``typ``."""
    actual = ck.expr(e, env)
    if not ck.require_static(e, env, what):
        return False  # the first problem; its type would only repeat it
    if actual not in (typ, "any"):
        words = {"str": "a string", "list": "a list", "int": "an integer"}
        value = ck.fold(e, env, report=False)
        shown = f", not {show_value(value)}" if value is not UNKNOWN and not isinstance(value, (list, dict)) else ""
        ck.error(e.span, f"{what} must be {words[typ]}{shown}")
        return False
    return True


def _check_choices(ck: CheckContext, c: A.InChoices) -> bool:
    if isinstance(c.choices, A.ListExpr):
        if not c.choices.items:
            ck.error(c.span, f"'{c.hole.id} in []' admits no string", "list at least one choice")
            return False
        ok = True
        for item in c.choices.items:
            if isinstance(item, A.LITERALS) and not isinstance(item, A.Str):
                ck.error(item.span, "the choices of 'in' must be strings",
                         f'write "{item.value}"' if not isinstance(item, A.Bool) else None)
                ok = False
        return ok
    return True


def _check_predicate(ck: CheckContext, c: A.PyPredicate, before: Env, after: Env) -> bool:
    for arg in c.args:
        ck.expr(arg, before)
    for kw in c.kwargs:
        ck.expr(kw.value, before)
    func = c.func
    if isinstance(func, A.Attribute):
        if not isinstance(func.value, A.Name):
            ck.error(func.span, "a predicate is a function of an imported module (h.pred) or of functions=")
            return False
        return ck.module_attribute(func, after)
    assert isinstance(func, A.Name)
    b = after.get(func.id)
    if b is not None and b.kind == "function":
        call = A.Call(func, (c.hole, *c.args), c.kwargs, span=c.span)
        ck.python_signature(call, func.id)
        return True
    if b is not None:
        ck.error(func.span, f"'{func.id}' is {_kind_word(b.kind)}, not a predicate")
        return False
    if func.id in BUILTINS:
        ck.error(func.span, f"'{func.id}' is a built-in function, not a constraint", CONSTRAINT_HELP)
        return False
    candidates = [*CONSTRAINT_WORDS, *(n for n, bb in after.items() if bb.kind == "function")]
    ck.error(func.span, f"unknown constraint '{func.id}'" + suggestion(func.id, candidates), CONSTRAINT_HELP)
    return False


def _kind_word(kind: str) -> str:
    return KIND_WORD.get(kind, kind)


def _check_structured(ck: CheckContext, c, path_expr: Optional[A.Expr], env: Env) -> bool:
    """``grammar(X, "f.lark")`` / ``json(X[, schema="f.json"])``: the file exists, parses, uses only what the
    regular path supports (:mod:`lmprog.compiler.structured`), and its automaton is within the bounds. Errors in a
    grammar file are located in it; schema errors at the call, with the JSON pointer."""
    from lmprog.compiler.bytedfa import regex_dfa
    from lmprog.compiler.structured import (NeedsHostMatcher, StructureError, grammar_line, grammar_regex,
                                            grammar_span, load_schema, resolve_path, schema_error_text, schema_regex)
    from lmprog.compiler.regex_compile import RegexError

    is_grammar = isinstance(c, A.GrammarC)
    what = "grammar file" if is_grammar else "JSON schema file"
    text = path = None
    if path_expr is not None:
        if not _check_file(ck, path_expr, env, what, None):
            return False
        path = ck.fold(path_expr, env, report=False)
        if not isinstance(path, str):
            return True
        try:
            text = normalize_source(ck.resolve(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            ck.error(path_expr.span, f"cannot read the {what} '{path}': {exc}")
            return False
    try:
        if is_grammar:
            shown = resolve_path(os.path.dirname(ck.source.name), path)
            try:
                pattern = grammar_regex(text, shown)
            except NeedsHostMatcher:  # context-free: the host path (llguidance checks it when the hole compiles)
                return True
            except StructureError as e:
                span = grammar_span(shown, text, e.where)
                ck.error(span, f"grammar '{path}': {e.message}", e.help, source_line=grammar_line(text, span.line))
                return False
        else:
            try:
                doc = load_schema(text) if path is not None else True
            except ValueError as exc:
                ck.error(path_expr.span, f"{what} '{path}' is not valid JSON: {str(exc)[:120]}")
                return False
            try:
                pattern = schema_regex(doc)
            except NeedsHostMatcher:  # context-free: the host path
                return True
            except StructureError as e:
                ck.error(c.span, schema_error_text(path or "", e), e.help)
                return False
        regex_dfa(pattern)
    except RegexError as e:
        ck.error(c.span, f"{'grammar' if is_grammar else 'json'}() constraint cannot be compiled: {e}")
        return False
    return True


def _check_file(ck: CheckContext, e: A.Expr, env: Env, what: str, parse) -> bool:
    """Whether the file ``e`` names exists (and ``parse`` accepts it); reports it otherwise."""
    path = ck.fold(e, env, report=False)
    if not isinstance(path, str):
        return True
    resolved = ck.resolve(path)
    try:
        is_file = resolved.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        reason = exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else str(exc)
        ck.error(e.span, f"cannot use '{path[:57] + '...' if len(path) > 60 else path}' as a file name: {reason}")
        return False
    if not is_file:
        ck.error(e.span, f"{what} not found: '{path}'", f"paths are relative to the program's folder ({ck.base_dir})")
        return False
    if parse is not None:
        try:
            parse(resolved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            ck.error(e.span, f"{what} '{path}' is not valid: {str(exc)[:120]}")
            return False
    return True


# ------------------------------------------------------------------------------------------------ emptiness


def _emptiness(ck: CheckContext, name: str, terms: list[A.Constraint], env: Env) -> None:
    """Report the first term that makes the constraints on one hole admit no string (cheap cases only)."""
    fold = lambda e: ck.fold(e, env, report=False)  # noqa: E731 - a local shorthand
    if _count_bounds(ck, name, terms, fold):
        return
    if _literal_parts(ck, name, terms, fold):
        return
    _candidates(ck, name, terms, fold)


def _count_bounds(ck, name, terms, fold) -> bool:
    bounds: dict[str, tuple[int, int, Optional[A.CountBound], Optional[A.CountBound]]] = {}
    for t in terms:
        if not isinstance(t, A.CountBound):
            continue
        n = fold(t.n)
        if not isinstance(n, int) or isinstance(n, bool):
            continue
        # no upper bound is infinity, not a big number: `len(k) > 2**62` must not look contradictory
        lo, hi, lo_by, hi_by = bounds.get(t.kind, (0, math.inf, None, None))
        if t.op in ("<", "<=", "=="):
            new_hi = n - 1 if t.op == "<" else n
            if new_hi < hi:
                hi, hi_by = new_hi, t
        if t.op in (">", ">=", "=="):
            new_lo = n + 1 if t.op == ">" else n
            if new_lo > lo:
                lo, lo_by = new_lo, t
        bounds[t.kind] = (lo, hi, lo_by, hi_by)
        if hi < 0:
            ck.error(t.span, f"{constraint_to_source(t)} admits no string: a count is never negative")
            return True
        if lo > hi:
            other = lo_by if t is hi_by else hi_by
            ck.error(t.span, f"contradictory bounds on {t.kind}({name}): {constraint_to_source(other)} and "
                     f"{constraint_to_source(t)}", "no string satisfies both")
            return True
    return False


def _literal_parts(ck, name, terms, fold) -> bool:
    """Prefixes, suffixes and substrings that cannot all hold."""
    firsts: dict[type, tuple[str, A.Constraint]] = {}
    required: list[tuple[str, A.Constraint]] = []
    for t in terms:
        if isinstance(t, (A.StartsWith, A.EndsWith)):
            text = fold(t.text)
            if not isinstance(text, str):
                continue
            prior = firsts.get(type(t))
            if prior is not None:
                a, b = prior[0], text
                compatible = (a.startswith(b) or b.startswith(a)) if isinstance(t, A.StartsWith) else \
                    (a.endswith(b) or b.endswith(a))
                if not compatible:
                    ck.error(t.span, f"the constraints on '{name}' admit no string: {constraint_to_source(t)} "
                             f"contradicts {constraint_to_source(prior[1])}")
                    return True
                if len(b) > len(a):
                    firsts[type(t)] = (b, t)
            else:
                firsts[type(t)] = (text, t)
            required.append((text, t))
        elif isinstance(t, A.Contains):
            text = fold(t.text)
            if isinstance(text, str):
                required.append((text, t))
    for t in terms:
        if isinstance(t, A.Not) and isinstance(t.operand, A.Contains):
            bad = fold(t.operand.text)
            if not isinstance(bad, str):
                continue
            if bad == "":
                ck.error(t.span, f"{constraint_to_source(t)} admits no string: every string contains \"\"")
                return True
            for text, by in required:
                if bad in text:
                    ck.error(t.span, f"the constraints on '{name}' admit no string: {constraint_to_source(by)} "
                             f"requires {json.dumps(text)}, which contains {json.dumps(bad)}")
                    return True
    longest = max(required, key=lambda r: len(r[0]), default=None)
    if longest is not None:
        for t in terms:
            if isinstance(t, A.CountBound) and t.kind == "len" and t.op in ("<", "<=", "=="):
                n = fold(t.n)
                if isinstance(n, int) and not isinstance(n, bool):
                    limit = n - 1 if t.op == "<" else n
                    if limit < len(longest[0]):
                        ck.error(t.span, f"the constraints on '{name}' admit no string: {constraint_to_source(t)} "
                                 f"is shorter than {json.dumps(longest[0])}, required by "
                                 f"{constraint_to_source(longest[1])}")
                        return True
    return False


def _candidates(ck, name, terms, fold) -> None:
    """Filter a finite candidate set (choices, literal regexes) through every checkable term."""
    cands: Optional[list[str]] = None
    source: Optional[A.Constraint] = None
    for t in terms:
        finite = _finite(t, fold)
        if finite is not None:
            cands, source = finite, t
            break
    if cands is None:
        return
    original = len(cands)
    for t in terms:
        if t is source:
            continue
        kept = [s for s in cands if _holds(t, s, fold) is not False]
        if not kept:
            shown = _show_strings(cands)
            if isinstance(source, A.InChoices):
                which = "choices" if len(cands) == original else "choices left by the constraints before it"
                what = f"none of the {which} ({shown}) satisfies this"
                help = f"the choices come from line {source.span.line}"
            else:
                what = f"{constraint_to_source(source)} allows only {shown}, which does not satisfy this"
                help = None
            ck.error(t.span, f"the constraints on '{name}' admit no string: {what}", help)
            return
        cands = kept


def _finite(t: A.Constraint, fold) -> Optional[list[str]]:
    if isinstance(t, A.InChoices):
        value = fold(t.choices)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(dict.fromkeys(value))
    if isinstance(t, A.Matches):
        pattern = fold(t.pattern)
        if isinstance(pattern, str) and not (set(pattern) & _META):
            return [pattern]
    if isinstance(t, A.CountBound) and t.kind in ("len", "tokens") and t.op in ("==", "<=", "<"):
        n = fold(t.n)
        if n == 0 and t.op in ("==", "<=") or (n == 1 and t.op == "<"):
            return [""]
    return None


def _holds(t: A.Constraint, s: str, fold) -> Optional[bool]:
    """Whether ``s`` satisfies ``t`` (None when that cannot be decided here)."""
    if isinstance(t, A.Not):
        v = _holds(t.operand, s, fold)
        return None if v is None else not v
    if isinstance(t, (A.And, A.Or)):
        values = [_holds(o, s, fold) for o in t.operands]
        if isinstance(t, A.And):
            return False if False in values else (True if all(v is True for v in values) else None)
        return True if True in values else (False if all(v is False for v in values) else None)
    if isinstance(t, A.Matches):
        pattern = fold(t.pattern)
        if isinstance(pattern, str) and regex_problem(pattern) is None:
            return fullmatch(pattern, s)
    if isinstance(t, A.InChoices):
        value = fold(t.choices)
        return s in value if isinstance(value, list) else None
    if isinstance(t, A.IsInt):
        return fullmatch(IS_INT_REGEX, s)
    if isinstance(t, A.IsFloat):
        return fullmatch(IS_FLOAT_REGEX, s)
    if isinstance(t, (A.Contains, A.StartsWith, A.EndsWith)):
        text = fold(t.text)
        if not isinstance(text, str):
            return None
        if isinstance(t, A.Contains):
            return text in s
        return s.startswith(text) if isinstance(t, A.StartsWith) else s.endswith(text)
    if isinstance(t, A.CountBound) and t.kind in ("len", "words"):
        n = fold(t.n)
        if isinstance(n, int) and not isinstance(n, bool):
            count = len(s) if t.kind == "len" else len(s.split())
            return {"<": count < n, "<=": count <= n, "==": count == n, ">=": count >= n, ">": count > n}[t.op]
    return None


def _show_strings(values: list[Any]) -> str:
    shown = ", ".join(json.dumps(v) for v in values[:5])
    if len(values) > 5:
        shown += f", ... ({len(values)} in all)"
    return shown if len(shown) < 120 else shown[:117] + "..."
