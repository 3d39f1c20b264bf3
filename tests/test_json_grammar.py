"""``json(X)``, ``json(X, schema=...)`` and ``grammar(X, "f.lark")`` on the regular path
(:mod:`lmprog.compiler.structured`): samples validate, the posterior is exact on toy LMs, the mask is exact on
the real tokenizer, and what is not supported is a located error."""

from __future__ import annotations

import functools
import json
import math
import re

import jsonschema
import lark
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _inference_cases import chi_square_pvalue, sir_draws
from lmprog.backends.toy import ToyLM
from lmprog.compiler.bytedfa import ByteDFA, regex_fullmatch, useful_states
from lmprog.compiler.constraint_ir import ConstraintError, Count, Grammar, JsonSchema
from lmprog.compiler.constraints import compile_hole
from lmprog.compiler.lower import lower
from lmprog.compiler.structured import (
    ANY_JSON_DEPTH,
    NeedsHostMatcher,
    StructureError,
    grammar_regex,
    int_range,
    number_range,
    schema_regex,
)
from lmprog.dsl.errors import LmpError
from lmprog.inference import Importance, run
from lmprog.inference.exact import enumerate_program
from lmprog.program import Program

ALPHA = 1e-3
FORMAT = jsonschema.FormatChecker()


def _dfa(schema):
    return ByteDFA.from_regex(schema_regex(schema))


def _enumerate(dfa: ByteDFA, alphabet: str, max_len: int) -> list[str]:
    """Every string over ``alphabet`` up to ``max_len`` characters that the DFA accepts (depth-first)."""
    out = []

    def go(s: str, state: int):
        if dfa.accept[state]:
            out.append(s)
        if len(s) == max_len:
            return
        for ch in alphabet:
            nxt = dfa.walk(ch.encode(), state)
            if nxt >= 0:
                go(s + ch, nxt)

    go("", 0)
    return out


# ------------------------------------------------------------------------------------- schema -> language

