"""Toy language models for tests: tiny vocabularies, exact host-side probabilities.

A :class:`ToyLM` satisfies the :class:`~lmprog.backends.base.LanguageModel` protocol with a trivial
"KV cache": the token history ``[B, max_len] int32``. Its next-token logits are a table lookup on the
position and the last ``context`` tokens::

    logits(next | history) = table[min(pos, P - 1), ctx_index(history[pos - context + 1 .. pos])]

where ``pos`` is the position of the last token. With a shared prefix
(:class:`~lmprog.backends.base.Prefix`: a one-row history of the first ``S0`` positions) the history of row
``b`` is the prefix's ``S0`` tokens followed by row ``b`` of the cache. The same table drives :meth:`ToyLM.host_logits`
(numpy, no JAX), so tests can enumerate the exact distribution over short sequences and compare the
jitted inference kernels against it. Logits may be ``-inf`` (impossible tokens).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmprog.backends.base import Prefix
from lmprog.backends.tokenizer import Tokenizer

__all__ = ["DEFAULT_TOY_VOCAB", "ToyLM", "toy_tokenizer"]

DEFAULT_TOY_VOCAB = ("<bos>", "<eos>", "a", "b", "c", " ", "\n")


def toy_tokenizer(vocab: Sequence[str], bos: str | None = "<bos>", eos: Sequence[str] = ("<eos>",)) -> Tokenizer:
    """A :class:`Tokenizer` over ``vocab`` (token ``i`` is the string ``vocab[i]``).

    Tokens written ``<...>`` are special (control) tokens. Encoding splits text into single characters
    (a WordLevel model), so only single-character tokens and special-token markup are produced by
    ``encode``; multi-character tokens still decode exactly (through ``token_bytes``).
    """
    vocab = list(vocab)
    if len(set(vocab)) != len(vocab):
        raise ValueError("toy vocabulary has duplicate tokens")
    ids = {t: i for i, t in enumerate(vocab)}
    special = {i for i, t in enumerate(vocab) if t.startswith("<") and t.endswith(">") and len(t) > 2}
    unk = next((t for t in vocab if t == "<unk>"), None)
    hf = HFTokenizer(models.WordLevel(ids, unk_token=unk or (vocab[min(special)] if special else vocab[0])))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    hf.add_special_tokens([AddedToken(vocab[i], special=True, normalized=False) for i in sorted(special)])
    eos_ids = tuple(ids[e] for e in eos if e in ids)
    bos_id = ids.get(bos) if bos is not None else None
    return Tokenizer(
        hf=hf,
        token_bytes=tuple(t.encode("utf-8") for t in vocab),
        special_ids=frozenset(special),
        bos_id=bos_id,
        eos_ids=eos_ids,
        add_bos=bos_id is not None,
    )


class ToyLM:
    """A table-driven toy LM (see the module docstring). Hashable by identity; usable inside ``jit``.

    Args:
        table: ``[P, V ** context, V]`` logits (float, ``-inf`` allowed): ``table[pos, ctx]`` scores the token
            after a history whose last token sits at position ``pos`` (positions ``>= P`` reuse ``P - 1``).
        tokenizer: the vocabulary (``len(tokenizer) == V``).
        context: how many previous tokens the logits depend on (1 = bigram).
        name: for messages.
    """

    def __init__(self, table, tokenizer: Tokenizer, context: int = 1, name: str = "toy", max_context: int = 4096):
        table = np.asarray(table, dtype=np.float32)
        v = len(tokenizer)
        if table.ndim != 3 or table.shape[1] != v**context or table.shape[2] != v:
            raise ValueError(f"toy table must be [P, {v}**{context}, {v}], got {table.shape}")
        if np.isnan(table).any() or np.isposinf(table).any():
            raise ValueError("toy table has NaN or +inf")
        if np.isneginf(table).all(axis=-1).any():
            raise ValueError("toy table has a row where every token is impossible")
        self.name = name
        self.tokenizer = tokenizer
        self.vocab_size = v
        self.eos_ids = tuple(tokenizer.eos_ids)
        self.context = int(context)
        self.max_context = int(max_context)
        self.table = table
        self.params = {"table": jnp.asarray(table)}
        # Context slots before position 0 read this token (BOS if any).
        self.pad_id = int(tokenizer.bos_id if tokenizer.bos_id is not None else 0)

    def __repr__(self) -> str:
        return f"ToyLM({self.name!r}, vocab={self.vocab_size}, context={self.context}, positions={self.table.shape[0]})"

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def random(
        cls,
        vocab: Sequence[str] = DEFAULT_TOY_VOCAB,
        *,
        context: int = 1,
        positions: int = 16,
        seed: int = 0,
        scale: float = 1.5,
        eos: Sequence[str] = ("<eos>",),
        bos: str | None = "<bos>",
        name: str = "toy-random",
    ) -> "ToyLM":
        """Gaussian logits (standard deviation ``scale``); BOS is never generated."""
        tok = toy_tokenizer(vocab, bos=bos, eos=eos)
        v = len(tok)
        rng = np.random.default_rng(seed)
        table = scale * rng.standard_normal((positions, v**context, v)).astype(np.float32)
        if tok.bos_id is not None:
            table[..., tok.bos_id] = -np.inf
        return cls(table, tok, context=context, name=name)

    @classmethod
    def from_fn(
        cls,
        fn: Callable[[int, tuple[int, ...]], Sequence[float]],
        vocab: Sequence[str] = DEFAULT_TOY_VOCAB,
        *,
        context: int = 1,
        positions: int = 16,
        eos: Sequence[str] = ("<eos>",),
        bos: str | None = "<bos>",
        name: str = "toy",
    ) -> "ToyLM":
        """Hand-set logits: ``fn(pos, ctx) -> [V]`` where ``ctx`` is the last ``context`` tokens, oldest first,
        and ``pos`` the position of the last one. Entries may be ``-inf``."""
        tok = toy_tokenizer(vocab, bos=bos, eos=eos)
        v = len(tok)
        table = np.empty((positions, v**context, v), np.float32)
        for pos in range(positions):
            for idx in range(v**context):
                ctx = tuple((idx // v ** (context - 1 - j)) % v for j in range(context))
                table[pos, idx] = np.asarray(fn(pos, ctx), np.float32)
        return cls(table, tok, context=context, name=name)

    # -- the LanguageModel protocol ----------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int):
        return jnp.full((batch, max_len), self.pad_id, jnp.int32)

    def apply(self, params, cache, tokens, positions, prefix: Prefix | None = None, rows=None):
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        b, t = tokens.shape
        slots = positions[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T] absolute positions
        s0 = jnp.int32(0) if prefix is None else jnp.asarray(prefix.length, jnp.int32)
        if rows is None:
            own, write = cache, jnp.arange(b)
        else:  # a block of the cache's rows; rows past its end are padding (read row 0, write nothing)
            own, write = cache[jnp.clip(rows, 0, cache.shape[0] - 1)], rows
        own = own.at[jnp.arange(b)[:, None], slots - s0].set(tokens, mode="drop")
        cache = cache.at[write[:, None], slots - s0].set(tokens, mode="drop")
        v = self.vocab_size
        ctx = jnp.zeros_like(slots)
        for j in range(self.context - 1, -1, -1):  # oldest first
            s = slots - j
            tok_j = jnp.take_along_axis(own, jnp.clip(s - s0, 0, own.shape[1] - 1), axis=1)
            if prefix is not None:  # positions < S0 are read from the shared one-row history
                shared = prefix.cache[0, jnp.clip(s, 0, prefix.cache.shape[1] - 1)]
                tok_j = jnp.where(s < s0, shared, tok_j)
            tok_j = jnp.where(s >= 0, tok_j, self.pad_id)
            ctx = ctx * v + tok_j
        table = params["table"]
        pos = jnp.clip(slots, 0, table.shape[0] - 1)
        logits = table[pos, ctx]  # [B, T, V]
        return logits.astype(jnp.float32), cache

    def copy_rows(self, cache, src, dst):
        return cache.at[dst].set(cache[jnp.clip(src, 0, cache.shape[0] - 1)], mode="drop")

    def reorder(self, cache, ancestors):
        return jnp.take(cache, ancestors, axis=0)

    def broadcast(self, cache, batch: int):
        return jnp.broadcast_to(cache[:1], (batch,) + cache.shape[1:]).copy()

    # -- exact host-side reference -------------------------------------------------------------------

    def host_logits(self, history: Sequence[int]) -> np.ndarray:
        """Logits ``[V]`` for the token after ``history`` (the full sequence, prompt included), in numpy."""
        if not history:
            raise ValueError("host_logits needs at least one token of history")
        pos = len(history) - 1
        v = self.vocab_size
        idx = 0
        for j in range(self.context - 1, -1, -1):
            s = pos - j
            idx = idx * v + (int(history[s]) if s >= 0 else self.pad_id)
        return self.table[min(pos, self.table.shape[0] - 1), idx]
