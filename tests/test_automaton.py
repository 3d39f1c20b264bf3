"""The device token table: masks and steps gathered inside ``jit`` equal the host-side reference, for dense
legacy automata and for compiled holes (token classes, counters), several holes sharing one kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmprog.automata import HoleConstraints, TokenTable
from lmprog.backends.tokenizer import byte_tokenizer
from lmprog.compiler.automaton import Automaton, stack_automata, stack_holes
from lmprog.compiler.constraint_ir import Choices, Contains, Count, IsFloat, Not, Or, Regex, StopAt
from lmprog.compiler.constraints import compile_hole
from lmprog.compiler.vocab_index import compress_columns


@jax.jit
def _mask(table: TokenTable, states, counts):
    return table.mask(states, counts)


@jax.jit
def _mask_budget(table: TokenTable, states, counts, budget):
    return table.mask(states, counts, budget)


@jax.jit
def _step(table: TokenTable, states, counts, tokens):
    states2, counts2 = table.step(states, counts, tokens)
    return states2, counts2, table.done(states2, counts2), table.allowed(states), table.is_final(states2)


def test_dense_automata_keep_their_meaning():
    rng = np.random.default_rng(0)
    autos = []
    for s in (3, 5, 1):
        nxt = rng.integers(-1, s, size=(s, 7)).astype(np.int32)
        autos.append(Automaton(nxt, rng.random(s) < 0.5))
    table, offsets = stack_automata(autos)
    assert offsets == [0, 3, 8]
    dense = table.dense()
    for a, off in zip(autos, offsets):
        want = np.where(a.next_state >= 0, a.next_state + off, -1)
        assert np.array_equal(dense[off:off + a.num_states], want)
    states = jnp.arange(table.num_states, dtype=jnp.int32)
    allowed = jax.jit(lambda t, s: t.allowed(s))(table, states)
    assert np.array_equal(np.asarray(allowed), dense >= 0)
    tokens = jnp.asarray(rng.integers(0, 7, size=table.num_states), jnp.int32)
    adv = jax.jit(lambda t, s, x: t.advance(s, x))(table, states, tokens)
    assert np.array_equal(np.asarray(adv), dense[np.arange(table.num_states), np.asarray(tokens)])
    final = np.concatenate([a.final for a in autos])
    assert np.array_equal(np.asarray(table.is_final(states)), final)
    # no counters: mask == allowed
    assert np.array_equal(np.asarray(_mask(table, states, table.init_counts(table.num_states))), dense >= 0)
    # a dead state (-1) allows nothing and stays dead
    assert not np.asarray(table.allowed(jnp.array([-1]))).any()
    assert int(table.advance(jnp.array([-1]), jnp.array([0]))[0]) == -1


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_token_classes_roundtrip(s, v, seed):
    rng = np.random.default_rng(seed)
    table = rng.integers(-1, 3, size=(s, v)).astype(np.int32)
    table[:, rng.integers(0, v, size=v // 2)] = table[:, :1]  # repeated columns
    cls, ct = compress_columns(table)
    assert np.array_equal(ct[:, cls], table)
    assert ct.shape[1] == len({tuple(c) for c in table.T})
    a = Automaton(ct, np.zeros(s, bool), 0, cls)
    assert np.array_equal(a.dense(), table)
    for state in range(s):
        assert np.array_equal(a.allowed_tokens(state), table[state] >= 0)


@pytest.fixture(scope="module")
def setting():
    tok = byte_tokenizer([("a", "b"), ("b", "Ċ"), ("1", "."), ("Ġ", "a"), ("e", "Ġ")])
    holes = [
        compile_hole([Choices(["ab", "a b", "b"])], tok, following_text="\n", cache=False),
        compile_hole([Regex(r"[ab ]+"), Count("len", "<=", 4)], tok, following_text=".", cache=False),
        compile_hole([Count("tokens", "==", 3), Regex(r"[ab1.]*")], tok, cache=False),
        compile_hole([Count("words", ">=", 2), Count("words", "<=", 3)], tok, following_text="\n", cache=False),
        compile_hole([IsFloat(), Not(Contains("5"))], tok, cache=False),
        compile_hole([StopAt(".", keep=False), Count("len", ">=", 2)], tok, cache=False),
        compile_hole([Or((Count("tokens", "<", 2), Count("tokens", ">", 3))), Regex(r"[ab ]*")], tok,
                     following_text="\n", cache=False),
        compile_hole([Or((Count("len", "==", 1), Count("len", "==", 4)))], tok, following_text=".", cache=False),
    ]
    table, offsets = stack_holes(holes)
    return tok, holes, table, offsets


def _random_walk(hole, rng, length):
    ids = []
    for _ in range(length):
        allowed = np.flatnonzero(hole.allowed_tokens(ids))
        if allowed.size == 0:
            break
        ids.append(int(rng.choice(allowed)))
    return ids


def test_jit_masks_equal_host_reference(setting):
    tok, holes, table, offsets = setting
    rng = np.random.default_rng(1)
    # one batch mixing every hole, walked in lock step through random allowed tokens
    walks = [_random_walk(h, rng, 8) for h in holes for _ in range(4)]
    owners = [i for i in range(len(holes)) for _ in range(4)]
    steps = max(len(w) for w in walks)
    states = jnp.array([offsets[i] + holes[i].automaton.start for i in owners], jnp.int32)
    counts = table.init_counts(len(walks))
    for t in range(steps + 1):
        mask = np.asarray(_mask(table, states, counts))
        budget = np.asarray(_mask_budget(table, states, counts, jnp.int32(t + 2)))
        per_row = np.asarray(_mask_budget(table, states, counts, jnp.full(len(walks), t + 2, jnp.int32)))
        assert np.array_equal(per_row, budget)
        for r, (i, w) in enumerate(zip(owners, walks)):
            if t <= len(w):
                assert np.array_equal(mask[r], holes[i].allowed_tokens(w[:t])), (i, w[:t])
                assert np.array_equal(budget[r], holes[i].allowed_tokens(w[:t], max_tokens=t + 2)), (i, w[:t])
        if t == steps:
            break
        tokens = jnp.array([w[t] if t < len(w) else 0 for w in walks], jnp.int32)
        new_states, new_counts, done, allowed, final = _step(table, states, counts, tokens)
        for r, (i, w) in enumerate(zip(owners, walks)):
            if t < len(w):
                s_host, raw = holes[i].run(w[: t + 1])
                assert int(new_states[r]) == offsets[i] + s_host
                assert np.array_equal(np.asarray(new_counts[r]), raw)
                assert bool(done[r]) == holes[i].complete(w[: t + 1])
        live = np.array([t < len(w) for w in walks])
        states = jnp.where(jnp.asarray(live), new_states, states)
        counts = jnp.where(jnp.asarray(live)[:, None], new_counts, counts)


def test_one_kernel_for_every_hole(setting):
    tok, holes, table, offsets = setting
    traces = []

    @jax.jit
    def kernel(table, states, counts):
        traces.append(1)
        return table.mask(states, counts)

    for i, h in enumerate(holes):
        kernel(table, jnp.array([offsets[i] + h.automaton.start] * 3, jnp.int32), table.init_counts(3))
    assert len(traces) == 1  # switching hole is a different integer, not a recompilation


def test_table_implements_the_kernel_protocol(setting):
    """The accessors the engine uses instead of the table's fields: static inside ``jit`` too."""
    tok, holes, table, offsets = setting
    assert isinstance(table, HoleConstraints)
    assert table.vocab_size == tok.vocab_size == table.token_class.shape[1]
    assert table.num_states == sum(h.num_states for h in holes)
    assert table.max_pending() == int(np.asarray(table.pending).max()) == 1  # one-byte following texts
    assert stack_automata([Automaton(np.zeros((1, 3), np.int32), np.ones(1, bool))])[0].max_pending() == 0
    seen = []

    @jax.jit
    def widths(table, states):
        seen.append((table.vocab_size, table.num_states))
        return table.mask(states, table.init_counts(states.shape[0]))

    assert widths(table, jnp.array([offsets[0]], jnp.int32)).shape == (1, table.vocab_size)
    assert seen == [(table.vocab_size, table.num_states)]


def test_value_counts_exclude_pending_terminator(setting):
    tok, holes, table, offsets = setting
    hole = holes[1]  # [ab ]+ then "."; len <= 4
    ids = tok.encode("ab a.")
    s, raw = hole.run(ids)
    assert raw[1] == 5 and (raw - hole.counters.pend[s])[1] == 4
    st_ = jnp.array([offsets[1] + s])
    vc = table.value_counts(st_, jnp.asarray(raw[None, :], jnp.int32))
    assert int(vc[0, 1]) == 4


def test_memory_is_reported(setting):
    """Each hole's ``nbytes`` is exactly what it adds to the device table; the rest is shared once."""
    from lmprog.compiler.counters import word_tracker

    tok, holes, table, offsets = setting
    v, t = tok.vocab_size, word_tracker().num_states
    cmax = max(h.automaton.num_classes for h in holes)
    width = max(h.counters.lo.shape[1] for h in holes)  # interval slots per counter (lo/hi)
    extra_slots = 24 * sum((width - h.counters.lo.shape[1]) * h.num_states for h in holes)  # padding slots
    shared = 4 * v + t * v + 4 * cmax + 8 * len(holes) + 4 + extra_slots
    assert table.nbytes == sum(h.nbytes for h in holes) + shared