SMALL = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "maximum": 2},
                                          "b": {"enum": ["a", "b"]}}, "required": ["a"]}
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"},
        "born": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "score": {"type": "number", "minimum": -1, "exclusiveMaximum": 1},
        "kind": {"oneOf": [{"const": "cat"}, {"const": "dog"}]},
        "id": {"type": "string", "format": "uuid"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_small_schema_language_is_exactly_the_valid_texts():
    dfa = _dfa(SMALL)
    texts = _enumerate(dfa, '{}":,ab12 ', 24)
    assert len(texts) == 36  # a in {1, 2}; b absent, "a" or "b"; one optional space after each ':' and ','
    values = {json.dumps(json.loads(t), sort_keys=True) for t in texts}
    assert len(values) == 6
    for t in texts:
        jsonschema.validate(json.loads(t), SMALL)


@pytest.mark.parametrize("lo,hi", [(0, 150), (-37, 1234), (5, 5), (-100, -3), (None, 17), (-5, None), (99, 101)])
def test_integer_ranges_are_exact(lo, hi):
    r = re.compile(int_range(lo, hi))
    for n in range(-2000, 3000):
        assert bool(r.fullmatch(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    assert not r.fullmatch("-0") and not r.fullmatch("007")


@pytest.mark.parametrize("lo,lx,hi,hx", [(0, False, 1, False), (-2, True, 3, True), (0, True, None, False),
                                         (None, False, 0, True), (-5, False, -1, False)])
def test_number_ranges_are_exact(lo, lx, hi, hx):
    r = re.compile(number_range(lo, lx, hi, hx))
    for s in ["0", "0.0", "-0.5", "0.5", "1", "1.0", "1.5", "-1", "-1.0", "2.9", "3", "3.0", "-2", "-2.0", "-1.99",
              "5", "-5", "-5.0", "10", "0.000", "0.001", "-4.75"]:
        v = float(s)
        ok = (lo is None or (v > lo if lx else v >= lo)) and (hi is None or (v < hi if hx else v <= hi))
        assert bool(r.fullmatch(s)) == ok, s


def _record_samples(n: int, seed: int) -> list[str]:
    """Random walks through the record schema's DFA (uniform over allowed next characters), complete texts."""
    dfa = _dfa(RECORD)
    live = useful_states(dfa.delta, 0, dfa.accept)
    rng = np.random.default_rng(seed)
    alphabet = [chr(c) for c in range(32, 127)]
    out = []
    while len(out) < n:
        s, state = "", 0
        for _ in range(400):
            if dfa.accept[state] and rng.random() < 0.15:
                out.append(s)
                break
            options = [(ch, dfa.walk(ch.encode(), state)) for ch in alphabet]
            options = [(ch, q) for ch, q in options if q >= 0 and live[q]]
            if not options:
                if dfa.accept[state]:
                    out.append(s)
                break
            ch, state = options[rng.integers(len(options))]
            s += ch
    return out


def test_record_samples_validate():
    for text in _record_samples(60, seed=0):
        value = json.loads(text)
        jsonschema.validate(value, RECORD, format_checker=FORMAT)


def test_any_json_is_depth_bounded():
    dfa = _dfa(True)
    assert dfa.accepts('{"a": [1, {"b": null}], "c": "x\\u00e9"}')
    assert dfa.accepts("[[[1]]]") and not dfa.accepts("[" * (ANY_JSON_DEPTH + 1) + "]" * (ANY_JSON_DEPTH + 1))
    assert not dfa.accepts('{"a":1,}') and not dfa.accepts("[1 ,2]") and not dfa.accepts("01")


def test_keyword_semantics():
    assert _dfa({"type": ["string", "null"]}).accepts("null")
    assert _dfa({"type": "string", "pattern": "^[A-Z]{2}$"}).accepts('"AB"')
    assert not _dfa({"type": "string", "pattern": "^[A-Z]{2}$"}).accepts('"ABC"')
    assert _dfa({"type": "string", "pattern": "b"}).accepts('"abc"')  # unanchored: a search
    assert not _dfa({"type": "string", "pattern": "^.+$"}).accepts('"a\\"b"')  # . is narrowed to safe characters
    tup = _dfa({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False})
    assert tup.accepts('[1, "a"]') and tup.accepts("[1]") and not tup.accepts('[1, "a", 2]')
    assert _dfa({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}).accepts("[1,2,3]")
    assert not _dfa({"type": "array", "items": {"type": "integer"}, "minItems": 2}).accepts("[1]")
    extra = _dfa({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties":
                  {"type": "boolean"}})
    assert extra.accepts('{"a":1,"x":true}') and not extra.accepts('{"a":1,"a":true}')
    refs = {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"q": {"$ref": "#/$defs/p"}}}
    assert _dfa(refs).accepts('{"q":3}')
    assert _dfa({"enum": [1, "two", [3], {"four": 4}]}).accepts('{"four": 4}')
    assert _dfa({"type": "string", "format": "date"}).accepts('"2024-02-29"')
    assert not _dfa({"type": "string", "format": "date"}).accepts('"2023-02-29"')


def test_unsupported_keywords_are_all_listed_with_pointers():
    schema = {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}},
              "patternProperties": {"^x": {}}}
    with pytest.raises(StructureError) as e:
        schema_regex(schema)
    assert "multipleOf at #/properties/a" in e.value.message and "patternProperties at #" in e.value.message


def test_recursive_schema_takes_the_host_path():
    schema = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
              "$ref": "#/$defs/node"}
    with pytest.raises(NeedsHostMatcher, match=r"schema is recursive at #/\$defs/node.*on the host"):
        schema_regex(schema)


def test_overlapping_one_of_is_rejected():
    with pytest.raises(StructureError, match="oneOf"):
        schema_regex({"oneOf": [{"type": "integer"}, {"type": "number"}]})
    schema_regex({"oneOf": [{"type": "integer"}, {"type": "string"}]})


