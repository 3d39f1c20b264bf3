"""``CompiledHole.reach``: the most decode steps a particle can spend in a hole, and the engine sizing by it.

* reach is the true maximum, found by enumerating every configuration (automaton state and the counts the mask
  reads) that the host reference of the engine's mask (``CompiledHole.allowed_tokens`` with the budget)
  allows, step by step, on small tokenizers, for choices, bounded regexes, dates, fixed length, ``tokens <=
  N`` (and unions), ``stop_at`` / ``stop_before``, following-text terminators; an upper bound with ``len``
  bounds; ``None`` for open languages;
* property (hypothesis, the real tokenizer): no tokenisation of a random choice list runs longer than reach;
* it survives the disk cache, reaches the ``Hole`` segments of a lowered program and the structure key;
* the engine sizes buffers and the KV cache by it, and a run gives exactly the same tokens, weights and
  log Z as the same run sized by the budget (``reach=None``), same seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmprog.automata.counters import TOKENS
from lmprog.backends.tokenizer import byte_tokenizer
from lmprog.backends.toy import ToyLM
from lmprog.compiler.automaton import path_lengths, stack_holes
from lmprog.compiler.constraint_ir import Choices, Count, Or, Regex, StopAt
from lmprog.compiler.constraints import compile_hole
from lmprog.inference import Hole, SegmentProgram, Text, engine, make_strategy

MERGES = [("a", "b"), ("b", "Ċ"), ("1", "."), ("Ġ", "a"), ("Ã", "©"), ("a", "Ċ"), ("Ċ", "Ċ"), ("e", "Ġ"),
          ("ab", "a"), (".", "5"), ("R", "e"), ("Re", "d"), ("1", "2"), ("0", "-")]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(MERGES)


def enumerate_steps(hole, max_tokens: int = 256, limit: int = 200_000) -> tuple[int, int]:
    """Breadth first over the configurations the mask allows: ``(most steps any particle takes, most steps of a
    complete hole)``. A configuration is the automaton state and the raw counts the mask reads (tokens, and
    characters / words when bounded); a complete hole stops (the engine's ``done``)."""
    active = [TOKENS] + [k for k in (1, 2) if hole.plan.bounds.active(k)]
    level = {(hole.automaton.start, (0,) * len(active)): ()}  # configuration -> one token sequence reaching it
    steps, complete, seen = 0, 0, 0
    while level:
        nxt: dict = {}
        for seq in level.values():
            if seq and hole.complete(seq):
                complete = max(complete, len(seq))
                continue
            for t in np.flatnonzero(hole.allowed_tokens(seq, max_tokens)):
                s2 = seq + (int(t),)
                state, raw = hole.run(s2)
                nxt.setdefault((state, tuple(int(raw[k]) for k in active)), s2)
                seen += 1
                assert seen < limit, "enumeration too large"
        if nxt:
            steps += 1
        level = nxt
    return steps, complete


CASES = {
    "choices, EOS": ([Choices(("Red", "Blue", "Yellow", "Red."))], None, 7),
    "choices, following text": ([Choices(("ab", "a", "aba", "é"))], "\n", 4),
    "choices, multi-byte following text": ([Choices(("ab", "a b", "b"))], " is\n", 7),
    "digits {1,3}": ([Regex("[0-9]{1,3}")], "\n", 4),
    "date": ([Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}")], "\n", 11),
    "fixed length": ([Count("tokens", "==", 4)], None, 4),
    "fixed length regex": ([Regex("[ab]+"), Count("tokens", "==", 3)], "\n", 3),
    "tokens <= N, open language": ([Regex("[ab]+"), Count("tokens", "<=", 3)], "\n", 3),
    "tokens <= N below the path bound": ([Regex("[0-9]{1,3}"), Count("tokens", "<=", 2)], "\n", 2),
    "tokens <= N above the path bound": ([Regex("[0-9]{1,3}"), Count("tokens", "<=", 9)], "\n", 4),
    "tokens union": ([Regex("[ab]{1,3}"), Or((Count("tokens", "<", 2), Count("tokens", ">", 3)))], "\n", 4),
    "tokens union, gap": ([Choices(("a", "aaaa")), Or((Count("tokens", "<=", 3), Count("tokens", ">=", 9)))], "\n", 2),
    "tokens >= N": ([Regex("[0-9]{1,3}"), Count("tokens", ">=", 3)], "\n", 4),
    "stop_at": ([Regex("[a-c]{1,4}\\."), StopAt(".")], None, 5),
    "stop_before": ([Regex("[ab]{1,2}"), StopAt("\n\n", keep=False)], None, 4),
    "choices with a stop in them, EOS": ([Choices(("Red.", "Blue."))], None, 6),
    "stop_at over choices": ([Choices(("Red.", "Blue.")), StopAt(".")], None, 5),
    "stop_before over choices": ([Choices(("Red", "Blue")), StopAt(".", keep=False)], None, 5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reach_is_the_enumerated_maximum(tok, name):
    constraints, following, expected = CASES[name]
    hole = compile_hole(constraints, tok, following_text=following, cache=False)
    steps, complete = enumerate_steps(hole)
    assert hole.reach == expected
    assert steps == complete == hole.reach, (name, steps, complete, hole.reach)


def test_reach_under_a_small_budget_stays_an_upper_bound(tok):
    hole = compile_hole([Regex("[0-9]{1,6}")], tok, following_text="\n", cache=False)
    assert hole.reach == 7
    assert enumerate_steps(hole, max_tokens=3) == (3, 3)  # the engine takes min(budget + slack, reach)


@pytest.mark.parametrize("constraints, following", [
    ([Choices(("ab", "abc", "b"))], None),
    ([Regex("[ab]{1,3}"), StopAt("b")], None),
    ([Choices(("aa", "ab", "ba", "bbb")), Count("len", "<=", 2)], "\n"),  # len is not used: upper bound
    ([Choices(("a a", "ab", "b b b")), Count("words", "<=", 2)], "\n"),
])
def test_reach_bounds_holes_with_character_and_word_bounds(tok, constraints, following):
    hole = compile_hole(constraints, tok, following_text=following, cache=False)
    steps, complete = enumerate_steps(hole)
    assert steps == complete <= hole.reach


@pytest.mark.parametrize("constraints, following", [
    ([Regex("[a-z]+")], "\n"), ([], None), ([StopAt(".")], None), ([Count("len", "<=", 3)], "\n"),
    ([Regex("[ab]+"), Or((Count("tokens", "<=", 2), Count("tokens", ">=", 5)))], "\n"),
])
def test_reach_is_none_for_open_languages(tok, constraints, following):
    assert compile_hole(constraints, tok, following_text=following, cache=False).reach is None


def test_path_lengths():
    # 0 -a-> 1 -b-> 2 (final), 0 -c-> 2, and 1 -d-> 3 (a dead end): lengths {1, 2}
    table = np.array([[1, -1, 2, -1], [-1, 2, -1, 3], [0, 0, 0, 0], [-1, -1, -1, -1]], np.int32)
    final = np.array([False, False, True, False])
    assert path_lengths(table, final, 0) == 0b110  # out of the final state: ignored (the hole ended)
    table[1, 0] = 0  # a cycle 0 -> 1 -> 0
    assert path_lengths(table, final, 0) is None
    table[1, 0] = 3  # into the dead end only: not a cycle
    assert path_lengths(table, final, 0) == 0b110


def test_reach_is_cached_on_disk(tok, tmp_path, monkeypatch):
    from lmprog.compiler import constraints as K

    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(K, "_MEMORY", {})
    first = compile_hole([Regex("[0-9]{1,3}")], tok, following_text="\n")
    monkeypatch.setattr(K, "_MEMORY", {})
    again = compile_hole([Regex("[0-9]{1,3}")], tok, following_text="\n")
    assert not first.from_cache and again.from_cache and again.reach == first.reach == 4
    monkeypatch.setattr(K, "_MEMORY", {})
    open_ = compile_hole([Regex("[0-9]+")], tok, following_text="\n")
    monkeypatch.setattr(K, "_MEMORY", {})
    assert compile_hole([Regex("[0-9]+")], tok, following_text="\n").reach is open_.reach is None


# ---- the real tokenizer -------------------------------------------------------------------------------


def all_tokenisations(hole) -> list[tuple[int, ...]]:
    """Every complete token sequence of a hole (depth first under its host mask)."""
    out, stack = [], [()]
    while stack:
        seq = stack.pop()
        if seq and hole.complete(seq):
            out.append(seq)
            continue
        stack += [seq + (int(t),) for t in np.flatnonzero(hole.allowed_tokens(seq, 256))]
    return out


WORDS = st.text(alphabet="abRed .é\n", min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(WORDS, min_size=1, max_size=4, unique=True), following=st.sampled_from([None, "\n", "."]),
       space=st.booleans())
def test_no_tokenisation_of_a_choice_list_is_longer_than_reach(default_tokenizer, items, following, space):
    items = [(" " if space else "") + s for s in items]
    if following and all(following in s for s in items):
        return  # no value can be followed by its terminator (a compile error)
    hole = compile_hole([Choices(tuple(items))], default_tokenizer, following_text=following, cache=False)
    longest = max(len(t) for t in all_tokenisations(hole))
    assert longest == hole.reach  # exact for choices; reach >= longest is what sizing needs


def test_lowered_holes_carry_reach(default_tokenizer):
    import lmprog
    from lmprog.compiler.lower import lower

    src = ('infer smc(particles=4)\n'
           '"Q: What colour is a banana?\\nA: [answer]" where answer in ["Red", "Blue", "Yellow", "Red."]\n'
           'return answer\n')
    low = lower(lmprog.compile(src), default_tokenizer, {})
    (hole,) = low.program.holes
    assert hole.reach == 8  # " Yellow": 7 single-byte tokens at most, then EOS (the prompt's space healed in)
    (shape,) = [s for s in low.structure_key[0] if s[0] == "hole"]
    assert shape[-1] == 8


# ---- the engine ---------------------------------------------------------------------------------------

VOCAB = ("<bos>", "<eos>", "a", "b", "c", " ", "\n", "ab", "bc", "abc", "ca")


def _choice_program(lm, reach_off: bool = False):
    hole = compile_hole([Choices(("ab", "abc", "c", "bca", "b"))], lm.tokenizer, name="x", cache=False)
    table, offs = stack_holes([hole])
    bos, a = 0, 2
    seg = Hole("x", start=offs[0] + hole.automaton.start, value=hole.value_rule, label="x", reach=hole.reach)
    if reach_off:
        seg = dataclasses.replace(seg, reach=None)
    return SegmentProgram([Text((bos, a)), seg, Text((a, a)), dataclasses.replace(seg, name="y")], table), hole


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("strategy", ["smc", "importance", "beam"])
def test_engine_sizes_by_reach_and_results_do_not_change(monkeypatch, share_prefix, strategy):
    lm = ToyLM.random(VOCAB, context=2, positions=16, seed=3)
    monkeypatch.setattr(engine, "SHARE_PREFIX", share_prefix, raising=False)
    sizes = []
    real_setup = engine.setup

    def recording(*args, **kwargs):
        r, state, s = real_setup(*args, **kwargs)
        sizes.append((s.cache_len, state.particles.tokens.shape[1], state.cache.shape[1]))
        return r, state, s

    monkeypatch.setattr(engine, "setup", recording)
    strat = make_strategy(strategy, 16) if strategy != "smc" else make_strategy("smc", 16, ess=0.9)
    groups = 1 if strategy == "beam" else 8
    runs = []
    for off in (False, True):
        program, hole = _choice_program(lm, reach_off=off)
        runs.append(engine.run(lm, program, strat, seed=11, groups=groups))
    assert hole.reach == 4  # "bca" as b, c, a, then EOS
    (cache_r, buf_r, own_r), (cache_b, buf_b, own_b) = sizes
    assert cache_r < cache_b and own_r < own_b  # 2 prompt tokens, 4 + 2 + 4 slots, vs 2 x (256 + 1) + 2
    assert cache_r <= 2 + 4 + 2 + 4 + 1 + 15 and buf_r == 32
    with_reach, by_budget = runs
    np.testing.assert_array_equal(with_reach.lengths, by_budget.lengths)
    for g in range(with_reach.lengths.shape[0]):
        for i in range(with_reach.lengths.shape[1]):
            n = with_reach.lengths[g, i]
            np.testing.assert_array_equal(with_reach.tokens[g, i, :n], by_budget.tokens[g, i, :n])
    np.testing.assert_array_equal(with_reach.log_weights, by_budget.log_weights)
    np.testing.assert_array_equal(with_reach.spans, by_budget.spans)
    if with_reach.log_z is not None:
        np.testing.assert_array_equal(with_reach.log_z, by_budget.log_z)
    assert [s.values for s in with_reach.samples] == [s.values for s in by_budget.samples]
    assert np.all(np.diff(with_reach.spans, axis=-1) <= hole.reach)


def test_batch_combine_keeps_the_largest_reach():
    from lmprog.inference.batch import combine

    seg_a, seg_b = Hole("x", start=0, reach=5), Hole("x", start=0, reach=7)
    lm = ToyLM.random(VOCAB, seed=0)
    hole = compile_hole([Choices(("ab",))], lm.tokenizer, cache=False)
    table, _ = stack_holes([hole])
    progs = [SegmentProgram([Text((0,)), s], table) for s in (seg_a, seg_b)]
    assert combine(progs, 2, [None, None]).holes[0].reach == 7
    none = SegmentProgram([Text((0,)), dataclasses.replace(seg_a, reach=None)], table)
    assert combine([progs[0], none], 2, [None, None]).holes[0].reach is None
    with pytest.raises(ValueError, match="reach"):
        Hole("x", reach=0)


def test_a_lowered_choice_program_on_a_tiny_llama_gives_the_same_run_with_smaller_caches(monkeypatch):
    """The real model class (attention over the cache): sized by reach or by the budget, same seed, the same
    particles, weights and log Z, bit for bit."""
    import lmprog
    from lmprog.backends.tiny import tiny_model
    from lmprog.compiler.lower import lower

    lm = tiny_model(seed=1)
    src = ('infer smc(particles=32)\n'
           '"Q: What colour is a banana?\\nA: [answer]" where answer in ["Red", "Blue", "Yellow", "Red."]\n'
           'return answer\n')
    low = lower(lmprog.compile(src), lm.tokenizer, {})
    sizes = []
    real_setup = engine.setup

    def recording(*args, **kwargs):
        r, state, s = real_setup(*args, **kwargs)
        sizes.append(s.cache_len)
        return r, state, s

    monkeypatch.setattr(engine, "setup", recording)
    off = SegmentProgram([dataclasses.replace(s, reach=None) if isinstance(s, Hole) else s
                          for s in low.program.segments], low.program.table)
    a, b = (engine.run(lm, p, make_strategy("smc", 32, ess=0.5), seed=3, groups=2) for p in (low.program, off))
    assert low.program.holes[0].reach == 8 and sizes[0] < sizes[1]
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.tokens[..., : a.lengths.max()], b.tokens[..., : a.lengths.max()])
    # the same tokens; weights up to float32 rounding (attention sums over caches of different lengths)
    np.testing.assert_allclose(a.log_weights, b.log_weights, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(a.log_z, b.log_z, rtol=1e-6, atol=1e-5)
