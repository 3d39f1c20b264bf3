"""From byte DFAs to token tables: walk every token of a vocabulary through a byte-level automaton.

Per tokenizer (computed once, kept in the tokenizer's cache) we hold the *usable* tokens — not special, at
least one byte — sorted by length with their bytes in a padded matrix, their byte trie, and the per-token
counter increments.

:func:`token_columns` is what the compiler uses: a token acts on the DFA's states as a function
``f_t: S -> S ∪ {dead}`` (its *transformation*), and two tokens behave alike in every state iff their
transformations are equal, so the token table's distinct columns are the distinct transformations. They are
computed over the trie: a child's transformation is its parent's followed by one byte,
``f_{n b} = delta_b ∘ f_n``, and prefixes with equal transformations are merged (hash-consed), so each
distinct (transformation, byte) pair is computed once, as one ``[S]`` gather, however many tokens and states
share it. A JSON schema's 2,700-state automaton has about 500 distinct transformations over the 100,000 trie
nodes of a 49k vocabulary: the cost is a few thousand ``[S]`` gathers instead of a walk of every state times
every token, and the ``[S, V]`` table is never built. :func:`classes_from_columns` then numbers the token
classes canonically (by first token), exactly as :func:`compress_columns` does for a dense table.
:func:`token_transitions` (the dense ``[S, V]`` table, a walk of (state, trie node) pairs) and
:func:`compress_columns` remain as the reference and for small tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from lmprog.compiler.bytedfa import gather_ranges
from lmprog.compiler.counters import word_tracker
from lmprog.compiler.regex_compile import MAX_TABLE_ENTRIES, RegexLimitError, limit_reason
from lmprog.paths import cache_dir, save_npz

_PAIR_BUDGET = 4_000_000  # (state, token) pairs processed at once
#: Most int32 entries of the transformation table (distinct transformations x states of a chunk) held at once
#: by :func:`token_columns` (64 MiB); past it the states are split into chunks.
TRANSFORM_BUDGET = 1 << 24


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
    """The :class:`VocabInfo` of a :class:`~lmprog.backends.tokenizer.Tokenizer`, cached in the tokenizer and on
    disk (``cache_dir()/vocab/``, keyed by the tokenizer's fingerprint and this module's source: building it for
    a 49k-token vocabulary takes 0.2-0.4 s, paid by every process otherwise)."""
    cache = getattr(tokenizer, "_cache", None)
    if cache is not None and "lmprog.compiler.vocab_info" in cache:
        return cache["lmprog.compiler.vocab_info"]
    path = _vocab_path(tokenizer.fingerprint)
    info = _load_vocab_info(path, tokenizer.fingerprint)
    if info is None:
        info = _build_vocab_info(tokenizer)
        _save_vocab_info(path, info)
    if cache is not None:
        cache["lmprog.compiler.vocab_info"] = info
    return info


def _vocab_path(fingerprint: str) -> Path:
    here = Path(__file__).resolve()
    source = b"".join((here.parent / f).read_bytes() for f in ("vocab_index.py", "counters.py"))
    return cache_dir() / "vocab" / f"{fingerprint}-{hashlib.sha256(source).hexdigest()[:16]}.npz"


_INT_FIELDS = ("size",)
_TUPLE_FIELDS = ("eos_ids",)


def _save_vocab_info(path: Path, info: VocabInfo) -> None:
    save_npz(path, {f.name: np.asarray(getattr(info, f.name)) for f in fields(VocabInfo) if f.name != "fingerprint"})


def _load_vocab_info(path: Path, fingerprint: str) -> VocabInfo | None:
    try:
        with np.load(path) as z:
            values = {f.name: z[f.name] for f in fields(VocabInfo) if f.name != "fingerprint"}
    except Exception:  # missing, damaged (a truncated zip) or from an older layout: build it
        return None
    for name in _INT_FIELDS:
        values[name] = int(values[name])
    for name in _TUPLE_FIELDS:
        values[name] = tuple(int(x) for x in values[name])
    return VocabInfo(**values, fingerprint=fingerprint)


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


class _OverBudget(Exception):
    """A chunk of states needs more transformation memory than :data:`TRANSFORM_BUDGET`."""


def _trie_levels(info: VocabInfo) -> list[int]:
    """Offsets of the trie's levels: the nodes of depth ``d`` are ``levels[d] .. levels[d + 1]`` (the trie is
    in breadth-first order with each node's children contiguous)."""
    children = info.trie_children
    levels = [0, 1]
    while levels[-1] > levels[-2]:
        levels.append(int(children[levels[-1]]))
    return levels[:-1]


