"""The shared prompt prefix stored once (``LanguageModel.apply(..., prefix=Prefix(cache1, S0))``).

* the model level: ``apply`` with a one-row prefix plus per-row own caches gives the logits of ``apply`` on one
  cache holding the prefix and the rows' tokens (tiny Llama models with GQA, MHA and q/k/v biases; the toy
  LM, exactly), for prefill blocks and decode steps, rows at different positions, a prefix buffer longer than
  ``S0`` holding junk, and an empty prefix; decoding N steps with the split cache picks the same tokens as
  with the prefix broadcast into every row;
* the engine level: runs with ``engine.SHARE_PREFIX`` on and off (the broadcast it replaced) give the same
  particles: exactly on the toy LM, token for token on tiny Llama models (SMC with resampling, a prompt
  longer than a prefill chunk, observed text, batch mode, MCMC suffix moves, beam);
* the particles' caches hold only their own slots: their length does not grow with the prompt.
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
from lmprog.inference import engine

# --------------------------------------------------------------------------------------------------
# The model: split cache == one concatenated cache
# --------------------------------------------------------------------------------------------------


LLAMAS = {
    "gqa": dict(seed=1),  # 4 query heads over 2 KV heads
    "gqa3-bias-untied": dict(seed=2, n_heads=6, n_kv_heads=2, qkv_bias=True, tie_embeddings=False),
    "mha": dict(seed=3, n_heads=2, n_kv_heads=2, head_dim=16),
}


@pytest.fixture(scope="module", params=list(LLAMAS))
def llama(request):
    return tiny_model(**LLAMAS[request.param])


_JITTED: dict = {}


def _apply(lm, cache, tokens, positions, prefix=None):
    """``lm.apply`` jitted (``prefix=None`` passed as the default, as callers that know no prefix do)."""
    if id(lm) not in _JITTED:
        _JITTED[id(lm)] = (lm, jax.jit(lambda *a: lm.apply(*a)), jax.jit(lambda *a: lm.apply(*a[:4], prefix=a[4])))
    _, plain, split = _JITTED[id(lm)]
    args = (lm.params, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32))
    return plain(*args) if prefix is None else split(*args, prefix)


def _two_caches(lm, prompt, junk, rows, own_len, buf):
    """The same state twice: one cache of ``len(prompt) + own_len`` slots per row with the prompt broadcast,
    and a prefix (buffer of ``buf`` slots: the prompt, then ``junk`` tokens past ``S0``) plus own caches."""
    s0 = len(prompt)
    full = lm.init_cache(1, s0 + own_len)
    if s0:
        _, full = _apply(lm, full, [prompt], [0])
    full = lm.broadcast(full, rows)
    one = lm.init_cache(1, buf)
    if s0 + len(junk):
        _, one = _apply(lm, one, [list(prompt) + list(junk)], [0])
    return full, Prefix(one, jnp.int32(s0)), lm.init_cache(rows, own_len)


def _check_split_equals_concatenated(lm, s0, buf, exact, rng):
    vocab = 7 if isinstance(lm, ToyLM) else 256
    prompt = [int(t) for t in rng.integers(0, vocab, size=s0)]
    junk = [int(t) for t in rng.integers(0, vocab, size=buf - s0)]  # slots >= S0 of the prefix: never read
    rows, own_len = 3, 24
    full, prefix, own = _two_caches(lm, prompt, junk, rows, own_len, buf)
    close = (lambda a, b: np.testing.assert_array_equal(a, b)) if exact else (
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4))
    # prefill blocks (T > 1) with rows at different positions: row r has r extra tokens first
    for r in range(rows):
        if r:
            toks = [[int(t) for t in rng.integers(0, vocab, size=r)]] * rows
            a, full = _apply(lm, full, toks, [s0] * rows)
            b, own = _apply(lm, own, toks, [s0] * rows, prefix)
            close(np.asarray(b), np.asarray(a))
    positions = np.array([s0, s0 + 1, s0 + 2])
    block = rng.integers(0, vocab, size=(rows, 6))
    a, full = _apply(lm, full, block, positions)
    b, own = _apply(lm, own, block, positions, prefix)
    close(np.asarray(b), np.asarray(a))
    positions = positions + 6
    for _ in range(5):  # decode steps (T = 1)
        step = rng.integers(0, vocab, size=(rows, 1))
        a, full = _apply(lm, full, step, positions)
        b, own = _apply(lm, own, step, positions, prefix)
        close(np.asarray(b), np.asarray(a))
        positions = positions + 1


@pytest.mark.parametrize("s0,buf", [(13, 32), (16, 16), (0, 16), (1, 16)])
def test_llama_apply_with_prefix_equals_the_concatenated_cache(llama, s0, buf):
    _check_split_equals_concatenated(llama, s0, buf, exact=False, rng=np.random.default_rng(s0))


@pytest.mark.parametrize("context", [1, 2, 3])
@pytest.mark.parametrize("s0,buf", [(5, 16), (0, 16), (1, 16), (16, 16)])
def test_toy_apply_with_prefix_gives_identical_probabilities(context, s0, buf):
    lm = ToyLM.random(context=context, positions=40, seed=context)
    _check_split_equals_concatenated(lm, s0, buf, exact=True, rng=np.random.default_rng(s0 + 10 * context))


def test_llama_prefix_block_longer_than_the_prefix_and_jitted(llama):
    """A prefix of 300 tokens (longer than the own caches) through the jitted, donating convenience."""
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, 256, size=300)]
    full, prefix, own = _two_caches(llama, prompt, [], 4, 16, 304)
    toks = rng.integers(0, 256, size=(4, 3))
    a, _ = llama.forward(full, toks, [300, 301, 302, 303])
    b, _ = llama.forward(own, toks, [300, 301, 302, 303], prefix)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


def test_greedy_decoding_with_the_split_cache_equals_the_broadcast_cache(llama):
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, 256, size=40)]
    rows, steps = 4, 24
    full, prefix, own = _two_caches(llama, prompt, [], rows, steps + 8, 48)

    @jax.jit
    def decode(cache, prefix):
        def body(c, i):
            cache, tok = c
            logits, cache = llama.apply(llama.params, cache, tok[:, None], jnp.full((rows,), 40, jnp.int32) + i,
                                        prefix=prefix)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (cache, nxt), (nxt, logits[:, 0])

        first = jnp.asarray([10, 20, 30, 40], jnp.int32)
        _, (toks, logits) = jax.lax.scan(body, (cache, first), jnp.arange(steps, dtype=jnp.int32))
        return toks, logits

    t_full, l_full = decode(full, None)
    t_split, l_split = decode(own, prefix)
    np.testing.assert_array_equal(np.asarray(t_split), np.asarray(t_full))
    np.testing.assert_allclose(np.asarray(l_split), np.asarray(l_full), atol=1e-4, rtol=1e-4)
    assert len(set(np.asarray(t_full).ravel().tolist())) > 3  # not a degenerate sequence


# --------------------------------------------------------------------------------------------------
# The engine: SHARE_PREFIX on == off
# --------------------------------------------------------------------------------------------------

LONG_PROMPT = "Some words to make a long prompt, " * 10  # 340 bytes: two prefill chunks

SMC_PROGRAM = f'''infer smc(particles=8, ess=0.9)
"{LONG_PROMPT}Q: [x]\\n" where x matches r"[a-z]{{2,6}}"
observe " ok"
"A: [y]!" where y in ["yes", "no", "maybe"]
return x + y
'''

BATCH_PROGRAM = '''infer importance(particles=6)
input who: str = "Q"
"Prompt text: {who} asks: [x]\\n" where x matches r"[a-z ]{1,8}"
'''

MCMC_PROGRAM = '''infer mcmc(steps=6, chains=3, burn_in=1, move="suffix")
"A prompt before the chain: [a] then [b]." where a matches r"[a-z]{1,4}" and b in ["x", "yy", "zzz"]
return a + b
'''

BEAM_PROGRAM = '''infer beam(width=3)
"Beam prompt: [x]." where x matches r"[a-c]{1,4}"
'''


def _both(monkeypatch, fn):
    monkeypatch.setattr(engine, "SHARE_PREFIX", False)
    before = fn()
    monkeypatch.setattr(engine, "SHARE_PREFIX", True)
    return before, fn()


def _same_particles(a, b, exact):
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert [s.values for s in a.samples] == [s.values for s in b.samples]
    lw_a, lw_b = [s.log_weight for s in a.samples], [s.log_weight for s in b.samples]
    if exact:
        assert lw_a == lw_b
    else:
        np.testing.assert_allclose(lw_b, lw_a, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


@pytest.mark.parametrize("source", [SMC_PROGRAM, MCMC_PROGRAM, BEAM_PROGRAM], ids=["smc", "mcmc", "beam"])
def test_engine_results_equal_the_broadcast_prefix_on_a_tiny_llama(monkeypatch, tiny, source):
    prog = lmprog.compile(source, "t.lmp")
    before, after = _both(monkeypatch, lambda: prog.run(lm=tiny, seed=3, max_tokens=12))
    _same_particles(before, after, exact=False)


def test_batch_mode_equals_the_broadcast_prefix(monkeypatch, tiny, engine_calls):
    prog = lmprog.compile(BATCH_PROGRAM, "t.lmp")
    rows = [{"who": "Q"}, {"who": "Somebody else"}, {"who": "Q"}]
    before, after = _both(monkeypatch, lambda: prog.run_batch(rows, lm=tiny, seed=2))
    assert engine_calls == [3, 3]  # one call per setting: the rows' own prompts prefilled per group
    for a, b in zip(before, after):
        _same_particles(a, b, exact=False)


TOY_PROGRAM = '''infer smc(particles=16, ess=0.7)
"ab [x] c" where x matches r"[abc ]{1,5}"
observe "a"
" [y]" where y in ["a", "bc", "c b"]
'''


@pytest.mark.parametrize("strategy", [None, "mcmc"])
def test_engine_results_are_identical_on_the_toy_lm(monkeypatch, strategy):
    lm = ToyLM.random(context=2, positions=24, seed=4)
    prog = lmprog.compile(TOY_PROGRAM, "t.lmp")
    before, after = _both(monkeypatch, lambda: prog.run(lm=lm, seed=1, strategy=strategy))
    _same_particles(before, after, exact=True)
    assert before.log_evidence == after.log_evidence


def test_particle_caches_hold_only_their_own_slots(monkeypatch, tiny):
    """The own caches' length does not depend on the prompt; the prefix is one row."""
    seen = []
    real = engine.setup

    def spy(*args, **kwargs):
        r, state, s = real(*args, **kwargs)
        seen.append((state.cache.k[0].shape, r.consts.prefix.cache.k[0].shape, int(r.consts.prefix.length), s))
        return r, state, s

    monkeypatch.setattr(engine, "setup", spy)
    own_lens = []
    for words in (2, 120):
        src = f'infer sample(4)\n"{"w " * words}[x]." where x matches r"[a-z]{{1,8}}" and tokens(x) <= 8\n'
        lmprog.compile(src, "t.lmp").run(lm=tiny, seed=0)
        own, pre, s0, s = seen[-1]
        assert own[0] == 4 and pre[0] == 1 and s0 == len(s.prefix) - 1 >= 2 * words - 2
        assert pre[2] >= s0 and s.cache_len == s0 + own[2]
        own_lens.append(own[2])
    assert own_lens[0] == own_lens[1] <= 32
