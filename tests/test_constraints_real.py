"""The constraint compiler on the default model's real 49k-token vocabulary (SmolLM2, byte-level BPE).

The tokenizer is loaded once per session; each hole compiles in well under a second. Property tests encode
random strings (canonical tokenisation, which merges across the hole boundary wherever BPE does) and compare
with the Python reference; masks gathered inside ``jit`` equal the host reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import constraint_reference as ref
from lmprog.compiler.automaton import stack_holes
from lmprog.compiler.constraint_ir import (
    Choices,
    Contains,
    Count,
    EndsWith,
    IsFloat,
    IsInt,
    Not,
    Regex,
    StartsWith,
    StopAt,
)
from lmprog.compiler.constraints import compile_hole

LANGUAGE_MD = {
    "capital": ([Regex(r"[A-Z][a-z]+( [A-Z][a-z]+)*"), Count("tokens", "<=", 8)], "\n"),
    "in": ([Choices(["Paris", "Rome"])], "\n"),
    "stop_at": ([StopAt(".")], None),
    "stop_before": ([StopAt("\n", keep=False)], None),
    "len": ([Count("len", "<=", 40)], "\n"),
    "words": ([Count("words", ">=", 3), Count("words", "<=", 6)], "\n"),
    "fixed": ([Count("tokens", "==", 50)], None),
    "is_int": ([IsInt()], "\n"),
    "is_float": ([IsFloat()], "\n"),
    "not-contains": ([Not(Contains("e"))], "\n"),
    "startswith": ([StartsWith("The")], "\n"),
    "endswith": ([EndsWith("!")], "\n"),
    "conjunction": ([Regex(r"[a-z ]+"), Not(Contains("e")), Count("len", ">=", 3)], " is "),
}

PIECES = ["Paris", "Rome", "The", "the", " ", "  ", "e", "cat", "!", ".", "1", "42", "-", "3.5", "\n", "é", "日本",
          "is", " is ", "A", "B", "x"]
STRINGS = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)


@pytest.fixture(scope="module")
def real_holes(default_tokenizer):
    return {name: compile_hole(cs, default_tokenizer, following_text=ft, cache=False)
            for name, (cs, ft) in LANGUAGE_MD.items()}


def test_language_md_constraints_compile(real_holes):
    for name, hole in real_holes.items():
        assert hole.num_states >= 1 and hole.automaton.vocab_size == 49152
        assert hole.nbytes < 2_000_000, name


@pytest.mark.parametrize("name", [n for n in LANGUAGE_MD if n != "fixed"])
def test_complete_iff_reference(default_tokenizer, real_holes, name):
    tok = default_tokenizer
    cs, ft = LANGUAGE_MD[name]
    hole = real_holes[name]

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(STRINGS)
    def check(value):
        term = hole.terminator
        text = value + (term.text if term.kind == "text" and not term.keep else "")
        ids = tok.encode(text) + ([tok.eos_ids[0]] if term.kind == "eos" else [])
        expected = ref.complete(cs, ft, ids, tok)
        assert hole.complete(ids) == expected, (value, ids)
        if expected:
            assert hole.value(ids, tok) == value

    check()


def test_choices_prefixes_exact(default_tokenizer):
    """Choices have a simple prefix reference: completable iff the bytes prefix some choice + terminator."""
    tok = default_tokenizer
    items = ["Paris", "Rome", "Pa", "New York", "日本"]
    hole = compile_hole([Choices(items)], tok, following_text=".\n", cache=False)
    targets = [(c + ".\n").encode() for c in items]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(STRINGS, st.integers(0, 8))
    def check(text, cut):
        ids = tok.encode(text)[:cut]
        data = b"".join(tok.token_bytes[i] for i in ids)
        assert hole.completable(ids) == any(t.startswith(data) for t in targets), (text, ids)

    check()
    for c in items:
        ids = tok.encode(c + ".\n")
        assert hole.complete(ids) and hole.value(ids, tok) == c


def test_straddling_token_real_vocabulary(default_tokenizer):
    # "[a]is good" where a in ["Par"]: the token "Paris" crosses the end of the hole.
    tok = default_tokenizer
    hole = compile_hole([Choices(["Par"])], tok, following_text="is good", cache=False)
    paris = tok.encode("Paris")
    assert len(paris) == 1
    assert hole.allowed_tokens([])[paris[0]]
    ids = paris + tok.encode(" good")
    assert hole.complete(ids) and hole.value(ids, tok) == "Par"
    assert hole.complete(tok.encode("Par") + tok.encode("is good"))


def test_fixed_length_real(default_tokenizer, real_holes):
    tok = default_tokenizer
    hole = real_holes["fixed"]
    ids = tok.encode("Once upon a time, " * 20)[:50]
    assert hole.complete(ids) and not hole.complete(ids[:49]) and hole.completable(ids[:49])
    assert not hole.allowed_tokens(ids[:10])[tok.eos_ids[0]]


def test_real_jit_masks_equal_host(default_tokenizer, real_holes):
    tok = default_tokenizer
    names = ["capital", "words", "conjunction", "stop_at"]
    holes = [real_holes[n] for n in names]
    table, offsets = stack_holes(holes)
    prefixes = {"capital": "New Yo", "words": "one two three four", "conjunction": "a cat wal", "stop_at": "Hi"}
    rows, counts, want = [], [], []
    for i, (n, h) in enumerate(zip(names, holes)):
        ids = tok.encode(prefixes[n])
        s, raw = h.run(ids)
        rows.append(offsets[i] + s)
        counts.append(raw)
        want.append(h.allowed_tokens(ids))
    mask = jax.jit(lambda t, s, c: t.mask(s, c))(table, jnp.array(rows, jnp.int32), jnp.array(counts, jnp.int32))
    assert np.array_equal(np.asarray(mask), np.stack(want))
    assert all(w.any() for w in want)
