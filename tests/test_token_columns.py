"""The fast token-table construction equals the straightforward one, bit for bit.

* :func:`vocab_index.token_columns` (distinct transformations over the token trie) against a brute-force
  walk of every token's bytes from every state, and against the dense (state, trie node) walk
  :func:`vocab_index.token_transitions`, with and without state chunking (a small memory budget); the token
  classes (:func:`classes_from_columns`) and the EOS row (:func:`with_end_tokens`) against
  :func:`compress_columns` of the dense table;
* :func:`bytedfa.distinct_columns` against ``np.unique``, the level-wise :func:`bytedfa._bfs_order` against a
  FIFO queue;
* :func:`constraints.build_hole_dfa` for text terminators against the per-state construction it replaced
  (:func:`_reference_text_hole`, kept here);
* whole holes: :func:`compile_hole`'s automaton against the dense pipeline (``token_transitions``, the EOS
  row, ``compress_columns``) on small and real vocabularies, JSON schemas included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmprog.automata.kmp import kmp_table
from lmprog.backends.tokenizer import byte_tokenizer
from lmprog.compiler import bytedfa as B
from lmprog.compiler import constraints as K
from lmprog.automata.counters import CHARS, WORDS
from lmprog.compiler import counters as C
from lmprog.compiler.constraint_ir import (
    Choices,
    Contains,
    Count,
    JsonSchema,
    Not,
    Regex,
    StopAt,
)
from lmprog.compiler.regex_compile import MAX_HOLE_STATES, RegexLimitError, limit_reason
from lmprog.compiler.vocab_index import (
    classes_from_columns,
    compress_columns,
    token_columns,
    token_transitions,
    vocab_info,
    with_end_tokens,
)

MERGES = [("a", "b"), ("b", "Ċ"), ("1", "."), ("Ġ", "a"), ("Ã", "©"), ("a", "Ċ"), ("Ċ", "Ċ"), ("e", "Ġ"),
          ("ab", "a"), (".", "5"), ("aba", "b"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ")]


@pytest.fixture(scope="module")
def small_info():
    return vocab_info(byte_tokenizer(MERGES, specials=("<|endoftext|>", "<|x|>")))


def brute_force_table(delta: np.ndarray, tokenizer) -> np.ndarray:
    """``[S, V]``: every token's bytes walked from every state (``-1``: a dead byte, special or empty tokens)."""
    info = vocab_info(tokenizer)
    usable = set(info.usable.tolist())
    out = np.full((delta.shape[0], info.size), -1, np.int32)
    for v in usable:
        data = tokenizer.token_bytes[v]
        for s in range(delta.shape[0]):
            q = s
            for b in data:
                q = int(delta[q, b])
                if q < 0:
                    break
            out[s, v] = q
    return out


def random_dfa(rng, n: int, alphabet: bytes, density: float) -> np.ndarray:
    delta = np.full((n, 256), -1, np.int32)
    for s in range(n):
        for b in alphabet:
            if rng.random() < density:
                delta[s, b] = rng.integers(0, n)
    return delta


def check_columns(delta, info, reference):
    col_of, columns = token_columns(delta, info)
    assert columns.dtype == np.int32 and col_of.shape == (info.size,)
    assert np.array_equal(columns[:, col_of], reference)
    assert len({c.tobytes() for c in columns.T}) == columns.shape[1]  # pairwise distinct
    cls, ct = classes_from_columns(col_of, columns)
    rcls, rct = compress_columns(reference)
    assert np.array_equal(cls, rcls) and cls.dtype == rcls.dtype
    assert np.array_equal(ct, rct) and ct.dtype == rct.dtype
    return col_of, columns


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 12), st.floats(0.2, 1.0), st.integers(0, 2**31 - 1))
def test_token_columns_equal_brute_force_on_random_dfas(small_info, n, density, seed):
    tok = byte_tokenizer(MERGES, specials=("<|endoftext|>", "<|x|>"))
    rng = np.random.default_rng(seed)
    delta = random_dfa(rng, n, b"ab1.5e\n \xc3\xa9", density)
    reference = brute_force_table(delta, tok)
    assert np.array_equal(token_transitions(delta, small_info), reference)
    check_columns(delta, small_info, reference)
    for budget in (0, 2000):  # the floor of the budget: chunks of a few states
        col_of, columns = token_columns(delta, small_info, budget=budget)
        assert np.array_equal(columns[:, col_of], reference)
        assert len({c.tobytes() for c in columns.T}) == columns.shape[1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.lists(st.integers(0, 1), min_size=1, max_size=3))
