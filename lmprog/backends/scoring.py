"""Scoring given text under a language model, for many requests at once: the device side of ``logprob_of``.

A request is a pair of strings ``(context, text)``; its score is the log-probability of the text's tokens after
the context's::

    ids = [BOS] + encode(context) + encode(text)          (n = the length of [BOS] + encode(context))
    log p(text | context) = sum_{j = n .. len(ids) - 1} log softmax(logits(ids[:j]))[ids[j]]

**Tokenization.** Context and text are encoded *separately* (``encode(s, add_bos=False)`` each) and the ids
concatenated, so no token straddles the boundary: the score is that of exactly the token sequence
``encode(text)`` after ``encode(context)``, as the model itself gives it (``LlamaModel.logprobs`` of ``ids``
summed over the text positions), and it equals the weight ``observe`` gives the same text after the same prompt
(observed text is encoded on its own too). **BOS** is prepended when the tokenizer asks for it
(``tokenizer.add_bos``), as at the start of a program; a model that does not ask for one gets it only when
the context is empty (the first text token must be conditioned on something, which is also what the engine
does); without any BOS an empty context is an error. An empty text scores 0 (``log 1``).

**Batching.** :meth:`Scorer.score` takes every request of a host step (duplicates scored once) and runs them
as one batch: the longest token prefix that every request shares (before its first scored position) is
prefilled once, as a one-row :class:`~lmprog.backends.base.Prefix`; each request's remaining tokens are one
row of a ``[B, T]`` block attending to that prefix, ``B`` and ``T`` padded to powers of two (``T`` at least 16;
the prefix buffer too, at least 16, its length traced), so nearby sizes share a compilation. ``B`` is not
padded beyond its power of two: a step with one distinct request (every particle asking the same) runs one row. One jitted function gathers the
log-softmax of each row's text tokens and sums them on the device; the host sees ``[B]`` floats. Rows are cut
into chunks of at most :data:`CHUNK_BYTES` of logits (``B x T x V`` float32) so a long batch never holds the
logits of all of it at once.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.backends.base import Prefix
from lmprog.backends.jax_setup import round_pow2

__all__ = ["CHUNK_BYTES", "MEMO_ENTRIES", "Scorer", "ScoreError", "encode_request", "scorer_for"]

#: Scores a :class:`Scorer` remembers across calls (a request's score depends on nothing else, so a request met
#: again, e.g. by an MCMC move that re-runs a host step, is not scored again).
MEMO_ENTRIES = 4096

#: Logits one device call may hold (``rows x T x V x 4`` bytes); longer batches are scored in chunks.
CHUNK_BYTES = 128 << 20


class ScoreError(ValueError):
    """A request that cannot be scored (too long for the model, empty context without BOS)."""


class Encoded(NamedTuple):
    """A request's token ids (``[BOS] + context + text``) and ``n``: where its text starts."""

    ids: tuple[int, ...]
    n: int


def encode_request(tokenizer, context: str, text: str) -> Encoded:
    """The token sequence a request is scored on (see the module docstring for the boundary and BOS)."""
    ctx = [int(t) for t in tokenizer.encode(context, add_bos=False)] if context else []
    txt = [int(t) for t in tokenizer.encode(text, add_bos=False)] if text else []
    bos = tokenizer.bos_id
    if bos is not None and (getattr(tokenizer, "add_bos", False) or not ctx):
        ctx = [int(bos), *ctx]
    if txt and not ctx:
        raise ScoreError("the context is empty and the model has no BOS token to condition the text on")
    return Encoded(tuple(ctx + txt), len(ctx))


def _common_prefix(seqs: Sequence[tuple[int, ...]]) -> int:
    """The length of the longest common prefix of ``seqs``."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(lm, params, tokens):
    """The one-row cache of a shared prefix: ``tokens [1, Sp]`` written at positions ``0 .. Sp - 1`` (slots past
    the prefix's length hold padding that :class:`Prefix` never lets a row read)."""
    cache = lm.init_cache(1, tokens.shape[1])
    _, cache = lm.apply(params, cache, tokens, jnp.zeros((1,), jnp.int32))
    return cache


@functools.partial(jax.jit, static_argnums=(0,))
def _score_rows(lm, params, prefix_cache, s0, tokens, start, end):
    """``[B]`` sums of ``log softmax(logits[b, j])[tokens[b, j + 1]]`` over ``start[b] <= j < end[b]``.

    Row ``b`` holds a request's tokens after the shared prefix (absolute positions ``s0 ..``); ``prefix_cache``
    is the prefix's one-row cache, or None when there is none (``s0 == 0``). Logits at index ``j`` score the
    token at ``j + 1``, so ``start = n - s0 - 1`` and ``end = len(ids) - s0 - 1`` select the text tokens."""
    b, t = tokens.shape
    prefix = None if prefix_cache is None else Prefix(prefix_cache, s0)
    positions = jnp.full((b,), s0, jnp.int32)
    logits, _ = lm.apply(params, lm.init_cache(b, t), tokens, positions, prefix)
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T - 1, V]: logits[:, j] scores tokens[:, j + 1]
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    lp = target - jax.nn.logsumexp(logits, axis=-1)
    j = jnp.arange(t - 1)[None, :]
    keep = (j >= start[:, None]) & (j < end[:, None])
    return jnp.sum(jnp.where(keep, lp, 0.0), axis=1)  # where, not a product: lp may be -inf outside `keep`


