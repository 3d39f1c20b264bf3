"""Round trip: random ASTs print to source that parses back to an equal AST (spans aside).

Two generators:

* ``modules`` builds syntactically valid ASTs of every node kind, without caring about meaning: it exercises the
  printer's quoting, escaping and parenthesisation against the parser;
* ``valid_programs`` builds programs that also pass every semantic check (names defined before use, constraints
  on the statement's own holes, satisfiable literal arguments, ...): the checker must accept them, before and
  after the round trip.

Example counts are moderate for CI; ``LMPROG_HYPOTHESIS_EXAMPLES`` raises them for a long local run.
"""

from __future__ import annotations

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmprog
from lmprog.dsl import ast as A
from lmprog.dsl.catalog import BUILTINS, COUNT_OPS, COUNTERS, DISTRIBUTIONS, INPUT_TYPES, KEYWORDS
from lmprog.dsl.constraints import _CALL_FORMS
from lmprog.dsl.parser import parse, parse_expression
from lmprog.dsl.printer import expr_to_source, to_source

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # big strategy reprs
EXAMPLES = int(os.environ.get("LMPROG_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------------------------------ syntactic ASTs

RESERVED = KEYWORDS | {"json", "grammar", *_CALL_FORMS, *COUNTERS}
NAME_POOL = ["a", "b", "x", "y", "_", "r", "f", "rf", "n1", "answer", "item_2", "inner", "ifx", "notes", "trueish",
             "where_", "h", "s", "k", "émile"]
names = st.one_of(st.sampled_from(NAME_POOL),
                  st.text(string.ascii_lowercase + "_", min_size=1, max_size=4).filter(lambda n: n not in RESERVED))
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
fmt_specs = st.one_of(st.none(), st.sampled_from([">10", ".2f", "<4", "^8", ",", "d", "08.3f", "+", ""]))


def _merge_text(parts):
    """Parts as the parser produces them: adjacent texts merged, no empty texts."""
    out = []
    for p in parts:
        if isinstance(p, A.Text):
            if not p.value:
                continue
            if out and isinstance(out[-1], A.Text):
                out[-1] = A.Text(out[-1].value + p.value)
                continue
        out.append(p)
    return tuple(out)


LEAVES = st.one_of(
    names.map(A.Name), texts.map(A.Str), st.integers(0, 10 ** 12).map(A.Int),
    st.floats(0, 1e20, allow_nan=False, allow_infinity=False).map(A.Float), st.booleans().map(A.Bool))


def _compound(inner, interp_expr=None):
    """Every composite expression over ``inner``; f-strings (with ``interp_expr`` inside) when given."""
    kwargs = st.lists(st.tuples(names, inner), max_size=2, unique_by=lambda kv: kv[0]).map(
        lambda kvs: tuple(A.Keyword(k, v) for k, v in kvs))
    callee = st.one_of(names.map(A.Name), st.tuples(names, names).map(lambda t: A.Attribute(A.Name(t[0]), t[1])))
    options = [
        st.lists(inner, max_size=3).map(lambda xs: A.ListExpr(tuple(xs))),
        st.lists(st.tuples(inner, inner), max_size=2).map(
            lambda kv: A.DictExpr(tuple(k for k, _ in kv), tuple(v for _, v in kv))),
        st.tuples(st.sampled_from(["-", "+", "not"]), inner).map(lambda t: A.UnaryOp(*t)),
        st.tuples(st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), inner, inner).map(lambda t: A.BinOp(*t)),
        st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3)).map(
            lambda t: A.BoolOp(t[0], tuple(t[1]))),
        st.tuples(inner, st.lists(st.tuples(st.sampled_from(
            ["<", "<=", ">", ">=", "==", "!=", "in", "not in", "matches"]), inner), min_size=1, max_size=3)).map(
            lambda t: A.Compare(t[0], tuple(o for o, _ in t[1]), tuple(c for _, c in t[1]))),
        st.tuples(inner, inner, inner).map(lambda t: A.IfExp(*t)),
        st.tuples(callee, st.lists(inner, max_size=2), kwargs).map(lambda t: A.Call(t[0], tuple(t[1]), t[2])),
        st.tuples(names, names).map(lambda t: A.Attribute(A.Name(t[0]), t[1])),
        st.tuples(inner, inner).map(lambda t: A.Index(*t)),
        st.tuples(inner, st.none() | inner, st.none() | inner, st.none() | inner).map(lambda t: A.Slice(*t)),
    ]
    if interp_expr is not None:
        part = st.one_of(texts.map(A.Text), st.tuples(interp_expr, fmt_specs).map(lambda t: A.Interp(*t)))
        options.append(st.lists(part, max_size=4).map(lambda ps: A.FString(_merge_text(ps))))
    return st.one_of(*options)


