"""The LanguageModel protocol: what the inference kernels need from a model.

Everything here is jittable and functional. A model is split into

* ``params``: a pytree of arrays (the weights), passed explicitly into jitted code so they are
  arguments, not constants baked into the compiled program;
* a cache: a pytree of preallocated arrays with a batch axis (one row per particle);
* pure functions ``apply``/``init_cache``/``reorder``/``broadcast`` over them.

Positions are per row: row ``b`` of a ``[B, T]`` token block is written at cache slots
``positions[b] .. positions[b] + T - 1`` and attends to every slot ``< positions[b] + t + 1``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from lmprog.backends.tokenizer import Tokenizer

PyTree = Any


@runtime_checkable
class LanguageModel(Protocol):
    """A causal LM with a KV cache, usable inside ``jax.jit``.

    Attributes:
        name: human-readable name (registry name or path).
        tokenizer: the exact tokenizer (ids <-> text, id -> bytes table, special tokens).
        vocab_size: width of the logits (``>= len(tokenizer)``; extra ids are never produced).
        eos_ids: token ids that end a sequence.
        params: the weights, a pytree.
        max_context: the longest sequence the model supports.
    """

    name: str
    tokenizer: Tokenizer
    vocab_size: int
    eos_ids: tuple[int, ...]
    params: PyTree
    max_context: int

    def init_cache(self, batch: int, max_len: int) -> PyTree:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens."""
        ...

    def apply(
        self, params: PyTree, cache: PyTree, tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, PyTree]:
        """Run ``tokens [B, T] int32`` starting at per-row ``positions [B] int32``.

        Returns ``(logits [B, T, vocab_size] float32, cache)`` where ``logits[b, t]`` scores the token
        that follows ``tokens[b, t]``. The returned cache has the new keys/values written in place.
        """
        ...

    def reorder(self, cache: PyTree, ancestors: jax.Array) -> PyTree:
        """Row ``b`` of the result is row ``ancestors[b]`` of ``cache`` (resampling)."""
        ...

    def broadcast(self, cache: PyTree, batch: int) -> PyTree:
        """Copy a one-row cache (e.g. a prefilled shared prompt) to ``batch`` rows."""
        ...