# ------------------------------------------------------------------------------------------- grammars

ARITH = """
start: sum
sum: product (_ADD product)*
product: NUMBER (_MUL NUMBER)*
_ADD: "+" | "-"
_MUL: "*" | "/"
%import common.INT -> NUMBER
%import common.WS_INLINE
%ignore WS_INLINE
"""


def test_grammar_sentences_parse_with_lark():
    dfa = ByteDFA.from_regex(grammar_regex(ARITH))
    parser = lark.Lark(ARITH, parser="earley", lexer="dynamic_complete")
    texts = _enumerate(dfa, "12+* ", 5)
    assert len(texts) > 50
    for t in texts:
        parser.parse(t)
    for bad in ("1+", "+1", "1**2", ""):
        assert not dfa.accepts(bad)
        with pytest.raises(lark.exceptions.LarkError):
            parser.parse(bad)


def test_recursive_grammar_takes_the_host_path():
    with pytest.raises(NeedsHostMatcher) as e:
        grammar_regex('start: expr\nexpr: "(" expr ")" | "x"\n')
    assert "rule 'expr' is recursive" in e.value.message and e.value.where.line == 2


# -------------------------------------------------------------------------- programs, errors, values


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _errors(src, tmp_path) -> str:
    with pytest.raises(LmpError) as e:
        Program(src, "t.lmp", base_dir=tmp_path)
    return e.value.render()


def test_checker_locates_schema_and_grammar_errors(tmp_path):
    _write(tmp_path, "bad.json", json.dumps({"type": "integer", "multipleOf": 2}))
    _write(tmp_path, "rec.json", json.dumps({"$defs": {"n": {"properties": {"n": {"$ref": "#/$defs/n"}}}},
                                             "$ref": "#/$defs/n"}))
    _write(tmp_path, "broken.json", '{"type": ')
    _write(tmp_path, "g.lark", 'start: a\na: "x" (a)?\n')
    _write(tmp_path, "syntax.lark", 'start: "a"\nb: ("c"\n')
    text = _errors('"[a]" where json(a, schema="bad.json")\n"[b]" where json(b, schema="rec.json")\n'
                   '"[c]" where json(c, schema="broken.json")\n"[d]" where grammar(d, "g.lark")\n'
                   '"[e]" where grammar(e, "syntax.lark")\n', tmp_path)
    assert "t.lmp:1:13: JSON schema 'bad.json': unsupported JSON Schema keyword multipleOf (multipleOf at #)" in text
    # recursive schemas and grammars are no errors: they take the host path (tests/test_host_matcher.py)
    assert "rec.json" not in text and "g.lark" not in text and "recursive" not in text
    assert "t.lmp:3:28: JSON schema file 'broken.json' is not valid JSON" in text
    assert "syntax.lark:2:8: grammar 'syntax.lark': invalid grammar" in text
    assert '    b: ("c"\n' in text  # the grammar file's line, with its caret


@functools.lru_cache(maxsize=1)
def json_lm() -> ToyLM:
    vocab = ("<bos>", "<eos>", "{", "}", '"', "a", "b", ":", ",", "1", "2", " ", "Q", "R", "e", "d", "B", "l", "u")
    return ToyLM.random(vocab, positions=32, seed=7, scale=1.5)


def _lowered(src, tmp_path, lm, max_tokens=40):
    program = Program(src, "t.lmp", base_dir=tmp_path)
    return program, lower(program, lm.tokenizer, {}, default_max_tokens=max_tokens)


