"""Distinct decoding: one LM row per distinct history (``Kernels._distinct_step``).

* the model level: ``apply(..., rows=...)`` on a block of a larger cache gives the logits of running those rows
  alone and writes only their rows (padding rows write nothing); ``copy_rows`` copies whole rows;
  tiny Llama models and the toy LM (exactly);
* the kernel level: the classes (``_classes``) and the inverse-CDF search equal their dense definitions;
* the engine level: runs with distinct decoding give the particles of the per-particle step (``DISTINCT``
  off): exactly on the toy LM (same tokens, weights, log Z) for SMC resampling at every step, importance
  sampling, greedy decoding, MCMC and batch rows, also with decode blocks forced small so a step runs several
  large blocks; token for token on a tiny Llama (logits within float tolerance); the rows computed fall to the
  distinct histories (a finite choice at many particles), and the posterior stays exact (chi-square against
  enumeration, blocks forced small).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmprog
from lmprog.backends.base import Prefix
from lmprog.backends.tiny import tiny_model
from lmprog.backends.toy import ToyLM
from lmprog.inference import kernel
from lmprog.inference.kernel import _classes, _upper_bound

# --------------------------------------------------------------------------------------------------
# The model: rows of a block
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


def _fill(lm, rows, length, seed):
    """A cache of ``rows`` rows holding ``length`` random tokens each (own slots after a 3-token prefix)."""
    rng = np.random.default_rng(seed)
    prefix_cache = lm.init_cache(1, 8)
    _, prefix_cache = lm.apply(lm.params, prefix_cache, jnp.asarray([[3, 4, 5]], jnp.int32), jnp.zeros(1, jnp.int32))
    prefix = Prefix(prefix_cache, jnp.int32(3))
    cache = lm.init_cache(rows, length + 4)
    toks = jnp.asarray(rng.integers(1, min(200, lm.vocab_size - 1), size=(rows, length)), jnp.int32)
    _, cache = lm.apply(lm.params, cache, toks, jnp.full((rows,), 3, jnp.int32), prefix=prefix)
    return cache, prefix


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_apply_on_rows_of_a_block_equals_those_rows_alone(tiny, which):
    lm = tiny if which == "tiny" else ToyLM.random(context=3, positions=32, seed=2)
    cache, prefix = _fill(lm, 6, 5, seed=0)
    rows = jnp.asarray([4, 1, 6, 2], jnp.int32)  # 6: padding
    tok = jnp.asarray([[6], [2], [7], [4]], jnp.int32)
    pos = jnp.asarray([8, 8, 8, 8], jnp.int32)
    logits, after = jax.jit(lambda c: lm.apply(lm.params, c, tok, pos, prefix=prefix, rows=rows))(cache)
    alone = jax.tree.map(lambda a: a[jnp.asarray([4, 1, 2])], cache)
    ref, ref_cache = lm.apply(lm.params, alone, tok[jnp.asarray([0, 1, 3])], pos[:3], prefix=prefix)
    tol = dict(atol=0, rtol=0) if which == "toy" else dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits)[[0, 1, 3]], np.asarray(ref), **tol)
    for a, b, c in zip(jax.tree.leaves(after), jax.tree.leaves(ref_cache), jax.tree.leaves(cache)):
        a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
        np.testing.assert_allclose(a[[4, 1, 2]], b, **tol)  # the block's rows: written
        np.testing.assert_array_equal(a[[0, 3, 5]], c[[0, 3, 5]])  # rows outside the block (and padding): kept


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_copy_rows_copies_whole_rows_and_keeps_the_others(tiny, which):
    lm = tiny if which == "tiny" else ToyLM.random(context=2, positions=32, seed=2)
    cache, _ = _fill(lm, 5, 6, seed=1)
    out = lm.copy_rows(cache, jnp.asarray([2, 0, 1], jnp.int32), jnp.asarray([4, 3, 5], jnp.int32))  # 5: nothing
    for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(cache)):
        a, c = np.asarray(a), np.asarray(c)
        np.testing.assert_array_equal(a[[0, 1, 2]], c[[0, 1, 2]])
        np.testing.assert_array_equal(a[4], c[2])
        np.testing.assert_array_equal(a[3], c[0])


# --------------------------------------------------------------------------------------------------
# The kernel's pieces
# --------------------------------------------------------------------------------------------------


def test_classes_give_equal_numbers_exactly_to_equal_tuples():
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 3, size=200) for _ in range(3)]
    got = np.asarray(_classes(tuple(jnp.asarray(k, jnp.int32) for k in keys))[0])
    tuples = list(zip(*keys))
    for i in range(0, 200, 7):
        for j in range(200):
            assert (got[i] == got[j]) == (tuples[i] == tuples[j])
    order = sorted(set(tuples))
    assert [order.index(t) for t in tuples] == got.tolist()  # numbered in lexicographic order


def test_upper_bound_equals_counting_entries_at_most_q():
    rng = np.random.default_rng(1)
    probs = rng.random((5, 37)) * (rng.random((5, 37)) < 0.4)  # flat steps: zero-probability tokens
    cdf = jnp.asarray(np.cumsum(probs, axis=1), jnp.float32)
    row = jnp.asarray(rng.integers(0, 5, size=300), jnp.int32)
    q = jnp.asarray(rng.random(300) * np.asarray(cdf)[np.asarray(row), -1], jnp.float32)
    got = np.asarray(_upper_bound(cdf, row, q))
    want = np.sum(np.asarray(cdf)[np.asarray(row)] <= np.asarray(q)[:, None], axis=1)
    np.testing.assert_array_equal(got, want)
    assert (probs[np.asarray(row), np.minimum(got, 36)] > 0).all()  # never a zero-probability token


def test_in_place_resampling_keeps_the_children_and_each_first_child_at_its_ancestor():
    from lmprog.inference.kernel import _in_place

    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(1, 24))
        anc = np.sort(rng.integers(0, n, size=n))
        out = np.asarray(_in_place(jnp.asarray(anc, jnp.int32)))
        assert sorted(out.tolist()) == anc.tolist()  # the same multiset of children
        assert all(out[j] == j for j in set(anc.tolist()))  # a selected ancestor keeps its index
    np.testing.assert_array_equal(np.asarray(_in_place(jnp.asarray([0, 0, 0, 3], jnp.int32))), [0, 0, 0, 3])
    np.testing.assert_array_equal(np.asarray(_in_place(jnp.asarray([1, 1, 2, 2], jnp.int32))), [1, 1, 2, 2])
    np.testing.assert_array_equal(np.asarray(_in_place(jnp.asarray([2, 2, 2, 2], jnp.int32))), [2, 2, 2, 2])
    np.testing.assert_array_equal(np.asarray(_in_place(jnp.asarray([0, 2, 2, 3], jnp.int32))), [0, 2, 2, 3])
    np.testing.assert_array_equal(np.asarray(_in_place(jnp.asarray([1, 1, 1, 3], jnp.int32))), [1, 1, 1, 3])
    np.testing.assert_array_equal(np.asarray(_in_place(jnp.asarray([3, 3, 0, 0], jnp.int32))), [0, 0, 3, 3])


def test_decode_blocks_are_bounded_by_the_byte_budget():
    assert kernel.decode_block_rows(16, 49152) == (16, 16)
    small, large = kernel.decode_block_rows(10_000, 49152)
    assert small == kernel.SMALL_BLOCK_ROWS and large & (large - 1) == 0
    assert large * 49152 * 4 * kernel.DECODE_ROW_WORDS <= kernel.DECODE_BLOCK_BYTES
    assert kernel.decode_block_rows(10_000, 300) == (32, 10_000)  # a small vocabulary: every particle in place


# --------------------------------------------------------------------------------------------------
# The engine: distinct decoding == every particle through the LM
# --------------------------------------------------------------------------------------------------

TOY_PROGRAMS = {
    "smc-every-step": '''infer smc(particles=48, ess=1)
"ab [x] c" where x matches r"[abc ]{1,5}"
observe "a"
" [y]" where y in ["a", "bc", "c b"]
''',
    "importance": '''infer importance(particles=40)
"[x]\\n" where x in ["ab", "a b", "ba", "c"]
"c [y]" where y matches r"[ab]{1,3}"
''',
    "greedy": '''infer greedy()
"[x] c [y]\\n" where x matches r"[ab]{2,4}" and y in ["a", "cc"]
''',
    "mcmc": '''infer mcmc(steps=5, chains=6, burn_in=1, move="suffix")
"[a] c [b]\\n" where a matches r"[a-c]{1,3}" and b in ["a", "bb", "c"]
''',
}


def _both(monkeypatch, fn):
    monkeypatch.setattr(kernel, "DISTINCT", False)
    before = fn()
    monkeypatch.setattr(kernel, "DISTINCT", True)
    return before, fn()


def _same(a, b, exact=True):
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    lw_a, lw_b = [s.log_weight for s in a.samples], [s.log_weight for s in b.samples]
    if exact:
        assert lw_a == lw_b
        assert a.log_evidence == b.log_evidence
    else:
        np.testing.assert_allclose(lw_b, lw_a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("small_blocks", [False, True], ids=["blocks", "small-blocks"])
@pytest.mark.parametrize("name", list(TOY_PROGRAMS))
def test_toy_runs_equal_the_per_particle_step(monkeypatch, name, small_blocks):
    if small_blocks:  # 48 particles over ~10 columns: large blocks of 16 rows, so steps loop over blocks
        monkeypatch.setattr(kernel, "SMALL_BLOCK_ROWS", 4)
        monkeypatch.setattr(kernel, "DECODE_BLOCK_BYTES", 16 * 4 * kernel.DECODE_ROW_WORDS * 12)
        kernel._KERNELS.clear()
    lm = ToyLM.random(context=2, positions=24, seed=4)
    prog = lmprog.compile(TOY_PROGRAMS[name], "t.lmp")
    before, after = _both(monkeypatch, lambda: prog.run(lm=lm, seed=1))
    _same(before, after)
    kernel._KERNELS.clear()


def test_batch_rows_equal_the_per_particle_step(monkeypatch):
    lm = ToyLM.random(context=2, positions=32, seed=5)
    prog = lmprog.compile('''infer smc(particles=12, ess=0.8)
input who: str = "a"
"{who} c [x]\\n" where x matches r"[abc]{1,4}"
''', "t.lmp")
    rows = [{"who": "ab"}, {"who": "c"}, {"who": "ab"}]
    before, after = _both(monkeypatch, lambda: prog.run_batch(rows, lm=lm, seed=2))
    for a, b in zip(before, after):
        _same(a, b)


def test_tiny_llama_runs_equal_the_per_particle_step_token_for_token(monkeypatch, tiny):
    prog = lmprog.compile('''infer smc(particles=40, ess=0.9)
"Prompt: [x]\\n" where x matches r"[a-d]{1,6}"
observe " ok"
"A: [y]!" where y in ["yes", "no", "maybe"]
''', "t.lmp")
    before, after = _both(monkeypatch, lambda: prog.run(lm=tiny, seed=3))
    _same(before, after, exact=False)


def test_rows_fall_to_the_distinct_histories(monkeypatch):
    """A three-way choice at 300 particles: each step computes a row per distinct prefix, not per particle."""
    lm = ToyLM.random(context=2, positions=16, seed=6)
    prog = lmprog.compile('infer smc(particles=300, ess=0.5, enumerate=false)\n"[x]" where x in ["ab", "ac", "b"]\n',
                          "t.lmp")  # the token loop's rows (an enumerated hole feeds its trie instead)
    before, after = _both(monkeypatch, lambda: prog.run(lm=lm, seed=0))
    _same(before, after)
    dense, distinct = before.stats["decode_rows"], after.stats["decode_rows"]
    assert dense >= 300 * 2  # at least two steps of every particle
    assert distinct <= 32 * 4  # a small block per step: at most a handful of distinct prefixes each


def test_posterior_stays_exact_with_small_blocks(monkeypatch):
    """SMC resampling at every step with decode blocks forced small (many large blocks per step), against
    enumeration: posterior (chi-square of one draw per group) and evidence."""
    from _inference_cases import rich_case
    from test_inference_exact import check_posterior_and_evidence

    from lmprog.inference import SMC, run
    from lmprog.inference.exact import enumerate_program

    lm, prog = rich_case()
    monkeypatch.setattr(kernel, "SMALL_BLOCK_ROWS", 16)
    monkeypatch.setattr(kernel, "DECODE_BLOCK_BYTES", 128 * prog.vocab * 4 * kernel.DECODE_ROW_WORDS)
    kernel._KERNELS.clear()
    assert kernel.decode_block_rows(64 * 500, prog.vocab) == (16, 128)
    r = run(lm, prog, SMC(particles=64, ess=1.0), seed=4, groups=500)
    kernel._KERNELS.clear()
    assert r.resampled[0].all()
    assert r.stats["decode_rows"] < 64 * 500  # fewer rows in all than particles in one step
    check_posterior_and_evidence(r, enumerate_program(lm, prog))