# Inside a {...} the quote of the enclosing string is taken, so an f-string there could not nest another.
INTERP_EXPR = st.recursive(LEAVES, _compound, max_leaves=6)
EXPR = st.recursive(LEAVES, lambda inner: _compound(inner, INTERP_EXPR), max_leaves=8)


def template_parts(holes: bool):
    part = st.one_of(texts.map(A.Text), st.tuples(INTERP_EXPR, fmt_specs).map(lambda t: A.Interp(*t)),
                     *([names.map(A.Hole)] if holes else []))
    return st.lists(part, max_size=5).map(_merge_text)


def constraints():
    hole = names.map(A.Name)
    strs = texts.map(A.Str)
    pred_func = st.one_of(names.filter(lambda n: n not in BUILTINS).map(A.Name),
                          st.tuples(names, names).map(lambda t: A.Attribute(A.Name(t[0]), t[1])))
    atoms = st.one_of(
        st.tuples(hole, strs).map(lambda t: A.Matches(*t)),
        st.tuples(hole, st.lists(strs, max_size=3)).map(lambda t: A.InChoices(t[0], A.ListExpr(tuple(t[1])))),
        st.tuples(hole, strs, st.booleans()).map(lambda t: A.StopAt(*t)),
        st.tuples(hole, st.sampled_from(COUNTERS), st.sampled_from(COUNT_OPS), st.integers(0, 999).map(A.Int)).map(
            lambda t: A.CountBound(*t)),
        hole.map(A.IsInt), hole.map(A.IsFloat),
        st.tuples(hole, strs).map(lambda t: A.Contains(*t)),
        st.tuples(hole, strs).map(lambda t: A.StartsWith(*t)),
        st.tuples(hole, strs).map(lambda t: A.EndsWith(*t)),
        st.tuples(hole, strs).map(lambda t: A.GrammarC(*t)),
        st.tuples(hole, st.none() | strs).map(lambda t: A.JsonC(*t)),
        st.tuples(pred_func, hole, st.lists(EXPR, max_size=2), st.booleans()).map(
            lambda t: A.PyPredicate(t[0], t[1], tuple(t[2]), (), t[3])),
    )

    def extend(inner):
        def flat(cls, items):
            out = []
            for i in items:
                out.extend(i.operands if isinstance(i, cls) else (i,))
            return cls(tuple(out))
        return st.one_of(inner.map(A.Not),
                         st.lists(inner, min_size=2, max_size=3).map(lambda xs: flat(A.And, xs)),
                         st.lists(inner, min_size=2, max_size=3).map(lambda xs: flat(A.Or, xs)))

    return st.recursive(atoms, extend, max_leaves=5)


WHERE = st.none() | constraints()


