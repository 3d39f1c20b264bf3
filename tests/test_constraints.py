"""Constraint compiler on a small byte-level BPE: the automaton accepts exactly what Python says.

For every constraint kind (and conjunctions / or / not), with each kind of terminator:

* exhaustively, for every string over a small alphabet up to a length bound, the tokens of ``value +
  terminator`` (canonical BPE, and one token per byte) form a complete hole iff the reference
  (:mod:`constraint_reference`: ``re.fullmatch``, ``in``, ``str`` methods) says the value satisfies the
  constraints; and every prefix of an accepted tokenisation is completable;
* for random token sequences (hypothesis): "complete" agrees with the reference; "completable" has a
  witness completion (found through the automaton, checked by the reference); "not completable" has no
  completion by brute force over short continuations.
"""

from __future__ import annotations

import itertools
import os
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import constraint_reference as ref
from lmprog.backends.tokenizer import byte_tokenizer
from lmprog.compiler import constraints as K
from lmprog.compiler.bytedfa import ByteDFA
from lmprog.compiler.constraint_ir import (
    And,
    Choices,
    ConstraintError,
    Contains,
    Count,
    EndsWith,
    IsFloat,
    IsInt,
    Not,
    Or,
    Regex,
    StartsWith,
    StopAt,
)
from lmprog.compiler.constraints import CompiledHole, compile_hole, plan_hole

MERGES = [("a", "b"), ("b", "Ċ"), ("1", "."), ("Ġ", "a"), ("Ã", "©"), ("a", "Ċ"), ("Ċ", "Ċ"), ("e", "Ġ"),
          ("ab", "a"), (".", "5")]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(MERGES)


CHARS = ["a", "b", "e", "1", "5", ".", "-", " ", "\n", "é"]

CASES = {
    "regex": ([Regex(r"a+b?")], "\n"),
    "regex-alternation": ([Regex(r"(a|ab)(b|e)*")], "."),
    "choices": ([Choices(["ab", "a", "b\n", "é", "a b"])], "\n"),
    "contains-eos": ([Contains("ab")], None),
    "not-contains": ([Not(Contains("e"))], "\n"),
    "startswith": ([StartsWith("a")], " "),
    "endswith": ([EndsWith("b")], "\n"),
    "is_int": ([IsInt()], "\n"),
    "is_float": ([IsFloat()], " "),
    "stop_at": ([StopAt("."), Regex(r"[ab1.]*")], None),
    "stop_at-in-value": ([StopAt("."), Regex(r"a*b?\.")], None),
    "stop_before": ([StopAt("\n\n", keep=False), Count("len", "<=", 4)], None),
    "len": ([Count("len", "<=", 3)], "\n"),
    "len-two-sided": ([Count("len", ">=", 2), Count("len", "<=", 3), Not(Contains("\n"))], "e "),
    "words": ([Count("words", "==", 2)], None),
    "fixed-tokens": ([Count("tokens", "==", 3), Regex(r"[ab ]*")], None),
    "tokens-budget": ([Count("tokens", "<=", 3)], "\n"),
    "conjunction": ([Regex(r"[ab1 é]*"), Not(Contains("ba")), Count("len", ">=", 2), Count("len", "<=", 4)], "\n"),
    "or": ([Or((Regex(r"a+"), Choices(["1.5", "-2"])))], "\n"),
    "not-or": ([Not(Or((StartsWith("a"), EndsWith("b")))), Count("len", "<=", 3)], "."),
    "words-tokens": ([Count("words", ">=", 2), Count("tokens", "<=", 5)], "\n"),
    "multibyte": ([Regex(r"é+|a")], "\n"),
    "or-counts": ([Or((Count("len", "<", 2), Count("len", ">", 3)))], "\n"),
    "not-eq-tokens": ([Not(Count("tokens", "==", 3)), Count("tokens", "<=", 4), Regex("[ab]*")], "\n"),
    "words-union": ([Or((Count("words", "==", 1), Count("words", "==", 3)))], None),
    "terminator-word": ([Regex(r"[ab ]+")], " a"),
}


@pytest.fixture(scope="module")
def holes(tok):
    return {name: compile_hole(cs, tok, following_text=ft, cache=False) for name, (cs, ft) in CASES.items()}


def _tail(plan: K.HolePlan, tok) -> list[list[int]]:
    term = plan.terminator
    if term.kind == "eos":
        return [[tok.eos_ids[0]]]
    return [[]]


