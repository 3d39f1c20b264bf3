"""A Llama-family decoder in JAX (equinox): SmolLM2, Llama 2/3, Mistral and Qwen2 through one config.

Per layer, for hidden states ``x``::

    h   = x + Wo · attn(RoPE(Wq·n(x) + bq), RoPE(Wk·n(x) + bk), Wv·n(x) + bv)      n = RMSNorm
    out = h + W_down · (silu(W_gate · n(h)) ⊙ (W_up · n(h)))

with grouped-query attention (``n_heads / n_kv_heads`` query heads share each key/value head) and
rotary embeddings in the "rotate half" layout (Q/K weights of GGUF files, which llama.cpp stores
permuted for its interleaved RoPE, are un-permuted when loaded; see ``loaders.py``).

Layers are stacked along a leading axis and run with ``lax.scan`` (one compiled layer, fast compiles).
The KV cache is preallocated, ``[n_layers, batch, n_kv_heads, max_len, head_dim]``; a call writes the
new keys/values at each row's own positions and, under ``jit`` with the cache donated, updates it in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from lmprog.backends.tokenizer import Tokenizer


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (static: hashable, part of the compiled program)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    max_context: int = 2048

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


class LlamaWeights(eqx.Module):
    """All weights; per-layer ones stacked on a leading ``n_layers`` axis. Linear maps are ``[in, out]``."""

    embed: jax.Array  # [V, H]
    attn_norm: jax.Array  # [L, H]
    wq: jax.Array  # [L, H, n_heads * D]
    wk: jax.Array  # [L, H, n_kv * D]
    wv: jax.Array  # [L, H, n_kv * D]
    wo: jax.Array  # [L, n_heads * D, H]
    bq: jax.Array | None  # [L, n_heads * D]
    bk: jax.Array | None
    bv: jax.Array | None
    ffn_norm: jax.Array  # [L, H]
    w_gate: jax.Array  # [L, H, F]
    w_up: jax.Array  # [L, H, F]
    w_down: jax.Array  # [L, F, H]
    final_norm: jax.Array  # [H]
    lm_head: jax.Array | None  # [H, V]; None when tied to `embed`
    rope_inv_freq: jax.Array  # [D / 2]


class KVCache(NamedTuple):
    """Keys and values, ``[n_layers, batch, n_kv_heads, max_len, head_dim]`` each."""

    k: jax.Array
    v: jax.Array


def rope_inv_freq(config: LlamaConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """``theta^(-2i/D)`` for ``i < D/2``, optionally divided by per-frequency factors (Llama 3.1 scaling)."""
    inv = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)
    return inv.astype(np.float32)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE: ``x [B, T, heads, D]``, ``cos/sin [B, T, 1, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _write_rows(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write ``new [B, KV, T, D]`` into ``cache_layer [B, KV, S, D]`` at slots ``positions[b] + t``."""
    return jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice(c, n, (0, p, 0)))(cache_layer, new, positions)