def statements():
    args = st.lists(EXPR, max_size=2).map(tuple)
    kwargs = st.lists(st.tuples(names, EXPR), max_size=2, unique_by=lambda kv: kv[0]).map(
        lambda kvs: tuple(A.Keyword(k, v) for k, v in kvs))
    simple = st.one_of(
        texts.map(A.ModelStmt),
        st.tuples(names, texts).map(lambda t: A.ModelDecl(*t)),
        st.tuples(names, args, kwargs).map(lambda t: A.InferStmt(*t)),
        st.tuples(names, st.none() | st.sampled_from(INPUT_TYPES), st.none() | EXPR).map(lambda t: A.InputStmt(*t)),
        st.tuples(texts, names).map(lambda t: A.ImportStmt(*t)),
        st.tuples(template_parts(True), WHERE).map(lambda t: A.Template(*t)),
        st.tuples(names, WHERE).map(lambda t: A.Gen(*t)),
        st.tuples(template_parts(True), WHERE, st.sampled_from(A.TURN_ROLES)).map(
            lambda t: A.Turn(t[0], t[1], role=t[2])),
        template_parts(True).map(A.Observe),
        st.tuples(names, st.sampled_from(sorted(DISTRIBUTIONS)), args, kwargs).map(lambda t: A.SampleStmt(*t)),
        st.tuples(names, EXPR).map(lambda t: A.Let(*t)),
        EXPR.map(A.Condition), EXPR.map(A.Factor),
        st.lists(EXPR, min_size=1, max_size=3).map(lambda xs: A.Return(tuple(xs))),
    )

    def extend(inner):
        body = st.lists(inner, min_size=1, max_size=3).map(tuple)
        return st.one_of(
            st.tuples(st.lists(st.tuples(EXPR, body), min_size=1, max_size=3), st.none() | body).map(
                lambda t: A.If(tuple(A.IfBranch(*b) for b in t[0]), t[1])),
            st.tuples(names, EXPR, body).map(lambda t: A.For(*t)),
        )

    return st.recursive(simple, extend, max_leaves=4)


modules = st.lists(statements(), max_size=4).map(lambda body: A.Module(tuple(body)))