class Scorer:
    """Scores ``(context, text)`` requests under one model (see the module docstring).

    Counters (read by tests and benchmarks): ``batches`` calls of :meth:`score` with work to do, ``forwards``
    device calls (prefix prefills and chunks of rows), ``rows`` distinct requests scored, ``prefix_tokens``
    tokens prefilled once for a batch instead of once per row. ``memo``: how many scores to remember across
    calls (least recently used dropped first; 0: none).
    """

    def __init__(self, lm, chunk_bytes: int = CHUNK_BYTES, memo: int = MEMO_ENTRIES):
        self.lm = lm
        self.chunk_bytes = int(chunk_bytes)
        self.memo_entries = int(memo)
        self.memo: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.batches = self.forwards = self.rows = self.prefix_tokens = 0

    def __repr__(self) -> str:
        return f"Scorer({getattr(self.lm, 'name', self.lm)!r}, batches={self.batches}, rows={self.rows})"

    def counters(self) -> dict:
        """The counters as a dict (a result's ``stats.scorer``)."""
        return {"batches": self.batches, "forwards": self.forwards, "rows": self.rows,
                "prefix_tokens": self.prefix_tokens}

    def encode(self, context: str, text: str) -> Encoded:
        enc = encode_request(self.lm.tokenizer, context, text)
        limit = getattr(self.lm, "max_context", None)
        if isinstance(limit, int) and len(enc.ids) > limit:
            raise ScoreError(f"the context and text are {len(enc.ids)} tokens; "
                             f"{getattr(self.lm, 'name', None) or 'the model'} reads at most {limit}")
        return enc

    def score(self, requests: Sequence[tuple[str, str]]) -> list[Union[float, ScoreError]]:
        """The score of every request, in order (a :class:`ScoreError` in the place of one that cannot be
        scored); distinct requests are scored once, all in one batch."""
        out: list = [None] * len(requests)
        rows: dict[tuple[str, str], list[int]] = {}
        encoded: dict[tuple[str, str], Encoded] = {}
        for k, req in enumerate(requests):
            req = (str(req[0]), str(req[1]))
            if req in self.memo:
                self.memo.move_to_end(req)
                out[k] = self.memo[req]
                continue
            if req not in encoded and req not in rows:
                try:
                    encoded[req] = self.encode(*req)
                except ScoreError as exc:
                    out[k] = exc
                    continue
            if req in encoded:
                if len(encoded[req].ids) == encoded[req].n:  # empty text: log 1
                    out[k] = 0.0
                else:
                    rows.setdefault(req, []).append(k)
        if rows:
            keys = list(rows)
            values = self._score_encoded([encoded[r] for r in keys])
            for r, v in zip(keys, values):
                for k in rows[r]:
                    out[k] = v
                if self.memo_entries > 0:
                    self.memo[r] = v
            while len(self.memo) > self.memo_entries:
                self.memo.popitem(last=False)
        return out

    def _score_encoded(self, reqs: list[Encoded]) -> list[float]:
        """Device scores of distinct non-empty requests: one shared prefix, rows in chunks."""
        self.batches += 1
        self.rows += len(reqs)
        lm = self.lm
        seqs = [r.ids for r in reqs]
        # the prefix ends before every request's first scored position (that position's logits are a row's)
        s0 = min(_common_prefix(seqs), min(r.n for r in reqs) - 1)
        prefix_cache = None
        if s0 > 0:
            sp = round_pow2(s0, 16)
            buf = np.zeros((1, sp), np.int32)
            buf[0, :s0] = seqs[0][:s0]
            prefix_cache = _prefill(lm, lm.params, jnp.asarray(buf))
            self.forwards += 1
            self.prefix_tokens += s0 * (len(reqs) - 1)
        else:
            s0 = 0
        own = [len(s) - s0 for s in seqs]
        t = round_pow2(max(own), 16)
        vocab = int(getattr(lm, "vocab_size", 1))
        per_chunk = max(1, self.chunk_bytes // max(1, t * vocab * 4))
        per_chunk = 1 << (per_chunk.bit_length() - 1)  # a power of two: the last chunk pads to a known shape
        scores: list[float] = []
        for c0 in range(0, len(reqs), per_chunk):
            chunk = range(c0, min(len(reqs), c0 + per_chunk))
            b = min(per_chunk, round_pow2(len(chunk), 1))
            tokens = np.zeros((b, t), np.int32)
            start = np.zeros((b,), np.int32)
            end = np.zeros((b,), np.int32)  # padding rows: start = end = 0, nothing summed
            for row, k in enumerate(chunk):
                tokens[row, :own[k]] = seqs[k][s0:]
                start[row] = reqs[k].n - s0 - 1
                end[row] = len(seqs[k]) - s0 - 1
            got = _score_rows(lm, lm.params, prefix_cache, jnp.int32(s0), jnp.asarray(tokens), jnp.asarray(start),
                              jnp.asarray(end))
            self.forwards += 1
            scores.extend(float(x) for x in np.asarray(got)[:len(chunk)])
        return scores


@functools.lru_cache(maxsize=8)
def scorer_for(lm) -> Scorer:
    """The one :class:`Scorer` of a loaded model (its counters and compilations are kept per process)."""
    return Scorer(lm)