def _tokenisations(text: str, tok) -> list[list[int]]:
    canonical = tok.encode(text)
    single = [_byte_token(tok, b) for b in text.encode()]
    return [canonical, single] if canonical != single else [canonical]


def _byte_token(tok, b: int) -> int:
    return tok.token_bytes.index(bytes([b]))


@pytest.mark.parametrize("name", list(CASES))
def test_exhaustive_small_strings(tok, holes, name):
    cs, ft = CASES[name]
    hole = holes[name]
    plan = plan_hole(cs, ft)
    seen_complete = 0
    for n in range(4):
        for chars in itertools.product(CHARS, repeat=n):
            value = "".join(chars)
            if plan.terminator.kind == "fixed":
                cands = [_tokenisations(value, tok)[-1]]
            else:
                text = value + (plan.terminator.text if plan.terminator.kind == "text" and not plan.terminator.keep
                                else "")
                cands = [ids + tail for ids in _tokenisations(text, tok) for tail in _tail(plan, tok)]
            for ids in cands:
                expected = ref.complete(cs, ft, ids, tok)
                assert hole.complete(ids) == expected, (value, ids)
                if expected:
                    seen_complete += 1
                    assert hole.value(ids, tok) == value  # (complete => every prefix was completable)
    assert seen_complete > 0, "the case never accepts anything: a vacuous test"


def _alphabet(tok) -> list[int]:
    ids = sorted({_byte_token(tok, b) for b in b"abe15.- \n"} | {0xC3, 0xA9} | set(range(256, 256 + len(MERGES))))
    return ids + [tok.eos_ids[0]]


