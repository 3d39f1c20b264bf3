"""The LanguageModel protocol: what the inference kernels need from a model.

Everything here is jittable and functional. A model is split into

* ``params``: a pytree of arrays (the weights), passed explicitly into jitted code so they are
  arguments, not constants baked into the compiled program;
* a cache: a pytree of preallocated arrays with a batch axis (one row per particle);
* pure functions ``apply``/``init_cache``/``reorder``/``broadcast`` over them.

Positions are per row: row ``b`` of a ``[B, T]`` token block is written at cache slots
``positions[b] .. positions[b] + T - 1`` and attends to every slot ``< positions[b] + t + 1``.

**A shared prefix.** ``apply(..., prefix=Prefix(cache1, S0))`` splits the sequence in two: ``cache1`` is a
*one-row* cache whose slots ``0 .. S0 - 1`` hold a prefix every row shares (a prompt prefilled once, with
``prefix=None``), and ``cache`` holds only each row's own slots, own slot ``s`` being absolute position
``S0 + s``. Positions stay absolute (rotary embeddings need them): token ``t`` of row ``b`` sits at position
``positions[b] + t >= S0``, is written at own slot ``positions[b] + t - S0`` and attends to prefix slots
``0 .. S0 - 1`` and own slots ``0 .. positions[b] + t - S0``. The result is the same as with the prefix
copied into every row of one cache (``broadcast``), but the prefix is stored once and read once per call.
The prefix buffer may be longer than ``S0`` (``S0`` is traced, so prompts of nearby lengths share a
compilation): slots ``>= S0`` of it are never read. It is a constant of the run: never donated, reordered
or copied per row.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

from lmprog.backends.tokenizer import Tokenizer

PyTree = Any


class Prefix(NamedTuple):
    """A prefix shared by every row of a batch (see the module docstring): ``cache`` is a one-row cache of
    the model (``init_cache(1, S)``, ``S >= length``) whose slots ``0 .. length - 1`` are the prefix."""

    cache: PyTree
    length: jax.Array  # [] int32: S0, the number of prefix slots (traced)


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
        self, params: PyTree, cache: PyTree, tokens: jax.Array, positions: jax.Array, prefix: Prefix | None = None,
        rows: jax.Array | None = None,
    ) -> tuple[jax.Array, PyTree]:
        """Run ``tokens [B, T] int32`` starting at per-row ``positions [B] int32``.

        Returns ``(logits [B, T, vocab_size] float32, cache)`` where ``logits[b, t]`` scores the token
        that follows ``tokens[b, t]``. The returned cache has the new keys/values written in place. With a
        ``prefix``, ``cache`` holds the rows' own slots after it and positions are absolute (module docstring).
        With ``rows [B] int32`` (distinct), input row ``b`` is row ``rows[b]`` of a cache of any batch size (a
        block of its rows: reads and writes go there); ``rows[b] >=`` the cache's batch marks a padding row
        that writes nothing (its logits are junk).
        """
        ...

    def copy_rows(self, cache: PyTree, src: jax.Array, dst: jax.Array) -> PyTree:
        """Row ``dst[b]`` of the result is a copy of row ``src[b]`` (``dst[b] >=`` the batch: nothing); the
        other rows are kept. Gives a particle that leaves a shared row its own copy of the history."""
        ...

    def reorder(self, cache: PyTree, ancestors: jax.Array) -> PyTree:
        """Row ``b`` of the result is row ``ancestors[b]`` of ``cache`` (resampling)."""
        ...

    def broadcast(self, cache: PyTree, batch: int) -> PyTree:
        """Copy a one-row cache (e.g. a prefilled shared prompt) to ``batch`` rows."""
        ...