def test_end_tokens_equal_the_dense_row(small_info, n, seed, which):
    """``with_end_tokens`` is the EOS row of the dense table (``vstack`` then ``table[rows, e] = S``), for
    special tokens and for ordinary ones (an end-of-turn id that is a text token)."""
    rng = np.random.default_rng(seed)
    delta = random_dfa(rng, n, b"ab1.\n", 0.6)
    table = token_transitions(delta, small_info)
    rows = np.flatnonzero(rng.random(n) < 0.5)
    special = [small_info.size - 2, small_info.size - 1]
    ids = [special[w] for w in which] + [int(x) for x in rng.integers(0, small_info.size - 2, size=2)]
    dense = np.vstack([table, np.full((1, small_info.size), -1, np.int32)])
    for e in ids:
        dense[rows, e] = n
    col_of, columns = token_columns(delta, small_info)
    col_of, columns = with_end_tokens(col_of, columns, rows, ids)
    assert np.array_equal(columns[:, col_of], dense)
    used = np.unique(col_of)
    assert len({columns[:, c].tobytes() for c in used}) == used.size
    cls, ct = classes_from_columns(col_of, columns)
    rcls, rct = compress_columns(dense)
    assert np.array_equal(cls, rcls) and np.array_equal(ct, rct)


# ------------------------------------------------------------------------------------ byte DFA helpers


def _fifo_bfs(delta: np.ndarray, start: int) -> np.ndarray:
    order, seen, i = [start], {start}, 0
    while i < len(order):
        for t in delta[order[i]].tolist():
            if t >= 0 and t not in seen:
                seen.add(t)
                order.append(t)
        i += 1
    return np.array(order, np.int64)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_distinct_columns_and_bfs_order(n, k, seed):
    rng = np.random.default_rng(seed)
    table = rng.integers(-1, 3, size=(n, k)).astype(np.int32)
    table[:, rng.integers(0, k, size=k // 2)] = table[:, :1]
    assert np.array_equal(B.distinct_columns(table), np.sort(np.unique(table, axis=1, return_index=True)[1]))
    delta = rng.integers(-1, n, size=(n, 6)).astype(np.int32)
    start = int(rng.integers(0, n))
    assert np.array_equal(B._bfs_order(delta, start), _fifo_bfs(delta, start))


# ------------------------------------------------------------------------ the hole DFA (text terminators)


def _reference_text_hole(content: B.ByteDFA, term: K.Terminator, track_chars: bool, track_words: bool):
    """The per-state construction of a text terminator's hole DFA that ``build_hole_dfa`` replaced."""
    cdfa, trk = K._with_tracker(content, track_words)
    wt = C.word_tracker()
    n = cdfa.num_states
    t = term.text.encode("utf-8")
    m = len(t)
    kmp = kmp_table(t)
    delta = cdfa.delta
    pref = np.full((n, m + 1), -1, np.int64)
    pref[:, 0] = np.arange(n)
    for j in range(m):
        prev = pref[:, j]
        pref[:, j + 1] = np.where(prev >= 0, delta[np.maximum(prev, 0), t[j]], -1)
    trk_after = np.zeros((wt.num_states, m + 1), np.int64)
    trk_words = np.zeros((wt.num_states, m + 1), np.int64)
    for s0 in range(wt.num_states):
        s, w = s0, 0
        trk_after[s0, 0] = s0
        for j in range(m):
            w += int(wt.emit[s, t[j]])
            s = int(wt.delta[s, t[j]])
            trk_after[s0, j + 1], trk_words[s0, j + 1] = s, w
    chars = np.array([C.char_count(t[:k]) for k in range(m + 1)], np.int64)

    def label(c, k):
        tr = int(trk[c])
        if term.keep:
            return (k, 0, 0, int(trk_after[tr, k]))
        return (k, int(chars[k]), int(trk_words[tr, k]), int(trk_after[tr, k]))

    ids, keys, rows, labs, finals = {}, [], [], [], []

    def state_id(key, lab, is_final):
        j = ids.get(key)
        if j is None:
            if len(keys) >= MAX_HOLE_STATES:
                raise RegexLimitError("hole", limit_reason("hole"))
            j = ids[key] = len(keys)
            keys.append(key)
            labs.append(lab)
            finals.append(is_final)
        return j

    state_id(("s", 0, 0), label(0, 0), False)
    i = 0
    while i < len(keys):
        key = keys[i]
        row = np.full(256, -1, np.int64)
        if key[0] == "s":
            _, c, k = key
            k2 = kmp[k].astype(np.int64)
            nxt_c = np.where(k2 >= 1, pref[c, np.clip(k + 1 - k2, 0, m)], -1)
            base = pref[c, k]
            if base >= 0:
                zero = k2 == 0
                nxt_c[zero] = delta[base][zero]
            done = k2 == m
            for b in np.flatnonzero(done):
                end = pref[c, m] if term.keep else c
                if end >= 0 and cdfa.accept[end]:
                    lab = label(c, m)
                    row[b] = state_id(("f",) + lab, lab, True)
            live = ~done & (nxt_c >= 0)
            for b in np.flatnonzero(live):
                c2, kk = int(nxt_c[b]), int(k2[b])
                row[b] = state_id(("s", c2, kk), label(c2, kk), False)
        rows.append(row)
        i += 1
    dfa = B.ByteDFA(np.stack(rows).astype(np.int32), np.array(finals, bool))
    final = np.array(finals, bool)
    return K._minimize_hole(dfa, final, np.zeros_like(final), np.array(labs, np.int64), track_chars, track_words)


HOLE_CASES = [
    (r"[a-z ]+\.?", K.Terminator("text", " the end", True), False, False),
    (r"[^\n]{0,12}", K.Terminator("text", "\n\n", False), True, True),
    (r"(ab|a)*b?", K.Terminator("text", "aab", False), True, False),
    (r"(ab|a)*b?", K.Terminator("text", "aba", True), False, True),
    (r"[a-z]+( [a-z]+)*", K.Terminator("text", " is ", False), True, True),
    (r"(?s:.)*", K.Terminator("text", "\n", False), False, False),
    (r"[éa]{0,3}x", K.Terminator("text", "é", False), True, False),
    (r"abc", K.Terminator("text", "abcabd", False), False, False),
]


@pytest.mark.parametrize("pattern, term, track_chars, track_words", HOLE_CASES)
def test_text_hole_dfa_equals_reference(pattern, term, track_chars, track_words):
    content = B.regex_dfa(pattern)
    new = K.build_hole_dfa(content, term, track_chars, track_words)
    old = _reference_text_hole(content, term, track_chars, track_words)
    for a, b in ((new.dfa.delta, old.dfa.delta), (new.dfa.accept, old.dfa.accept), (new.final, old.final),
                 (new.eos_ok, old.eos_ok), (new.labels, old.labels)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# ------------------------------------------------------------------------------------------ whole holes


def _dense_pipeline(hole: K.HoleDFA, term: K.Terminator, info):
    """The table steps ``compile_hole`` used to take: the dense table, the EOS row, token classes."""
    table = token_transitions(hole.dfa.delta, info)
    if term.kind == "eos":
        s = table.shape[0]
        table = np.vstack([table, np.full((1, info.size), -1, np.int32)])
        rows = np.flatnonzero(hole.eos_ok)
        for e in term.ids or info.eos_ids:
            table[rows, e] = s
    return compress_columns(table)


def _fast_pipeline(hole: K.HoleDFA, term: K.Terminator, info):
    col_of, columns = token_columns(hole.dfa.delta, info)
    if term.kind == "eos":
        col_of, columns = with_end_tokens(col_of, columns, np.flatnonzero(hole.eos_ok), term.ids or info.eos_ids)
    return classes_from_columns(col_of, columns)


SMALL_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1, "maximum": 2},
                                                 "b": {"enum": ["a", "b"]}, "c": {"type": "string", "maxLength": 5}},
                "required": ["a"]}