def automaton_witness(hole: CompiledHole, prefix: list[int], max_nodes: int = 4000) -> list[int] | None:
    """A shortest continuation that the automaton says completes the hole (BFS over allowed tokens)."""
    queue = deque([list(prefix)])
    seen = set()
    lo, hi = hole.counters.lo, hole.counters.hi
    active = [k for k in range(3) if (lo[k] > 0).any() or (hi[k] < (1 << 30)).any()]
    while queue and max_nodes > 0:
        seq = queue.popleft()
        max_nodes -= 1
        if hole.complete(seq):
            return seq
        r = hole.run(seq)
        if r is None:
            continue
        allowed = np.flatnonzero(hole.allowed_tokens(seq))
        groups = {}
        for t in allowed:  # one token per (next state, increments): they lead to the same situation
            key = (hole.automaton.step(r[0], int(t)), int(hole.inc_chars[t]),
                   int(hole.inc_words[hole.counters.tracker[r[0]], t]))
            groups.setdefault(key, int(t))
        for t in groups.values():
            nxt = seq + [t]
            st2 = hole.run(nxt)
            key = (st2[0], tuple(int(st2[1][k]) for k in active)) if st2 else None
            if key is not None and key not in seen:
                seen.add(key)
                queue.append(nxt)
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_random_token_sequences(tok, holes, name):
    cs, ft = CASES[name]
    hole = holes[name]
    alphabet = _alphabet(tok)

    @settings(max_examples=int(os.environ.get("LMPROG_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(alphabet), max_size=6))
    def check(ids):
        assert hole.complete(ids) == ref.complete(cs, ft, ids, tok)
        if hole.completable(ids):
            witness = automaton_witness(hole, ids)
            assert witness is not None and ref.complete(cs, ft, witness, tok), (ids, witness)
        else:
            found = ref.brute_force_completion(cs, ft, ids, tok, alphabet[:-1], depth=2)
            assert found is None, (ids, found)

    check()


def test_straddling_token_crosses_the_hole_boundary():
    # "Paris\n" spelt "Pari" + "s\n": the last token crosses the end of the hole into the terminator.
    tok = byte_tokenizer([("P", "a"), ("r", "i"), ("s", "Ċ"), ("Pa", "ri")])
    hole = compile_hole([Choices(["Paris", "Rome"])], tok, following_text="\n", cache=False)
    pari = tok.encode("Pari")
    s_nl = tok.token_bytes.index(b"s\n")
    allowed = hole.allowed_tokens(pari)
    assert allowed[s_nl] and allowed[tok.token_bytes.index(b"s")]
    assert np.flatnonzero(allowed).tolist() == sorted([s_nl, tok.token_bytes.index(b"s")])
    assert hole.complete(pari + [s_nl]) and hole.value(pari + [s_nl], tok) == "Paris"
    # nothing may follow the terminator inside the hole
    assert not hole.completable(pari + [s_nl] + tok.encode("\n"))


def test_straddling_required_when_vocabulary_has_no_split(tok):
    # A vocabulary whose only way to produce "b" followed by "\n" ... is the merged token "b\n" once the
    # single-byte tokens are removed from the allowed set: we build such a tokenizer by hand.
    from lmprog.backends.tokenizer import Tokenizer

    base = byte_tokenizer()
    table = (b"a", b"ab", b"b\n", b"\n", b"<eos>")
    t = Tokenizer(base.hf, table, frozenset({4}), None, (4,))
    hole = compile_hole([Regex("a+b")], t, following_text="\n", cache=False)
    # value "ab": tokenisations of "ab\n" are [ab, \n] and [a, b\n] — the second straddles
    assert hole.complete([1, 3]) and hole.complete([0, 2])
    assert hole.value([0, 2], t) == "ab"
    hole2 = compile_hole([Regex("a+b")], Tokenizer(base.hf, (b"a", b"b\n", b"\n", b"<eos>"), frozenset({3}), None,
                                                   (3,)), following_text="\n", cache=False)
    # only "a" and "b\n" can spell "ab\n": the straddling token is the only way to end the hole
    assert hole2.complete([0, 1]) and hole2.completable([0])
    assert np.flatnonzero(hole2.allowed_tokens([0])).tolist() == [0, 1]


def test_first_occurrence_of_terminator(tok):
    hole = compile_hole([Regex(r"[ab ]+")], tok, following_text=" a", cache=False)
    assert hole.complete(tok.encode("ab a"))
    assert not hole.completable(tok.encode("ab a b"))  # the hole ended at " a"
    # a value containing the terminator can never be generated: unsatisfiable
    with pytest.raises(ConstraintError, match="first occurrence"):
        compile_hole([Choices(["x a"])], tok, following_text=" a", cache=False)


def test_stop_at_keeps_stop_before_drops(tok):
    at = compile_hole([StopAt(".")], tok, cache=False)
    before = compile_hole([StopAt(".", keep=False)], tok, cache=False)
    ids = tok.encode("ab 1.")
    assert at.complete(ids) and before.complete(ids)
    assert at.value(ids, tok) == "ab 1." and before.value(ids, tok) == "ab 1"
    assert at.value_rule.stop == b"" and before.value_rule.stop == b"."
    # stop strings win over the following text and over EOS
    assert not at.completable(ids + [tok.eos_ids[0]])


def test_special_tokens_never_inside_a_hole(tok):
    eos = tok.eos_ids[0]
    for name, hole in [("text", compile_hole([], tok, following_text="\n", cache=False)),
                       ("eos", compile_hole([], tok, cache=False))]:
        mask = hole.allowed_tokens([])
        for s in tok.special_ids:
            assert mask[s] == (name == "eos" and s == eos)


def test_fixed_length_hole(tok):
    hole = compile_hole([Count("tokens", "==", 2)], tok, following_text="\n", cache=False)
    assert hole.terminator.kind == "fixed"
    ids = tok.encode("ab") + tok.encode("e")
    assert hole.complete(ids) and not hole.complete(ids[:1]) and not hole.completable(ids + ids[:1])
    # EOS is no terminator of a fixed-length hole
    assert not hole.allowed_tokens(ids[:1])[tok.eos_ids[0]]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cs, follow, match", [
    ([Choices(["a"]), Regex("b")], "\n", "allow no value"),
    ([Regex("[^\\x00-\\x{10FFFF}]")], None, "allow no value"),
    ([IsInt(), Contains("x")], None, "allow no value"),
    ([Count("len", "<=", 2), Count("len", ">", 2)], None, "allow no value"),
    ([Choices(["abc"]), Count("len", "<", 3)], "\n", "cannot be met"),
    ([Choices(["a", "abcd"]), Count("len", "==", 2)], "\n", "cannot be met"),
    ([Count("tokens", "<=", 1)], "a\n\n", "cannot be met"),
    ([Regex("(")], None, "cannot compile regex"),
    ([Regex("a(?=b)")], None, "cannot compile regex"),
    ([StopAt("."), StopAt("!")], None, "at most one"),
    ([Not(StopAt("."))], None, "stop_at"),
    ([Or((Count("len", "<", 2), Regex("a")))], None, "one kind"),
    ([Or(tuple(Count("len", "==", 2 * i) for i in range(9)))], None, "separate ranges"),
    ([Count("tokens", "==", 0)], None, "nothing to generate"),
    ([K.Grammar("g.lark", 'start: x\nx: "(" x ")" | "a"\n'), Regex("a+")], None, "cannot be combined"),
    ([K.Grammar("g.lark", 'start: x\nx: "(" x ")" | "a"\n'), Count("len", "<=", 3)], None, "only a token budget"),
    ([K.JsonSchema("s.json", "{")], None, "not valid JSON"),
])
def test_compile_errors(tok, cs, follow, match):
    with pytest.raises(ConstraintError, match=match):
        compile_hole(cs, tok, following_text=follow, cache=False)


def test_error_carries_location(tok):
    with pytest.raises(ConstraintError) as info:
        compile_hole([Choices(["a"]), Regex("b")], tok, name="answer", loc="capital.lmp:7:24", cache=False)
    assert str(info.value).startswith("capital.lmp:7:24: ") and "answer" in str(info.value)
    assert info.value.loc == "capital.lmp:7:24"
    with pytest.raises(ConstraintError) as info:
        compile_hole([Regex("(", loc="f.lmp:3:9")], tok, loc="f.lmp:3:1", cache=False)
    assert info.value.loc == "f.lmp:3:9"


def test_no_tokenisation_is_an_error():
    from lmprog.backends.tokenizer import Tokenizer

    base = byte_tokenizer()
    t = Tokenizer(base.hf, (b"a", b"b", b"<eos>"), frozenset({2}), None, (2,))
    with pytest.raises(ConstraintError, match="no sequence of this tokenizer's tokens"):
        compile_hole([Regex("a+c")], t, cache=False)


# --------------------------------------------------------------------------------------------------
# IR, languages, cache
# --------------------------------------------------------------------------------------------------


def test_ir_equality_ignores_location():
    assert Regex("a", loc="x:1:1") == Regex("a", loc="y:2:2")
    assert hash(Choices(["a", "b"])) == hash(Choices(("a", "b")))
    plan = plan_hole([And((Regex("a"), Count("len", "<", 5))), Not(Not(IsInt()))], "\n")
    assert plan.language == (Regex("a"), IsInt()) and plan.bounds.hi[1] == 4


def test_terminator_choice():
    assert plan_hole([StopAt("."), Count("tokens", "==", 3)], "\n").terminator == K.Terminator("text", ".", True)
    assert plan_hole([Count("tokens", "==", 3)], "\n").terminator.kind == "fixed"
    assert plan_hole([Count("tokens", "<=", 3)], "\n").terminator == K.Terminator("text", "\n", False)
    assert plan_hole([], "").terminator.kind == "eos" and plan_hole(None, None).terminator.kind == "eos"


@pytest.mark.parametrize("pattern, good, bad", [
    ("a|ab", ["a", "ab"], ["b", ""]),  # outlines-core's own index loses "ab" (leftmost-first)
    ("a(bx)?", ["a", "abx"], ["ab"]),  # ... and "b" after the match "a"
    ("[a-z]{0,30}", ["", "abc"], ["a" * 31]),
    ("^ab$", ["ab"], ["a"]),
    (r"\d+", ["12", "٣"], ["", "a"]),
    ("(?s:.)*", ["", "\n", "é"], []),
])
def test_regex_dfa_exact(pattern, good, bad):
    dfa = ByteDFA.from_regex(pattern)
    for s in good:
        assert dfa.accepts(s), s
    for s in bad:
        assert not dfa.accepts(s), s


def test_complement_is_relative_to_utf8():
    c = ByteDFA.from_regex("[^e]*").complement()
    assert c.accepts("e") and c.accepts("xéex") and not c.accepts("abc")
    assert not c.accepts(b"\xff e")  # invalid UTF-8 is in no language


def test_disk_cache_roundtrip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    K._MEMORY.clear()
    cs = [Regex("[ab]+"), Count("len", "==", 3)]
    first = compile_hole(cs, tok, following_text="\n")
    files = list((tmp_path / "automata").glob("*.npz"))
    assert len(files) == 1 and not first.from_cache
    K._MEMORY.clear()
    second = compile_hole(cs, tok, following_text="\n")
    assert second.from_cache
    assert np.array_equal(first.automaton.dense(), second.automaton.dense())
    assert first.counters.tables.keys() == second.counters.tables.keys()
    for k in first.counters.tables:
        assert np.array_equal(first.counters.tables[k], second.counters.tables[k])
    ids = tok.encode("aba\n")
    assert second.complete(ids) and not second.complete(tok.encode("ab\n"))
    # a different tokenizer is a different key
    other = compile_hole(cs, byte_tokenizer(), following_text="\n")
    assert not other.from_cache
    K._MEMORY.clear()