def test_json_hole_posterior_is_exact_and_values_are_parsed(tmp_path):
    """Importance sampling of a json() hole against enumeration (chi-square over token sequences), and the
    result's values are parsed JSON, aggregated by canonical JSON."""
    lm = json_lm()
    _write(tmp_path, "s.json", json.dumps(SMALL))
    src = 'infer importance(particles=64)\n"Q[x]" where json(x, schema="s.json")\n'
    program, low = _lowered(src, tmp_path, lm)
    exact = enumerate_program(lm, low.program, max_tokens=40)
    assert len(exact.probs()) == 36
    r = run(lm, low.program, Importance(particles=64), seed=3, groups=600)
    assert chi_square_pvalue(sir_draws(r, 0), exact.probs()) > ALPHA
    result = program.run(lm=lm, particles=256, seed=1)
    for value, _ in result.posterior:
        assert isinstance(value["x"], dict)
        jsonschema.validate(value["x"], SMALL)
    assert len(result.posterior) <= 6  # equal values with different spacing are one entry


def test_grammar_choice_has_the_same_posterior_as_a_choice_list(tmp_path):
    lm = json_lm()
    _write(tmp_path, "c.lark", 'start: "Red" | "Blue"\n')
    _, g = _lowered('"Q[x]" where grammar(x, "c.lark")\n', tmp_path, lm)
    _, c = _lowered('"Q[x]" where x in ["Red", "Blue"]\n', tmp_path, lm)
    eg, ec = enumerate_program(lm, g.program), enumerate_program(lm, c.program)
    assert eg.probs().keys() == ec.probs().keys()
    for k, p in ec.probs().items():
        assert eg.probs()[k] == pytest.approx(p, rel=1e-9)
    assert math.isclose(eg.z, ec.z, rel_tol=1e-9)
    r = run(lm, g.program, Importance(particles=32), seed=5, groups=400)
    probs = {k: float(np.float64(v)) for k, v in ec.probs().items()}
    total = sum(probs.values())
    assert chi_square_pvalue(sir_draws(r, 1), {k: v / total for k, v in probs.items()}) > ALPHA


def test_json_combines_with_a_token_bound(tmp_path):
    lm = json_lm()
    hole = compile_hole([JsonSchema("s.json", json.dumps(SMALL)), Count("tokens", "<=", 8)], lm.tokenizer,
                        cache=False)
    assert hole.reach == 8  # {"a":1} is 7 single-character tokens, then EOS
    with pytest.raises(ConstraintError, match="cannot be met"):
        compile_hole([JsonSchema("s.json", json.dumps(SMALL)), Count("tokens", "<=", 6)], lm.tokenizer,
                     cache=False)


def test_grammar_ir_errors_are_located_in_the_grammar_file():
    lm = json_lm()
    with pytest.raises(ConstraintError) as e:
        compile_hole([Grammar("g.lark", 'start: a\na: "x" b\n', "dir/g.lark")], lm.tokenizer, cache=False)
    assert str(e.value.loc) == "dir/g.lark:2:8"


# ------------------------------------------------------------------------ the mask on the real tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["name"]}
PERSONS = st.builds(
    lambda name, age, ok, spaced: json.dumps(
        {"name": name, **({"age": age} if age is not None else {}), **({"ok": ok} if ok is not None else {})},
        ensure_ascii=False, separators=(", ", ": ") if spaced else (",", ":")),
    st.text(st.sampled_from("ab é日\"\\"), max_size=8), st.one_of(st.none(), st.integers(0, 99)),
    st.one_of(st.none(), st.booleans()), st.booleans())