HOLES = {
    "regex-newline": ([Regex(r"[ab1.]+")], "\n", ()),
    "regex-eos": ([Regex(r"(ab|a)*\.?")], None, ()),
    "end-turn": ([Regex(r"[a-e ]*")], None, (97,)),  # an ordinary token as the end of the turn
    "choices": ([Choices(["ab", "a", "b\n", "é", "a b"])], " ", ()),
    "not-contains": ([Not(Contains("e"))], ".", ()),
    "stop": ([StopAt("ab.", keep=True)], None, ()),
    "counters": ([Count("len", "<=", 6), Count("words", ">=", 1)], "\n", ()),
    "schema": ([JsonSchema("s.json", json.dumps(SMALL_SCHEMA))], "\n", ()),
    "json": ([JsonSchema("", "")], None, ()),
}


@pytest.mark.parametrize("name", list(HOLES))
def test_compiled_tables_equal_dense_pipeline_small_vocabulary(name):
    tok = byte_tokenizer(MERGES, specials=("<|endoftext|>", "<|x|>"))
    _check_hole(name, HOLES[name], tok)


def _check_hole(name, case, tok):
    cs, following, end = case
    info = vocab_info(tok)
    plan = K.plan_hole(cs, following, None, end)
    content = K.language_dfa(K.And(plan.language)) if plan.language else B.ByteDFA.any_utf8()
    hole = K.build_hole_dfa(content, plan.terminator, plan.bounds.active(CHARS), plan.bounds.active(WORDS))
    fast = _fast_pipeline(hole, plan.terminator, info)
    slow = _dense_pipeline(hole, plan.terminator, info)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    compiled = K.compile_hole(cs, tok, following_text=following, cache=False, end_tokens=end)
    assert compiled.automaton.vocab_size == info.size


REAL = {
    "capital": ([Regex(r"[A-Z][a-z]+( [A-Z][a-z]+)*"), Count("tokens", "<=", 8)], "\n", ()),
    "lipogram": ([Count("tokens", "==", 32), Not(Contains("e")), Not(Contains("E")),
                  Regex(r"[A-Za-z0-9 ,.;:!?'\"\n-]*")], None, ()),
    "iso-date": ([Regex(r"(1[0-9]|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])")], "\n", ()),
    "bounded-string": ([Regex(r"[^\"\\]{0,40}")], "\"", ()),
    "stop-before": ([Regex(r"[^\n]{0,30}"), StopAt("\n\n", keep=False)], None, ()),
    "schema": ([JsonSchema("s.json", json.dumps(SMALL_SCHEMA))], None, ()),
}


@pytest.mark.parametrize("name", list(REAL))
def test_compiled_tables_equal_dense_pipeline_real_vocabulary(default_tokenizer, name):
    _check_hole(name, REAL[name], default_tokenizer)
