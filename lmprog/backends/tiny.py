"""Tiny random-weight Llama models of the real model class, for fast tests of the backend and kernels."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np

from lmprog.backends.llama import LayerWeights, LlamaConfig, LlamaModel, LlamaWeights, rope_inv_freq
from lmprog.backends.tokenizer import Tokenizer, byte_tokenizer


def tiny_config(vocab_size: int = 257, **overrides) -> LlamaConfig:
    """Two layers, GQA (4 query heads over 2 KV heads), head dim 8: every code path of the real model."""
    base = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=8, rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True, qkv_bias=False, max_context=512,
    )  # fmt: skip
    base.update(overrides)
    return LlamaConfig(**base)


def random_weights(config: LlamaConfig, seed: int = 0, scale: float = 0.3) -> LlamaWeights:
    """Gaussian weights (norm gains near 1) with enough scale that logits are far from uniform."""
    rng = np.random.default_rng(seed)
    L, H, F = config.n_layers, config.hidden_size, config.intermediate_size
    q_out, kv_out = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim

    def normal(*shape):
        return jnp.asarray(rng.normal(0.0, scale, size=shape).astype(np.float32))

    def gains(*shape):
        return jnp.asarray((1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32))

    def layer():
        bias = {k: normal(n) if config.qkv_bias else None for k, n in (("bq", q_out), ("bk", kv_out), ("bv", kv_out))}
        return LayerWeights(
            attn_norm=gains(H), wq=normal(H, q_out), wk=normal(H, kv_out), wv=normal(H, kv_out), wo=normal(q_out, H),
            ffn_norm=gains(H), w_gate=normal(H, F), w_up=normal(H, F), w_down=normal(F, H), **bias,
        )  # fmt: skip

    return LlamaWeights(
        embed=normal(config.vocab_size, H) * 3,
        layers=tuple(layer() for _ in range(L)),
        final_norm=gains(H),
        lm_head=None if config.tie_embeddings else normal(H, config.vocab_size),
        rope_inv_freq=jnp.asarray(rope_inv_freq(config)),
    )


def tiny_model(seed: int = 0, tokenizer: Tokenizer | None = None, **overrides) -> LlamaModel:
    """A random tiny :class:`LlamaModel` over a byte-level tokenizer (256 bytes + EOS)."""
    tokenizer = tokenizer or byte_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer), **overrides)
    return LlamaModel(f"tiny-random-{seed}", config, random_weights(config, seed), tokenizer)


__all__ = ["tiny_config", "random_weights", "tiny_model"]