@pytest.fixture(scope="module")
def person_hole(default_tokenizer):
    return compile_hole([JsonSchema("p.json", json.dumps(PERSON))], default_tokenizer, following_text="\n",
                        cache=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(PERSONS, st.integers(0, 40))
def test_real_mask_allows_exactly_the_completable_tokens(default_tokenizer, person_hole, text, cut):
    """A token is allowed iff the bytes so far and the token's are a prefix of some valid text followed by
    the terminator (checked with the schema's byte DFA, for a sample of tokens and every allowed one)."""
    tok = default_tokenizer
    jsonschema.validate(json.loads(text), PERSON)
    ids = tok.encode(text + "\n", add_bos=False)
    prefix = ids[: min(cut, len(ids) - 1)]
    mask = person_hole.allowed_tokens(prefix)
    assert mask[ids[len(prefix)]]  # the rest of the text is a completion
    dfa = _dfa(PERSON)
    live = useful_states(dfa.delta, 0, dfa.accept)
    done = tok.decode_bytes(prefix, skip_special=True)
    rng = np.random.default_rng(cut)
    for t in set(rng.choice(len(mask), 300).tolist()) | set(np.flatnonzero(mask)[:300].tolist()):
        piece = tok.decode_bytes([int(t)], skip_special=True)
        if int(t) in tok.eos_ids or not piece:  # special tokens (no bytes) are never part of a hole
            assert int(t) in tok.eos_ids or not mask[t]
            continue
        data = done + piece
        k = data.find(b"\n")
        if k >= 0:  # the hole ends at the first newline, exactly at the token's end
            ok = k == len(data) - 1 and dfa.accepts(data[:k])
        else:
            q = dfa.walk(data)
            ok = q >= 0 and bool(live[q])
        assert bool(mask[t]) == ok, (data, bool(mask[t]))


def test_regex_fullmatch_accepts_the_record_samples():
    pattern = schema_regex(RECORD)
    for text in _record_samples(10, seed=1):
        assert regex_fullmatch(pattern, text)


def test_a_json_hole_is_indexed_like_its_value(tmp_path):
    """The checker types a json hole as its parsed value (not a string), so a program can index it."""
    lm = json_lm()
    _write(tmp_path, "s.json", json.dumps(SMALL))
    src = 'infer importance(particles=16)\n"Q[x]" where json(x, schema="s.json")\nreturn x["a"]\n'
    result = Program(src, "t.lmp", base_dir=tmp_path).run(lm=lm, seed=2)
    values = {v['x["a"]'] for v, _ in result.posterior}
    assert values and values <= {1, 2}


def test_a_json_hole_interpolates_as_the_json_text_it_generated(tmp_path):
    """``{x}`` in a later template, ``f"{x}"`` and ``str(x)`` of a json hole give the JSON text the hole generated
    (never Python's ``{'a': 1}``, which this vocabulary cannot even encode); a part of it is canonical JSON; a
    string inside it is its characters."""
    lm = json_lm()
    _write(tmp_path, "s.json", json.dumps(SMALL))
    src = ('infer importance(particles=16)\n"Q[x]" where json(x, schema="s.json")\n"R{x}"\n'
           'return {"s": str(x), "f": f"{x}", "x": x, "b": x["b"] if contains(str(x), "b") else "-"}\n')
    result = Program(src, "t.lmp", base_dir=tmp_path).run(lm=lm, seed=2)
    seen = 0
    for s in result.samples:
        if s.log_weight == -math.inf:
            continue
        v = s.values
        text = s.text[s.text.index("Q") + 1:]
        generated = text[: text.index("R")].removesuffix("<eos>")
        assert v["s"] == v["f"] == generated  # exactly the generated text, spacing included
        assert json.loads(v["s"]) == v["x"] and text.endswith("R" + generated)
        assert v["b"] in ("-", "a", "b")
        seen += 1
    assert seen


def test_json_text_of_parts_is_canonical():
    from lmprog.compiler.json_text import JsonArray, JsonObject, json_hole_value
    from lmprog.compiler.runtime_eval import to_text

    v = json_hole_value('{"a":1,  "b": [true, null, "é"], "c": {"d":2}}')
    assert isinstance(v, JsonObject) and isinstance(v["b"], JsonArray) and v == json.loads(str(v))
    assert to_text(v) == '{"a":1,  "b": [true, null, "é"], "c": {"d":2}}'
    assert to_text(v["b"]) == '[true, null, "é"]' and f"{v['c']}" == '{"d": 2}'
    assert to_text(v["b"][2]) == "é" and to_text(json_hole_value("true")) == "true"
    assert str([v["c"]]) == '[{"d": 2}]'  # inside a plain list too
