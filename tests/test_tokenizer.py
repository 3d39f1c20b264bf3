"""The tokenizer built from GGUF metadata matches the reference (transformers) tokenizer exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmprog.backends.tokenizer import TokenizerError, byte_tokenizer, bytes_to_unicode, tokenizer_from_gguf_fields

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "tokenizer_reference.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", REFERENCE["encodings"], ids=lambda c: repr(c["text"][:24]))
def test_encodings_equal_reference(default_tokenizer, case):
    assert default_tokenizer.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", REFERENCE["encodings"], ids=lambda c: repr(c["text"][:24]))
def test_decode_inverts_encode(default_tokenizer, case):
    assert default_tokenizer.decode(case["ids"]) == case["text"]


def test_special_tokens_and_metadata(default_tokenizer):
    tok = default_tokenizer
    assert len(tok) == 49152
    assert tok.eos_ids == (2,) and tok.bos_id == 1
    assert not tok.add_bos  # SmolLM2's metadata does not ask for BOS
    assert tok.encode("<|im_end|>") == [2]
    assert {0, 1, 2} <= tok.special_ids
    assert tok.token_bytes[2] == b"<|im_end|>"
    # byte-level aliases decode to raw bytes: 'Ġ' is a space, 'Ċ' a newline
    space_the = tok.encode(" the")
    assert len(space_the) == 1 and tok.token_bytes[space_the[0]] == b" the"
    assert tok.token_bytes[tok.encode("\n")[0]] == b"\n"


def test_token_bytes_concatenate_to_the_text(default_tokenizer):
    text = "Unicode: naïve 日本 🤖 and\ttabs\n"
    ids = default_tokenizer.encode(text)
    assert b"".join(default_tokenizer.token_bytes[i] for i in ids) == text.encode("utf-8")


def test_decode_never_raises_on_partial_utf8(default_tokenizer):
    ids = default_tokenizer.encode("🤖")
    assert len(ids) > 1  # the emoji is split into byte pieces
    partial = default_tokenizer.decode(ids[:1])
    assert "\ufffd" in partial
    assert default_tokenizer.decode_bytes(ids[:1]) == "🤖".encode()[: len(default_tokenizer.token_bytes[ids[0]])]


# SmolLM2's vocabulary has no token for a few control bytes (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d): such
# characters cannot be represented by the model at all (the reference tokenizer drops them too); nor can
# code points from U+40000 on, whose UTF-8 lead byte (0xF1..) has no token.
UNREPRESENTABLE = "\x04\x06\x13\x14\x16\x1d"


@settings(max_examples=60, deadline=None)
@given(
    st.text(
        st.characters(blacklist_characters=UNREPRESENTABLE, blacklist_categories=("Cs",), max_codepoint=0x3FFFF),
        max_size=40,
    )
)
def test_roundtrip_arbitrary_text(default_tokenizer, text):
    assert default_tokenizer.decode(default_tokenizer.encode(text)) == text


def test_invalid_unicode_is_a_clear_error(default_tokenizer):
    with pytest.raises(ValueError, match="lone surrogate"):
        default_tokenizer.encode("bad \ud800 text")
    with pytest.raises(TypeError, match="needs a str"):
        default_tokenizer.encode(b"bytes")


def test_unrepresentable_bytes_are_the_known_ones(default_tokenizer):
    single = {bytes(t) for t in default_tokenizer.token_bytes if len(t) == 1}
    missing = [b for b in range(256) if bytes([b]) not in single]
    assert bytes(missing[:6]) == UNREPRESENTABLE.encode()
    assert all(b >= 0xC0 for b in missing[6:])  # the rest never occur in UTF-8 text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 49151), max_size=12))
def test_decode_arbitrary_ids_never_raises(default_tokenizer, ids):
    assert isinstance(default_tokenizer.decode(ids), str)


def test_bytes_to_unicode_is_a_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256


def test_byte_tokenizer_with_merges_is_exact():
    alias = bytes_to_unicode()
    tok = byte_tokenizer(merges=[("h", "e"), ("he", "l"), (alias[32], "w")])
    assert len(tok) == 256 + 3 + 1
    ids = tok.encode("hello world")
    assert ids[0] == 256 + 1  # "hel"
    assert tok.token_bytes[ids[0]] == b"hel"
    assert tok.decode(ids) == "hello world"
    assert tok.eos_ids == (259,) and tok.decode([259]) == "<|endoftext|>"


def test_unknown_tokenizer_kinds_are_clear_errors():
    with pytest.raises(TokenizerError, match="unsupported tokenizer model 'wordpiece'"):
        tokenizer_from_gguf_fields({"tokenizer.ggml.model": "wordpiece", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="unsupported BPE pre-tokenizer 'mystery'"):
        tokenizer_from_gguf_fields(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a"]}
        )


def test_sentencepiece_vocabulary_roundtrip():
    """A SentencePiece-style ('llama') vocabulary: '▁' is a space, <0xXX> tokens are raw bytes."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁w", "or", "hell", "hello", "▁wor", "▁world"]
    tokens = pieces + words
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(words))]
    scores[tokens.index("hello")] = 10.0
    scores[tokens.index("▁world")] = 9.0
    tok = tokenizer_from_gguf_fields(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
        }
    )
    assert tok.add_bos and tok.bos_id == 1
    ids = tok.encode("hello world")
    assert ids[0] == 1
    assert tok.decode(ids[1:]).strip() == "hello world"
    assert tok.token_bytes[tokens.index("▁world")] == b" world"
    assert tok.token_bytes[3 + 0x41] == b"A"
    # characters outside the vocabulary fall back to byte tokens, so nothing is lost
    assert tok.decode(tok.encode("hé", add_bos=False)).strip() == "hé"
