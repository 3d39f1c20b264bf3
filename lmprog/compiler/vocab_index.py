"""From byte DFAs to token tables: walk every token of a vocabulary through a byte-level automaton.

Per tokenizer (computed once, kept in the tokenizer's cache) we hold the *usable* tokens — not special, at
least one byte — sorted by length with their bytes in a padded matrix, and the per-token counter increments.
:func:`token_transitions` then gives, for every DFA state and token, the state after the token's bytes
(``-1`` when some byte is dead), processing (state, token) pairs byte by byte and dropping a pair as soon as it
dies, so a restrictive automaton costs little more than one pass over the first bytes.
:func:`compress_columns` groups tokens that behave identically in every state (token classes), which is how a
table is stored on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmprog.compiler.bytedfa import gather_ranges
from lmprog.compiler.counters import word_tracker
from lmprog.compiler.regex_compile import MAX_TABLE_ENTRIES, RegexLimitError, limit_reason

_PAIR_BUDGET = 4_000_000  # (state, token) pairs processed at once


@dataclass(frozen=True, eq=False)
class VocabInfo:
    """Token tables of one tokenizer used by the constraint compiler.

    Attributes:
        size: vocabulary size ``V``.
        usable: ids of the tokens a hole may generate as text (not special, non-empty), longest first.
        lengths: their byte lengths.
        matrix: ``[len(usable), max_len] uint8`` their bytes (zero padded).
        eos_ids: end-of-sequence ids (a hole ending at EOS).
        inc_chars: ``[V] int32`` characters per token (0 for special tokens).
        inc_words: ``[T, V] int8`` word starts per token from each word-tracker state.
        words_id: ``[V] int32`` tokens with equal ``inc_words`` columns share an id.
        trie_parent / trie_byte: ``[N]`` the byte trie of the usable tokens (node 0 is the root; nodes in
            breadth-first order, children of a node contiguous: ``trie_children[i] .. trie_children[i+1]``).
        node_tokens / node_token_ptr: usable-token ids ending at each node (CSR).
    """

    size: int
    usable: np.ndarray
    lengths: np.ndarray
    matrix: np.ndarray
    eos_ids: tuple[int, ...]
    inc_chars: np.ndarray
    inc_words: np.ndarray
    words_id: np.ndarray
    trie_parent: np.ndarray
    trie_byte: np.ndarray
    trie_children: np.ndarray
    node_tokens: np.ndarray
    node_token_ptr: np.ndarray
    fingerprint: str


def vocab_info(tokenizer) -> VocabInfo:
    """The (cached) :class:`VocabInfo` of a :class:`~lmprog.backends.tokenizer.Tokenizer`."""
    cache = getattr(tokenizer, "_cache", None)
    if cache is not None and "lmprog.compiler.vocab_info" in cache:
        return cache["lmprog.compiler.vocab_info"]
    info = _build_vocab_info(tokenizer)
    if cache is not None:
        cache["lmprog.compiler.vocab_info"] = info
    return info


def _build_vocab_info(tokenizer) -> VocabInfo:
    table = tokenizer.token_bytes
    special = set(tokenizer.special_ids) | set(tokenizer.eos_ids)
    size = len(table)
    ids = np.array([i for i in range(size) if i not in special and len(table[i]) > 0], np.int64)
    lengths = np.array([len(table[i]) for i in ids], np.int64)
    order = np.argsort(-lengths, kind="stable")
    ids, lengths = ids[order], lengths[order]
    width = int(lengths.max()) if ids.size else 1
    flat = np.frombuffer(b"".join(table[i] for i in ids), np.uint8)
    matrix = np.zeros((ids.size, width), np.uint8)
    rows = np.repeat(np.arange(ids.size), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = flat
    valid = np.arange(width)[None, :] < lengths[:, None]
    counts = (lengths[None, :] > np.arange(width)[:, None]).sum(axis=1)  # tokens longer than j (a prefix)

    inc_chars = np.zeros(size, np.int32)
    inc_chars[ids] = (valid & ((matrix < 0x80) | (matrix >= 0xC0))).sum(axis=1)

    tracker = word_tracker()
    t = tracker.num_states
    state = np.repeat(np.arange(t)[:, None], ids.size, axis=1)
    words = np.zeros((t, ids.size), np.int32)
    for j in range(width):
        k = int(counts[j])
        b = matrix[:k, j][None, :]
        words[:, :k] += tracker.emit[state[:, :k], b]
        state[:, :k] = tracker.delta[state[:, :k], b]
    inc_words = np.zeros((t, size), np.int8)
    inc_words[:, ids] = words
    columns = np.ascontiguousarray(inc_words.T).view(np.dtype((np.void, t))).reshape(-1)
    _, words_id = np.unique(columns, return_inverse=True)

    # Byte trie of the usable tokens, level by level.
    parents, bytes_, node_of = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], np.zeros(ids.size, np.int64)
    end_node = np.zeros(ids.size, np.int64)
    next_id = 1
    for d in range(width):
        k = int(counts[d])
        key = node_of[:k] * 256 + matrix[:k, d]
        uniq, inv = np.unique(key, return_inverse=True)
        node_of[:k] = next_id + inv.reshape(-1)
        parents.append(uniq // 256)
        bytes_.append(uniq % 256)
        next_id += uniq.size
        ends = lengths[:k] == d + 1
        end_node[:k][ends] = node_of[:k][ends]
    parent = np.concatenate(parents)
    parent[0] = -1
    byte = np.concatenate(bytes_)
    n_nodes = parent.size
    children = np.zeros(n_nodes + 1, np.int64)
    np.add.at(children, parent[1:] + 1, 1)
    children = np.cumsum(children)
    children = children + 1  # children of node i start after the root (node 0 has no parent)
    children[0] = 1
    tok_order = np.argsort(end_node, kind="stable")
    node_tokens = ids[tok_order]
    node_token_ptr = np.searchsorted(end_node[tok_order], np.arange(n_nodes + 1))
    return VocabInfo(
        size, ids, lengths, matrix, tuple(tokenizer.eos_ids), inc_chars, inc_words, words_id.reshape(-1).astype(np.int32),
        parent, byte.astype(np.int64), children, node_tokens, node_token_ptr, tokenizer.fingerprint,
    )


def token_transitions(delta: np.ndarray, info: VocabInfo) -> np.ndarray:
    """``[S, V] int32``: the state after each usable token from each state of the byte DFA ``delta``
    (``[S, 256]``, ``-1`` dead); ``-1`` for dead paths and for every unusable (special/empty) token.

    Walks the token trie breadth first with (node, state) pairs, dropping a pair as soon as its state dies,
    so shared prefixes are walked once and a restrictive automaton stops after the first byte or two. Raises
    :class:`~lmprog.compiler.regex_compile.RegexLimitError` when ``S x V`` is over ``MAX_TABLE_ENTRIES``."""
    n = delta.shape[0]
    if n * info.size > MAX_TABLE_ENTRIES:  # checked before allocating the [S, V] table, not after
        raise RegexLimitError("table", limit_reason("table"))
    sink = n
    full = np.vstack([np.where(delta >= 0, delta, sink), np.full((1, 256), sink)]).astype(np.int64).reshape(-1)
    out = np.full((n, info.size), -1, np.int32)
    if info.usable.size == 0 or n == 0:
        return out
    children, byte = info.trie_children, info.trie_byte
    first = np.arange(children[0], children[1])
    chunk = max(1, _PAIR_BUDGET // max(1, first.size * 8))
    for s0 in range(0, n, chunk):
        states = np.arange(s0, min(n, s0 + chunk), dtype=np.int64)
        node = np.repeat(first, states.size)
        st = np.tile(states, first.size)
        cur = full[st * 256 + byte[node]]
        while node.size:
            live = cur != sink
            node, st, cur = node[live], st[live], cur[live]
            if not node.size:
                break
            ntok = info.node_token_ptr[node + 1] - info.node_token_ptr[node]
            ends = ntok > 0
            if ends.any():
                idx = gather_ranges(info.node_token_ptr, node[ends])
                out[np.repeat(st[ends], ntok[ends]), info.node_tokens[idx]] = np.repeat(cur[ends], ntok[ends])
            nchild = children[node + 1] - children[node]
            has = nchild > 0
            node, st, cur, nchild = node[has], st[has], cur[has], nchild[has]
            child = gather_ranges(children, node)
            st = np.repeat(st, nchild)
            cur = full[np.repeat(cur, nchild) * 256 + byte[child]]
            node = child
    return out


def compress_columns(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token classes: ``table [S, V]`` -> ``(token_class [V] int32, class_table [S, C] int32)`` with
    ``table[s, v] == class_table[s, token_class[v]]``. Classes are numbered by first occurrence."""
    s, v = table.shape
    if s == 0:
        return np.zeros(v, np.int32), table[:, :1]
    h = np.zeros(v, np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for row in table:
            h = h * mult + (row + 2).astype(np.uint64)
            h ^= h >> np.uint64(29)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    token_class, reps = _renumber(first, inverse.reshape(-1))
    class_table = np.ascontiguousarray(table[:, reps])
    if not all(np.array_equal(class_table[i:i + 64][:, token_class], table[i:i + 64]) for i in range(0, s, 64)):
        _, first, inverse = np.unique(table.T, axis=0, return_index=True, return_inverse=True)  # hash collision
        token_class, reps = _renumber(first, inverse.reshape(-1))
        class_table = np.ascontiguousarray(table[:, reps])
    return token_class, class_table.astype(np.int32)


def _renumber(first: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes renumbered by first occurrence (a canonical layout); returns the map and representatives."""
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int32), first[order]