@settings(SETTINGS, max_examples=max(EXAMPLES * 2 // 3, 1))  # the largest inputs: keep CI time moderate
@given(modules)
def test_print_parse_round_trip(module):
    text = to_source(module)
    parsed = parse(text)
    assert parsed == module, text
    assert to_source(parsed) == text  # printing is a fixed point


@SETTINGS
@given(EXPR)
def test_expression_round_trip(expr):
    assert parse_expression(expr_to_source(expr)) == expr


# ------------------------------------------------------------------------------------------- valid programs

REGEXES = [r"[A-Z][a-z]+", r"[0-9]+", r"(yes|no)", r"[a-z ]+\.", r"-?[0-9]+(\.[0-9]+)?", r"[^\n]+"]
WORDS = ["alpha", "beta", "gamma", "delta", "Paris", "42"]


@st.composite
def valid_programs(draw):
    """Programs that pass every check: each statement only uses names defined before it."""
    lines: list[str] = []
    strings: list[str] = []  # names holding strings (inputs, holes, lets of strings)
    ints: list[str] = []
    counter = [0]

    def fresh(prefix):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    if draw(st.booleans()):
        lines.append('model "smollm2-135m"')
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from([
            "infer smc(particles=8, ess=0.5)", "infer importance(16)", "infer greedy()", "infer beam(width=2)",
            'infer mcmc(steps=10, move="independent")', "infer sample(2, temperature=0.5)"])))
    for _ in range(draw(st.integers(0, 2))):
        name = fresh("in")
        if draw(st.booleans()):
            lines.append(f'input {name}: str = "{draw(st.sampled_from(WORDS))}"')
            strings.append(name)
        else:
            lines.append(f"input {name}: int = {draw(st.integers(0, 5))}")
            ints.append(name)

    def constraint_for(hole):
        kind = draw(st.integers(0, 6))
        if kind == 0:
            return f'{hole} matches r"{draw(st.sampled_from(REGEXES))}"'
        if kind == 1:
            return f'{hole} in {draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True))}'.replace(
                "'", '"')
        if kind == 2:
            return f"{draw(st.sampled_from(COUNTERS))}({hole}) <= {draw(st.integers(1, 50))}"
        if kind == 3:
            return f'stop_at({hole}, "\\n")'
        if kind == 4:
            return f'not contains({hole}, "{draw(st.sampled_from("xyz"))}")'
        if kind == 5:
            return f"(is_int({hole}) or is_float({hole}))"
        return f'startswith({hole}, "A") and len({hole}) >= 2'

    def statement(depth, indent):
        pad = "    " * indent
        kind = draw(st.integers(0, 8 if depth < 2 else 4))
        if kind == 8 and indent == 0:  # chat turns (not inside an if): holes only in assistant turns
            role = draw(st.sampled_from(["system", "user", "assistant"]))
            interp = f"{{{draw(st.sampled_from(strings))}}} " if strings and draw(st.booleans()) else ""
            if role == "assistant":
                hole = fresh("h")
                cs = f" where {constraint_for(hole)}" if draw(st.booleans()) else ""
                lines.append(f'{pad}assistant "{interp}[{hole}]"{cs}')
                strings.append(hole)
            else:
                lines.append(f'{pad}{role} "{interp}{draw(st.sampled_from(WORDS))}?"')
        elif kind == 8:
            lines.append(f'{pad}observe "{draw(st.sampled_from(WORDS))}."')
        elif kind <= 1:
            holes = [fresh("h") for _ in range(draw(st.integers(1, 2)))]
            interp = f"{{{draw(st.sampled_from(strings))}}} " if strings and draw(st.booleans()) else ""
            text = interp + " and ".join(f"[{h}]" for h in holes) + "\\n"
            cs = [constraint_for(h) for h in holes if draw(st.booleans())]
            lines.append(f'{pad}"{text}"' + (" where " + " and ".join(cs) if cs else ""))
            strings.extend(holes)
        elif kind == 2 and strings:
            name = fresh("v")
            source = draw(st.sampled_from(strings))
            lines.append(f"{pad}let {name} = upper({source}) + \"!\"")
            strings.append(name)
        elif kind == 3 and strings:
            lines.append(f"{pad}condition len({draw(st.sampled_from(strings))}) > 0")
        elif kind == 4:
            name = fresh("s")
            lines.append(f"{pad}sample {name} ~ {draw(st.sampled_from(['uniform_int(1, 3)', 'poisson(1.5)']))}")
            lines.append(f"{pad}factor -0.1 * {name}")
        elif kind == 5:
            bound = draw(st.sampled_from(ints)) if ints and draw(st.booleans()) else str(draw(st.integers(1, 3)))
            lines.append(f"{pad}for {fresh('i')} in range({bound}):")
            saved = list(strings)
            for _ in range(draw(st.integers(1, 2))):
                statement(depth + 1, indent + 1)
            strings[:] = saved  # names bound in the body are per iteration
        elif kind == 6:
            test = f"len({draw(st.sampled_from(strings))}) > 3" if strings else "true"
            lines.append(f"{pad}if {test}:")
            saved = list(strings)
            statement(depth + 1, indent + 1)
            lines.append(f"{pad}else:")
            strings[:] = saved
            statement(depth + 1, indent + 1)
            strings[:] = saved  # conservatively forget names set inside the branches
        else:
            lines.append(f'{pad}observe "{draw(st.sampled_from(WORDS))}."')

    for _ in range(draw(st.integers(1, 5))):
        statement(0, 0)
    top_holes = [s for s in strings if s.startswith("h")]
    if top_holes and draw(st.booleans()):
        lines.append("return " + ", ".join(draw(st.lists(st.sampled_from(top_holes), min_size=1, unique=True))))
    return "\n".join(lines) + "\n"


@SETTINGS
@given(valid_programs())
def test_valid_programs_check_and_round_trip(source):
    program = lmprog.compile(source, "valid.lmp")
    reprinted = to_source(program.ast)
    again = lmprog.compile(reprinted, "valid.lmp")
    assert again.ast == program.ast
    assert list(again.holes) == list(program.holes)
    assert again.inputs == program.inputs

