"""A Llama-family decoder in JAX (equinox): SmolLM2, Llama 2/3, Mistral and Qwen2 through one config.

Per layer, for hidden states ``x``::

    h   = x + Wo · attn(RoPE(Wq·n(x) + bq), RoPE(Wk·n(x) + bk), Wv·n(x) + bv)      n = RMSNorm
    out = h + W_down · (silu(W_gate · n(h)) ⊙ (W_up · n(h)))

with grouped-query attention (``n_heads / n_kv_heads`` query heads share each key/value head) and
rotary embeddings in the "rotate half" layout (Q/K weights of GGUF files, which llama.cpp stores
permuted for its interleaved RoPE, are un-permuted when loaded; see ``loaders.py``).

The KV cache is preallocated, one ``[batch, n_kv_heads, max_len, head_dim]`` buffer per layer for keys and
for values; a call scatters the new keys/values at each row's own positions and, under ``jit`` with the
cache donated, updates it in place. A shared prefix (:class:`~lmprog.backends.base.Prefix`: a one-row cache
of the first ``S0`` positions) is attended to by every row without being copied into their caches: scores
against it are one matmul for the whole batch, merged exactly with the scores against each row's own slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from lmprog.backends.base import Prefix
from lmprog.backends.jax_setup import round_pow2
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


class LayerWeights(eqx.Module):
    """One decoder layer. Linear maps are ``[in, out]``; biases are ``None`` unless ``config.qkv_bias``."""

    attn_norm: jax.Array  # [H]
    wq: jax.Array  # [H, n_heads * D]
    wk: jax.Array  # [H, n_kv * D]
    wv: jax.Array  # [H, n_kv * D]
    wo: jax.Array  # [n_heads * D, H]
    bq: jax.Array | None
    bk: jax.Array | None
    bv: jax.Array | None
    ffn_norm: jax.Array  # [H]
    w_gate: jax.Array  # [H, F]
    w_up: jax.Array  # [H, F]
    w_down: jax.Array  # [F, H]


class LlamaWeights(eqx.Module):
    """All weights: the embedding, one :class:`LayerWeights` per layer, the final norm and output head."""

    embed: jax.Array  # [V, H]
    layers: tuple[LayerWeights, ...]
    final_norm: jax.Array  # [H]
    lm_head: jax.Array | None  # [H, V]; None when tied to `embed`
    rope_inv_freq: jax.Array  # [D / 2]


class KVCache(NamedTuple):
    """Keys and values: one ``[batch, n_kv_heads, max_len, head_dim]`` array per layer each.

    Separate per-layer buffers (rather than one stacked array) let XLA update each in place with a
    scatter of the new rows, and let attention read a layer without slicing a copy out of a stack.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def rope_inv_freq(config: LlamaConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """``theta^(-2i/D)`` for ``i < D/2``, optionally divided by per-frequency factors (Llama 3.1 scaling)."""
    inv = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)
    return inv.astype(np.float32)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)))


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE: ``x [B, T, heads, D]``, ``cos/sin [B, T, 1, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _write_rows(cache: jax.Array, new: jax.Array, positions: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """Scatter ``new [B, T, KV, D]`` into ``cache [R, KV, S, D]`` at slots ``positions[b] + t`` of row ``b``
    (``rows[b]`` when given; rows ``>= R`` write nothing)."""
    batch, seq = new.shape[:2]
    rows = (jnp.arange(batch) if rows is None else rows)[:, None]
    slots = positions[:, None] + jnp.arange(seq)[None, :]
    return cache.at[rows, :, slots, :].set(new.astype(cache.dtype), mode="drop")


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, groups: int,
               prefix_kv: tuple[jax.Array, jax.Array] | None = None, prefix_visible: jax.Array | None = None
               ) -> jax.Array:
    """Grouped-query attention of ``q [B, T, H, D]`` over the cache ``k, v [B, KV, S, D]``.

    ``visible [B, T, S]`` says which cache slots each query sees. For one query per row (decoding) the
    scores are a fused multiply-reduce: XLA's CPU backend runs many tiny batched matmuls poorly.

    With ``prefix_kv = (k, v)`` (``[KV, Sp, D]`` each, shared by every row, ``prefix_visible [Sp]``) the
    softmax runs over the prefix slots and the row's own slots together, without concatenating them: the
    scores against the prefix are one matmul for all rows and queries at once, each part is exponentiated
    against the common maximum, and the two weighted sums of values are added before normalizing.
    """
    batch, seq, _, dim = q.shape
    kv = k.shape[1]
    qg = q.reshape(batch, seq, kv, groups, dim) * (1.0 / np.sqrt(dim))
    if prefix_kv is not None:
        return _attention_split(qg, k, v, visible, prefix_kv, prefix_visible)
    if seq == 1:
        scores = jnp.sum(qg[:, 0, :, :, None, :] * k[:, :, None, :, :], axis=-1)  # [B, KV, G, S]
        scores = jnp.where(visible[:, 0, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.sum(probs[..., None] * v[:, :, None, :, :], axis=-2)  # [B, KV, G, D]
        return out.reshape(batch, 1, kv * groups * dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k)
    scores = jnp.where(visible[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(batch, seq, kv * groups * dim)


def _attention_split(qg, k, v, visible, prefix_kv, prefix_visible) -> jax.Array:
    """:func:`_attention` over a shared prefix and the rows' own slots (``qg [B, T, KV, G, D]``, scaled)."""
    batch, seq, kv, groups, dim = qg.shape
    pk, pv = prefix_kv
    # Every query sees its own slot, so the common maximum is finite.
    if seq == 1:
        q1 = qg[:, 0]  # [B, KV, G, D]
        own = jnp.sum(q1[:, :, :, None, :] * k[:, :, None, :, :], axis=-1)  # [B, KV, G, S]: fused multiply-reduce
        own = jnp.where(visible[:, 0, None, None, :], own, -jnp.inf)
        # The prefix part in the KV-head-first layout of a batched matmul ([KV, B, G, Sp]: one matmul per KV
        # head, for all rows), so only the small [.., 1] and [.., D] results are transposed, never the scores.
        kfirst = lambda a: jnp.transpose(a, (1, 0, 2, 3))  # noqa: E731  [B, KV, ..] <-> [KV, B, ..]
        pre = jnp.einsum("kbgd,ksd->kbgs", kfirst(q1), pk)
        pre = jnp.where(prefix_visible, pre, -jnp.inf)
        m = jnp.maximum(jnp.max(own, axis=-1, keepdims=True), kfirst(jnp.max(pre, axis=-1, keepdims=True)))
        e_own, e_pre = jnp.exp(own - m), jnp.exp(pre - kfirst(m))
        denom = jnp.sum(e_own, axis=-1, keepdims=True) + kfirst(jnp.sum(e_pre, axis=-1, keepdims=True))
        out = jnp.sum(e_own[..., None] * v[:, :, None, :, :], axis=-2) + kfirst(jnp.einsum("kbgs,ksd->kbgd", e_pre, pv))
        return (out / denom).reshape(batch, 1, kv * groups * dim)  # [B, KV, G, D] / [B, KV, G, 1]
    own = jnp.einsum("btkgd,bksd->bkgts", qg, k)
    own = jnp.where(visible[:, None, None, :, :], own, -jnp.inf)
    pre = jnp.einsum("btkgd,ksd->bkgts", qg, pk)
    pre = jnp.where(prefix_visible, pre, -jnp.inf)
    m = jnp.maximum(jnp.max(own, axis=-1, keepdims=True), jnp.max(pre, axis=-1, keepdims=True))
    e_own, e_pre = jnp.exp(own - m), jnp.exp(pre - m)
    denom = jnp.sum(e_own, axis=-1, keepdims=True) + jnp.sum(e_pre, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", e_own, v) + jnp.einsum("bkgts,ksd->bkgtd", e_pre, pv)
    out = out / denom  # [B, KV, G, T, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, seq, kv * groups * dim)


def _layer(c: LlamaConfig, w: LayerWeights, x, k_cache, v_cache, slots, cos, sin, visible, prefix_kv=None,
           prefix_visible=None, rows=None):
    batch, seq = x.shape[:2]
    h = _rms_norm(x, w.attn_norm, c.rms_eps)
    q, k, v = h @ w.wq, h @ w.wk, h @ w.wv
    if c.qkv_bias:
        q, k, v = q + w.bq, k + w.bk, v + w.bv
    q = _apply_rope(q.reshape(batch, seq, c.n_heads, c.head_dim), cos, sin)
    k = _apply_rope(k.reshape(batch, seq, c.n_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(batch, seq, c.n_kv_heads, c.head_dim)
    k_cache = _write_rows(k_cache, k, slots, rows)
    v_cache = _write_rows(v_cache, v, slots, rows)
    if prefix_kv is not None:
        prefix_kv = tuple(a[0].astype(q.dtype) for a in prefix_kv)  # the one row: [KV, Sp, D]
    if rows is None:
        k_rows, v_rows = k_cache, v_cache
    else:  # the block's rows of the cache; read inside the fused multiply-reduce of decoding, not copied out
        read = jnp.clip(rows, 0, k_cache.shape[0] - 1)
        k_rows, v_rows = k_cache[read], v_cache[read]
    attn = _attention(q, k_rows.astype(q.dtype), v_rows.astype(q.dtype), visible, c.n_heads // c.n_kv_heads,
                      prefix_kv, prefix_visible)
    x = x + attn @ w.wo
    h = _rms_norm(x, w.ffn_norm, c.rms_eps)
    x = x + (jax.nn.silu(h @ w.w_gate) * (h @ w.w_up)) @ w.w_down
    return x, k_cache, v_cache


def forward(
    config: LlamaConfig, weights: LlamaWeights, cache: KVCache, tokens: jax.Array, positions: jax.Array,
    prefix: Prefix | None = None, rows: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Logits for ``tokens [B, T]`` at positions ``positions[b] + t``; writes their keys/values into ``cache``.

    Row ``b`` attends to cache slots ``0 .. positions[b] + t``, so slots beyond a row's own length are
    never read (rows of different lengths share one cache). Layers are unrolled: on CPU this beats a
    ``lax.scan`` over stacked weights, which slices (copies) every layer's weights and cache per step.

    With a ``prefix`` (its cache a one-row :class:`KVCache`, ``S0 = prefix.length``), positions stay absolute
    and ``cache`` holds the slots after the prefix: token ``t`` of row ``b`` goes to slot
    ``positions[b] + t - S0`` and attends to the ``S0`` prefix slots and its own slots up to that one.

    With ``rows [B]`` (distinct), input row ``b`` is cache row ``rows[b]`` of a cache with any number of rows
    (a block of the particles); ``rows[b] >=`` that number marks padding, which writes nothing.
    """
    seq = tokens.shape[1]
    max_len = cache.k[0].shape[2]
    x = weights.embed[tokens]  # [B, T, H]
    pos = positions[:, None] + jnp.arange(seq, dtype=positions.dtype)[None, :]  # [B, T]
    angles = pos[..., None].astype(jnp.float32) * weights.rope_inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if prefix is None:
        slots, prefix_kvs, prefix_visible = positions, [None] * config.n_layers, None
    else:
        s0 = jnp.asarray(prefix.length, positions.dtype)
        slots, pos = positions - s0, pos - s0  # own slots
        prefix_kvs = list(zip(prefix.cache.k, prefix.cache.v))
        prefix_visible = jnp.arange(prefix.cache.k[0].shape[2]) < s0  # [Sp]
    visible = jnp.arange(max_len)[None, None, :] <= pos[:, :, None]  # [B, T, S]

    new_k, new_v = [], []
    for w, k_cache, v_cache, pkv in zip(weights.layers, cache.k, cache.v, prefix_kvs):
        x, k_cache, v_cache = _layer(config, w, x, k_cache, v_cache, slots, cos, sin, visible, pkv, prefix_visible,
                                     rows)
        new_k.append(k_cache)
        new_v.append(v_cache)

    x = _rms_norm(x, weights.final_norm, config.rms_eps)
    if weights.lm_head is None:
        logits = jnp.einsum("bth,vh->btv", x, weights.embed)
    else:
        logits = x @ weights.lm_head
    return logits.astype(jnp.float32), KVCache(tuple(new_k), tuple(new_v))


def reorder_cache(cache: KVCache, ancestors: jax.Array) -> KVCache:
    """Row ``b`` of the result is row ``ancestors[b]``."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, ancestors, axis=0), cache)


def copy_rows(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Row ``dst[b]`` becomes a copy of row ``src[b]`` (``dst[b] >=`` the batch: nothing)."""
    return jax.tree_util.tree_map(lambda a: a.at[dst].set(a[jnp.clip(src, 0, a.shape[0] - 1)], mode="drop"), cache)


def broadcast_cache(cache: KVCache, batch: int) -> KVCache:
    """Repeat a one-row cache ``batch`` times (one shared prefill for all particles)."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:]), cache)


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
        # What kernels built on this model close over when traced (lmprog.inference.aot): the architecture only.
        self.aot_key = f"llama:{config!r}"

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LlamaModel({self.name!r}, layers={c.n_layers}, hidden={c.hidden_size}, heads={c.n_heads}/"
            f"{c.n_kv_heads}, vocab={c.vocab_size})"
        )

    # --- the LanguageModel protocol (pure, jittable) ---
    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return init_cache(self.config, batch, max_len)

    def apply(self, params, cache, tokens, positions, prefix: Prefix | None = None, rows=None):
        return forward(self.config, params, cache, tokens, positions, prefix, rows)

    def copy_rows(self, cache: KVCache, src, dst) -> KVCache:
        return copy_rows(cache, src, dst)

    def reorder(self, cache: KVCache, ancestors: jax.Array) -> KVCache:
        return reorder_cache(cache, ancestors)

    def broadcast(self, cache: KVCache, batch: int) -> KVCache:
        return broadcast_cache(cache, batch)

    # --- conveniences (host side) ---
    def forward(self, cache: KVCache, tokens, positions, prefix: Prefix | None = None) -> tuple[jax.Array, KVCache]:
        """Jitted :meth:`apply` with the model's own weights; ``cache`` is donated (do not reuse it)."""
        return self._jit_apply(self.params, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                               prefix)

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
        length = min(round_pow2(ids.size, 64), self.max_context)
        padded = np.zeros((1, length), np.int32)
        padded[0, : ids.size] = ids
        logits, _ = self.forward(self.init_cache(1, length), padded, np.zeros(1, np.int32))
        return np.asarray(jax.nn.log_softmax(logits[0, : ids.size], axis=-1))


