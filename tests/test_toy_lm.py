"""Toy LMs satisfy the LanguageModel protocol and agree with their exact host-side reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lmprog.backends.base import LanguageModel
from lmprog.backends.toy import DEFAULT_TOY_VOCAB, ToyLM, toy_tokenizer


def test_protocol_and_tokenizer():
    lm = ToyLM.random(context=2, seed=1)
    assert isinstance(lm, LanguageModel)
    tok = lm.tokenizer
    assert len(tok) == lm.vocab_size == len(DEFAULT_TOY_VOCAB)
    assert tok.encode("ab c\n") == [0, 2, 3, 5, 4, 6]  # BOS first (add_bos)
    assert tok.encode("a<eos>", add_bos=False) == [2, 1]
    assert tok.decode([0, 2, 3, 1], skip_special=True) == "ab"
    assert lm.eos_ids == (1,)
    assert np.all(np.isneginf(lm.table[..., tok.bos_id]))  # BOS is never generated


@pytest.mark.parametrize("context", [1, 2])
def test_apply_matches_host_logits_with_per_row_positions(context):
    lm = ToyLM.random(context=context, positions=6, seed=3)
    seqs = [[0, 2, 3, 4, 2, 5, 6, 3], [0, 4, 4, 2, 6, 1, 2, 2]]
    cache = lm.init_cache(2, 16)
    # Row 0 is fed 3 tokens then 5; row 1 is fed 1 token then 4 (per-row positions, padded blocks).
    logits1, cache = lm.apply(lm.params, cache, jnp.asarray([seqs[0][:3], seqs[1][:1] + [0, 0]]), jnp.asarray([0, 0]))
    logits2, cache = lm.apply(lm.params, cache, jnp.asarray([seqs[0][3:8], seqs[1][1:5] + [0]]), jnp.asarray([3, 1]))
    for t in range(3):
        np.testing.assert_allclose(logits1[0, t], lm.host_logits(seqs[0][: t + 1]))
    np.testing.assert_allclose(logits1[1, 0], lm.host_logits(seqs[1][:1]))
    for t in range(5):
        np.testing.assert_allclose(logits2[0, t], lm.host_logits(seqs[0][: 4 + t]))
    for t in range(4):
        np.testing.assert_allclose(logits2[1, t], lm.host_logits(seqs[1][: 2 + t]))


def test_reorder_and_broadcast():
    lm = ToyLM.random(seed=0)
    one = lm.init_cache(1, 8).at[0, :3].set(jnp.asarray([0, 2, 3]))
    many = lm.broadcast(one, 4)
    assert many.shape == (4, 8) and np.all(np.asarray(many[:, :3]) == [0, 2, 3])
    many = many.at[:, 3].set(jnp.arange(4))
    assert list(np.asarray(lm.reorder(many, jnp.asarray([3, 3, 0, 1]))[:, 3])) == [3, 3, 0, 1]


def test_hand_set_and_validation():
    lm = ToyLM.from_fn(lambda pos, ctx: np.where(np.arange(7) == (ctx[-1] + 1) % 7, 0.0, -np.inf), name="cycle")
    assert int(np.argmax(lm.host_logits([2]))) == 3
    with pytest.raises(ValueError, match="every token is impossible"):
        ToyLM(np.full((1, 3, 3), -np.inf), toy_tokenizer(["<bos>", "a", "<eos>"]))
