"""Counters: per-token increments agree with ``len`` and ``len(str.split())`` however the text is split into
tokens; bounds are exact (a token is allowed iff some completion meets the bound); device == host."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmprog.backends.tokenizer import Tokenizer, byte_tokenizer
from lmprog.compiler import counters as C
from lmprog.compiler.constraint_ir import Choices, Count, Regex
from lmprog.compiler.constraints import compile_hole
from lmprog.compiler.vocab_index import vocab_info

WS = sorted({chr(c) for c in range(0x3001) if chr(c).isspace()})
TEXT = st.text(alphabet=st.sampled_from(WS + list("ab.é日🤖") + ["\u2019", "\u00e2", "\u2060"]), max_size=12)


@settings(max_examples=200, deadline=None)
@given(TEXT, st.lists(st.integers(1, 6), max_size=12))
def test_word_tracker_counts_str_split(text, cuts):
    """Words counted byte by byte, however the bytes are cut into pieces, equal len(text.split())."""
    tracker = C.word_tracker()
    data = text.encode()
    state, words, pos = 0, 0, 0
    for cut in cuts + [len(data)]:
        piece = data[pos:pos + cut]
        state, w = tracker.run(piece, state)
        words += w
        pos += len(piece)
        if pos >= len(data):
            break
    assert words == len(text.split())
    assert C.char_count(data) == len(text)


@pytest.fixture(scope="module")
def split_tokenizer():
    # every byte, plus tokens that split multi-byte whitespace and words in odd places
    pieces = [bytes([b]) for b in range(256)] + [
        "\u3000".encode()[:2], "\u3000".encode()[2:], " a".encode(), "a ".encode(), "\u00a0b".encode(),
        "é".encode()[:1], "日本".encode()[:4], "b\u2028".encode(), "ab".encode(), "  ".encode(), b"<eos>",
    ]
    base = byte_tokenizer()
    return Tokenizer(base.hf, tuple(pieces), frozenset({len(pieces) - 1}), None, (len(pieces) - 1,))


def test_vocab_increments(split_tokenizer):
    info = vocab_info(split_tokenizer)
    tracker = C.word_tracker()
    for v, data in enumerate(split_tokenizer.token_bytes[:-1]):
        assert info.inc_chars[v] == C.char_count(data)
        for t in range(tracker.num_states):
            assert info.inc_words[t, v] == tracker.run(data, t)[1]
    assert info.inc_chars[-1] == 0 and not info.inc_words[:, -1].any()


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_words_bound_exact_on_any_text(split_tokenizer, text):
    hole = compile_hole([Count("words", "==", 2)], split_tokenizer, cache=False)
    eos = split_tokenizer.eos_ids[0]
    ids = [split_tokenizer.token_bytes.index(bytes([b])) for b in text.encode()]
    assert hole.complete(ids + [eos]) == (len(text.split()) == 2)
    # completable iff at most 2 words so far (a word can always be added or whitespace continued)
    assert hole.completable(ids) == (len(text.split()) <= 2)


@pytest.mark.parametrize("bound", [("len", "==", 3), ("len", ">=", 2), ("len", "<", 3), ("words", ">", 1),
                                   ("words", "<=", 1), ("tokens", ">=", 3), ("tokens", "<=", 2)])
def test_bound_masks_are_exact(bound):
    """A token is allowed iff some completion (found by brute force) satisfies the bound."""
    tok = byte_tokenizer([("a", "b"), ("Ġ", "a"), ("ab", "Ġ")])
    kind, op, n = bound
    hole = compile_hole([Regex(r"[ab ]*"), Count(kind, op, n)], tok, following_text="\n", cache=False)
    alphabet = [tok.token_bytes.index(b) for b in (b"a", b"b", b" ", b"ab", b" a", b"ab ")]
    nl = tok.token_bytes.index(b"\n")

    compare = {"<=": int.__le__, "<": int.__lt__, "==": int.__eq__, ">=": int.__ge__, ">": int.__gt__}[op]

    def ok(content):  # ``content`` tokens, then the terminator "\n"
        value = b"".join(tok.token_bytes[i] for i in content).decode()
        m = {"len": len(value), "words": len(value.split()), "tokens": len(content) + 1}[kind]
        return compare(m, n)

    # Brute force: every content sequence up to 6 tokens; a prefix is completable iff it prefixes one that is ok.
    good = set()
    for k in range(7):
        for content in itertools.product(alphabet, repeat=k):
            if ok(content):
                full = content + (nl,)
                good.update(full[:j] for j in range(len(full) + 1))
    for k in range(3):
        for prefix in itertools.product(alphabet, repeat=k):
            assert hole.completable(list(prefix)) == (prefix in good), prefix
            if prefix not in good:
                continue
            mask = hole.allowed_tokens(list(prefix))
            for t in alphabet + [nl]:
                assert mask[t] == ((prefix + (t,)) in good), (prefix, t)


def test_counter_mask_device_equals_host():
    tok = byte_tokenizer([("a", "b"), ("Ġ", "a")])
    holes = [compile_hole([Count("len", ">=", 2), Count("len", "<=", 5)], tok, following_text=" a", cache=False),
             compile_hole([Choices(["a", "ab a", "b b b"]), Count("words", "<=", 2)], tok, cache=False)]
    from lmprog.compiler.automaton import stack_holes

    table, offsets = stack_holes(holes)
    rng = np.random.default_rng(0)
    rows, host = [], []
    for i, h in enumerate(holes):
        for s in range(h.num_states):
            for _ in range(3):
                raw = rng.integers(0, 7, size=3)
                rows.append((offsets[i] + s, raw))
                nxt = h.automaton.dense()[s]
                toks = np.flatnonzero(nxt >= 0)
                after = raw[None, :] + np.stack(
                    [np.ones(toks.size, int), h.inc_chars[toks], h.inc_words[h.counters.tracker[s], toks]], axis=1)
                good = h.counters.completable_many(nxt[toks], after - h.counters.pend[nxt[toks]], max_tokens=6)
                m = np.zeros(tok.vocab_size, bool)
                m[toks[good]] = True
                host.append(m)
    states = jnp.array([r[0] for r in rows], jnp.int32)
    counts = jnp.array([r[1] for r in rows], jnp.int32)
    dev = np.asarray(jax.jit(lambda t, s, c: t.mask(s, c, 6))(table, states, counts))
    assert np.array_equal(dev, np.stack(host))