def token_columns(delta: np.ndarray, info: VocabInfo, budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The distinct columns of the token table of the byte DFA ``delta`` (``[S, 256]``, ``-1`` dead), without
    building it: ``(col_of [V] int64, columns [S, K] int32)`` with ``token_transitions(delta, info)[:, v] ==
    columns[:, col_of[v]]`` for every token ``v``; the ``K`` columns are pairwise distinct (one may be all
    ``-1``: the tokens allowed nowhere, special tokens among them).

    Each distinct transformation of a trie prefix (``f_n[s]``: the state after the prefix from ``s``) is stored
    once, and a child's is computed from its parent's as one gather per distinct (transformation, byte) pair
    (see the module docs); a prefix dead from every state ends its subtree. Memory: distinct transformations
    times states, at most ``budget`` (:data:`TRANSFORM_BUDGET`) int32 entries, else the states are split into
    chunks whose columns are joined. Raises :class:`~lmprog.compiler.regex_compile.RegexLimitError` under the
    same condition as :func:`token_transitions` (``S x V`` over ``MAX_TABLE_ENTRIES``)."""
    n = int(delta.shape[0])
    if n * info.size > MAX_TABLE_ENTRIES:  # (the bound of the dense table this stands for)
        raise RegexLimitError("table", limit_reason("table"))
    if n == 0 or info.usable.size == 0:
        return np.zeros(info.size, np.int64), np.full((n, 1), -1, np.int32)
    # (one state has at most S + 1 transformations: with this much a chunk of one state always fits)
    budget = max(TRANSFORM_BUDGET if budget is None else int(budget), 2 * (n + 2) * 257)
    sink = n
    # Byte-major: by_byte[b * (S + 1) + s] = next state (sink S for dead), so one byte's gathers stay in one
    # (S + 1)-entry slice.
    by_byte = np.vstack([np.where(delta >= 0, delta, sink), np.full((1, 256), sink)]).astype(np.int32)
    by_byte = np.ascontiguousarray(by_byte.T).reshape(-1)
    levels = _trie_levels(info)
    end_node = np.repeat(np.arange(info.trie_parent.size), np.diff(info.node_token_ptr))  # per node_tokens entry
    chunk = n
    while True:
        try:
            parts = [_chunk_columns(by_byte, sink, s0, min(n, s0 + chunk), info, levels, end_node, budget)
                     for s0 in range(0, n, chunk)]
            break
        except _OverBudget:
            chunk = (chunk + 1) // 2  # (never below one state: see the budget)
    if len(parts) == 1:
        col, tm = parts[0]
        used, col_of = np.unique(col, return_inverse=True)
        return col_of.reshape(-1).astype(np.int64), np.ascontiguousarray(tm[used + 1].T)
    # Several chunks: a token's column is the tuple of its per-chunk transformations.
    label = np.zeros(info.size, np.int64)
    for col, tm in parts:
        _, label = np.unique(label * tm.shape[0] + (col + 1), return_inverse=True)
        label = label.reshape(-1)
    _, reps = np.unique(label, return_index=True)
    columns = np.concatenate([tm[col[reps] + 1].T for col, tm in parts], axis=0)
    return label.astype(np.int64), np.ascontiguousarray(columns)


def _chunk_columns(by_byte, sink, s0, s1, info, levels, end_node, budget) -> tuple[np.ndarray, np.ndarray]:
    """Transformations of the trie's prefixes restricted to the states ``s0 .. s1 - 1``: returns ``col [V]``
    (each token's transformation id, ``-1``: dead from every state of the chunk) and ``tm [1 + T, s1 - s0]``
    (row ``1 + i``: transformation ``i`` as next states, ``-1`` dead; row 0: all dead)."""
    c = s1 - s0
    cap = 64
    if cap * (c + 256) > budget:
        cap = max(2, budget // (c + 256))
    tm = np.empty((cap, c), np.int32)
    memo = np.full((cap, 256), -2, np.int32)  # memo[i, b]: transformation of (i then byte b); -1 dead, -2 unknown
    tm[0] = np.arange(s0, s1, dtype=np.int32)  # the root: identity
    index = {tm[0].tobytes(): 0}
    count = 1
    tid = np.full(info.trie_parent.size, -1, np.int32)
    tid[0] = 0
    parent, byte = info.trie_parent, info.trie_byte
    for d in range(1, len(levels) - 1):
        a, b = levels[d], levels[d + 1]
        p = tid[parent[a:b]]
        live = np.flatnonzero(p >= 0)
        if not live.size:
            break  # every deeper node descends from a dead one
        p, by = p[live], byte[a + live]
        nxt = memo[p, by]
        unknown = nxt == -2
        if unknown.any():
            keys = np.unique(p[unknown].astype(np.int64) * 256 + by[unknown])
            step = max(1, _PAIR_BUDGET // c)  # rows computed at once (bounds the temporaries)
            for k0 in range(0, keys.size, step):
                kp, kb = keys[k0 : k0 + step] // 256, keys[k0 : k0 + step] % 256
                rows = np.take(by_byte, tm[kp] + (kb * (sink + 1))[:, None])
                ids = np.full(kp.size, -1, np.int32)
                for j in np.flatnonzero((rows != sink).any(axis=1)).tolist():
                    row = rows[j]
                    key = row.tobytes()
                    i = index.get(key)
                    if i is None:
                        if count == cap:
                            cap *= 2
                            if cap * (c + 256) > budget:
                                raise _OverBudget
                            tm = np.concatenate([tm, np.empty_like(tm)])
                            memo = np.concatenate([memo, np.full_like(memo, -2)])
                        i = index[key] = count
                        tm[count] = row
                        count += 1
                    ids[j] = i
                memo[kp, kb] = ids
            nxt = memo[p, by]
        tid[a + live] = nxt
    col = np.full(info.size, -1, np.int64)
    col[info.node_tokens] = tid[end_node]
    out = np.empty((count + 1, c), np.int32)
    out[0] = -1
    block = tm[:count]
    out[1:] = np.where(block == sink, -1, block)
    return col, out


def with_end_tokens(col_of: np.ndarray, columns: np.ndarray, rows: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """Add an absorbing state ``S`` (no token allowed in it) reached by each token of ``ids`` from the states
    ``rows``: on the table ``columns[:, col_of]`` this is ``vstack([table, -1])`` then ``table[rows, e] = S`` for
    ``e`` in ``ids``. Returns the new ``(col_of, columns)``, columns still pairwise distinct."""
    s, k = columns.shape
    columns = np.vstack([columns, np.full((1, k), -1, np.int32)])
    col_of = np.array(col_of, np.int64, copy=True)
    rows = np.asarray(rows, np.int64)
    if not rows.size:
        return col_of, columns
    made: dict[bytes, int] = {}  # a modified column -> its index (they hold S, so none equals an old column)
    extra = []
    for e in dict.fromkeys(int(e) for e in ids):
        column = columns[:, col_of[e]].copy()
        column[rows] = s
        j = made.setdefault(column.tobytes(), k + len(extra))
        if j == k + len(extra):
            extra.append(column)
        col_of[e] = j
    return col_of, np.ascontiguousarray(np.hstack([columns, np.stack(extra, axis=1)]))


def classes_from_columns(col_of: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token classes of the table ``columns[:, col_of]`` (columns pairwise distinct), numbered as
    :func:`compress_columns` numbers them (by first token): ``(token_class [V] int32, class_table [S, C]
    int32)``, equal to ``compress_columns(columns[:, col_of])``."""
    col_of = np.asarray(col_of)
    if columns.shape[0] == 0:
        return np.zeros(col_of.size, np.int32), np.zeros((0, min(1, col_of.size)), np.int32)
    _, first, inverse = np.unique(col_of, return_index=True, return_inverse=True)
    token_class, reps = _renumber(first, inverse.reshape(-1))
    return token_class, np.ascontiguousarray(columns[:, col_of[reps]]).astype(np.int32)


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