def forward(
    config: LlamaConfig, weights: LlamaWeights, cache: KVCache, tokens: jax.Array, positions: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Logits for ``tokens [B, T]`` at positions ``positions[b] + t``; writes their keys/values into ``cache``.

    Row ``b`` attends to cache slots ``0 .. positions[b] + t``, so slots beyond a row's own length are
    never read (rows of different lengths share one cache).
    """
    c = config
    batch, seq = tokens.shape
    max_len = cache.k.shape[3]
    groups = c.n_heads // c.n_kv_heads
    scale = 1.0 / np.sqrt(c.head_dim)

    x = weights.embed[tokens]  # [B, T, H]
    pos = positions[:, None] + jnp.arange(seq, dtype=positions.dtype)[None, :]  # [B, T]
    angles = pos[..., None].astype(jnp.float32) * weights.rope_inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    visible = jnp.arange(max_len)[None, None, :] <= pos[:, :, None]  # [B, T, S]
    mask = visible[:, None, None, :, :]  # [B, 1, 1, T, S]

    def layer(carry, inputs):
        x, k_cache, v_cache = carry
        i, w = inputs
        h = _rms_norm(x, w["attn_norm"], c.rms_eps)
        q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
        if c.qkv_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q = _apply_rope(q.reshape(batch, seq, c.n_heads, c.head_dim), cos, sin)
        k = _apply_rope(k.reshape(batch, seq, c.n_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(batch, seq, c.n_kv_heads, c.head_dim)

        k_layer = _write_rows(k_cache[i], k.transpose(0, 2, 1, 3).astype(k_cache.dtype), positions)
        v_layer = _write_rows(v_cache[i], v.transpose(0, 2, 1, 3).astype(v_cache.dtype), positions)
        k_cache = jax.lax.dynamic_update_index_in_dim(k_cache, k_layer, i, 0)
        v_cache = jax.lax.dynamic_update_index_in_dim(v_cache, v_layer, i, 0)

        qg = q.reshape(batch, seq, c.n_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bksd->bkgts", qg, k_layer.astype(q.dtype)) * scale  # [B, KV, G, T, S]
        scores = jnp.where(mask, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        attn = jnp.einsum("bkgts,bksd->btkgd", probs, v_layer.astype(q.dtype))
        x = x + attn.reshape(batch, seq, c.n_heads * c.head_dim) @ w["wo"]

        h = _rms_norm(x, w["ffn_norm"], c.rms_eps)
        x = x + (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
        return (x, k_cache, v_cache), None

    per_layer = {
        name: getattr(weights, name)
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")
    }
    if c.qkv_bias:
        per_layer.update(bq=weights.bq, bk=weights.bk, bv=weights.bv)
    layer_ids = jnp.arange(c.n_layers)
    (x, k_cache, v_cache), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (layer_ids, per_layer))

    x = _rms_norm(x, weights.final_norm, c.rms_eps)
    if weights.lm_head is None:
        logits = jnp.einsum("bth,vh->btv", x, weights.embed)
    else:
        logits = x @ weights.lm_head
    return logits.astype(jnp.float32), KVCache(k_cache, v_cache)


def reorder_cache(cache: KVCache, ancestors: jax.Array) -> KVCache:
    """Row ``b`` of the result is row ``ancestors[b]`` (the batch axis is 1)."""
    return KVCache(jnp.take(cache.k, ancestors, axis=1), jnp.take(cache.v, ancestors, axis=1))


def broadcast_cache(cache: KVCache, batch: int) -> KVCache:
    """Repeat a one-row cache ``batch`` times (one shared prefill for all particles)."""
    return KVCache(*(jnp.broadcast_to(a, a.shape[:1] + (batch,) + a.shape[2:]) for a in cache))


class LlamaModel:
    """A loaded Llama-family model implementing :class:`lmprog.backends.base.LanguageModel`."""

    def __init__(self, name: str, config: LlamaConfig, weights: LlamaWeights, tokenizer: Tokenizer):
        self.name = name
        self.config = config
        self.params = weights
        self.tokenizer = tokenizer
        self.vocab_size = config.vocab_size
        self.eos_ids = tokenizer.eos_ids
        self.max_context = config.max_context
        self._jit_apply = jax.jit(partial(forward, config), donate_argnums=(1,))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LlamaModel({self.name!r}, layers={c.n_layers}, hidden={c.hidden_size}, heads={c.n_heads}/"
            f"{c.n_kv_heads}, vocab={c.vocab_size})"
        )

    # --- the LanguageModel protocol (pure, jittable) ---
    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return init_cache(self.config, batch, max_len)

    def apply(self, params, cache, tokens, positions):
        return forward(self.config, params, cache, tokens, positions)

    def reorder(self, cache: KVCache, ancestors: jax.Array) -> KVCache:
        return reorder_cache(cache, ancestors)

    def broadcast(self, cache: KVCache, batch: int) -> KVCache:
        return broadcast_cache(cache, batch)

    # --- conveniences (host side) ---
    def forward(self, cache: KVCache, tokens, positions) -> tuple[jax.Array, KVCache]:
        """Jitted :meth:`apply` with the model's own weights; ``cache`` is donated (do not reuse it)."""
        return self._jit_apply(self.params, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32))

    def logprobs(self, ids) -> np.ndarray:
        """``[len(ids), vocab]`` next-token log-probabilities after each prefix of ``ids``."""
        ids = np.asarray(list(ids), dtype=np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("logprobs needs a non-empty sequence of token ids")
        if ids.size > self.max_context:
            raise ValueError(f"{ids.size} tokens exceed the model's context of {self.max_context}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        # Pad to a bucketed length so prompts of different lengths share a compilation; padding sits after
        # the real tokens, and causal attention keeps it from influencing them.
        length = min(_bucket(ids.size), self.max_context)
        padded = np.zeros((1, length), np.int32)
        padded[0, : ids.size] = ids
        logits, _ = self.forward(self.init_cache(1, length), padded, np.zeros(1, np.int32))
        return np.asarray(jax.nn.log_softmax(logits[0, : ids.size], axis=-1))


def _bucket(n: int) -> int:
    """Round a cache length up to a power of two (>= 64) so varying lengths reuse few compilations."""
    return max(64, 1 << (int(n) - 1).bit_length())
