"""The one-step lookahead (``lookahead=k``, lmprog/inference/lookahead.py) keeps the target exact.

On toy LMs with open holes ended by literal text (a token may straddle the end of the value and the
terminator) and by EOS, enumerated exactly: the SIR draws of 1000 groups pass the chi-square test at
``ALPHA = 1e-3`` and the mean of ``Z_hat`` is within 4 standard errors of the exact ``Z``, for importance
sampling and SMC, with the distinct step and with every particle through the LM (a weight that kept the twist,
or a proposal the weight does not match, fails them). Finite holes are taken token by token here
(``enumerate=False``): the lookahead is for open holes, and the test must exercise it. Besides: no twist is
left in a weight when the holes end; the candidates are the tokens after which the value may end; and where
the LM's terminator odds differ sharply between values, the lookahead raises the ESS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _inference_cases import ALPHA, chi_square_pvalue, sir_draws, z_score_of_mean
from lmprog.backends.toy import ToyLM
from lmprog.compiler.automaton import stack_holes
from lmprog.compiler.constraint_ir import Count, Regex
from lmprog.compiler.constraints import compile_hole
from lmprog.inference import SMC, Hole, Importance, Observe, SegmentProgram, Text, engine, kernel, lookahead, run
from lmprog.inference.exact import enumerate_program
from lmprog.inference.kernel import KernelConfig

VOCAB = ("<bos>", "<eos>", "a", "b", "c", " ", "\n", "ab", "c\n", "\n\n")
BOS, EOS, A, B, C, SP, NL, AB, C_NL, NL_NL = range(len(VOCAB))
G, N = 1000, 64


@functools.cache
def terminator_case(seed: int = 1):
    """A trigram random LM over a vocabulary with a straddling token ``"c\\n"`` and one past the terminator
    (``"\\n\\n"``); a hole ``[abc]+`` ended by the literal ``"\\n"`` after it, observed text, and a hole
    ``[ab]+`` ended by EOS."""
    lm = ToyLM.random(VOCAB, context=2, positions=12, seed=seed, scale=1.0)
    tok = lm.tokenizer
    hx = compile_hole([Regex("[abc]+")], tok, following_text="\n", name="x", cache=False)
    hy = compile_hole([Regex("[ab]+"), Count("tokens", "<=", 3)], tok, name="y", cache=False)
    table, offs = stack_holes([hx, hy])
    prog = SegmentProgram(
        [
            Text((BOS, SP)),
            Hole("x", start=offs[0], max_tokens=4, value=hx.value_rule, label="t:1: x"),
            Observe((SP, A), label="t:2: observe"),
            Hole("y", start=offs[1], max_tokens=3, value=hy.value_rule, label="t:3: y"),
        ],
        table,
    )
    return lm, prog


@functools.cache
def myopic_case():
    """Where the masked LM is myopic: it prefers ``a``, after which the terminator ``"\\n"`` is rare; after
    ``b`` it is likely. The hole is ``[ab]+`` ended by ``"\\n"``."""

    def fn(pos, ctx):
        p = np.full(len(VOCAB), 1e-3)
        p[BOS] = 0.0
        last = ctx[-1]
        if last in (BOS, SP):
            p[A], p[B] = 0.8, 0.2
        elif last == A:
            p[NL], p[C] = 0.01, 0.9
        elif last == B:
            p[NL], p[A], p[B] = 0.8, 0.05, 0.05
        with np.errstate(divide="ignore"):
            return np.log(p / p.sum())

    lm = ToyLM.from_fn(fn, VOCAB, context=1, positions=10, name="toy-myopic")
    h = compile_hole([Regex("[ab]+")], lm.tokenizer, following_text="\n", name="x", cache=False)
    table, offs = stack_holes([h])
    prog = SegmentProgram([Text((BOS, SP)), Hole("x", start=offs[0], max_tokens=4,
                                                   value=h.value_rule, label="m:1: x")], table)
    return lm, prog


@pytest.fixture(scope="module")
def term():
    lm, prog = terminator_case()
    exact = enumerate_program(lm, prog)
    assert any(C_NL in seq for seq in exact.probs()), "the straddling token must be on some path"
    return lm, prog, exact


def check_exact(result, exact, seed=0):
    assert result.properly_weighted and not np.isnan(result.log_weights).any()
    p = chi_square_pvalue(sir_draws(result, seed), exact.probs())
    assert p > ALPHA, f"chi-square p-value {p:.2e} <= {ALPHA}"
    z = z_score_of_mean(np.exp(result.log_z), exact.z)
    assert abs(z) < 4, f"mean Z_hat is {z:.1f} standard errors from the exact Z"


@pytest.mark.parametrize("strategy", [
    Importance(particles=N, lookahead=2, enumerate=False),
    SMC(particles=N, ess=0.5, lookahead=2, enumerate=False),
    SMC(particles=N, ess=1.0, resample="multinomial", lookahead=3, enumerate=False),
], ids=["importance", "smc-adaptive", "smc-every-step"])
def test_lookahead_target_unchanged(term, strategy):
    lm, prog, exact = term
    r = run(lm, prog, strategy, seed=5, groups=G)
    check_exact(r, exact, seed=2)
    assert r.stats["forward_passes"] > run(lm, prog, strategy.with_options(lookahead=0), seed=5,
                                           groups=4).stats["forward_passes"], "the lookahead ran no forward"


def test_lookahead_without_distinct_decoding(term, monkeypatch):
    lm, prog, exact = term
    monkeypatch.setattr(kernel, "DISTINCT", False)
    check_exact(run(lm, prog, SMC(particles=N, lookahead=2, enumerate=False), seed=9, groups=G), exact, seed=3)


def test_lookahead_raises_ess_where_the_terminator_odds_differ():
    lm, prog = myopic_case()
    exact = enumerate_program(lm, prog)
    ess = {}
    for k in (0, 2):
        r = run(lm, prog, Importance(particles=N, lookahead=k, enumerate=False), seed=1, groups=400)
        check_exact(r, exact, seed=4)
        w = np.exp(r.log_weights - r.log_weights.max(axis=1, keepdims=True))
        ess[k] = float(np.mean(w.sum(1) ** 2 / (w ** 2).sum(1)))
    assert ess[2] > 1.5 * ess[0], ess


def test_twist_is_taken_out_when_the_hole_ends(term):
    """Every particle ends its holes with no twist left in its weight (psi = 1 for a token that ends a hole)."""
    lm, prog, _ = term
    strategy = SMC(particles=N, lookahead=2, enumerate=False)
    cfg = KernelConfig(select="sample", weighted=True, resampler="systematic", groups=8)
    r, state, s = engine.setup(lm, prog, strategy, cfg, 8, jax.random.key(3), None)
    assert r.kern.cfg.lookahead == 2  # the strategy's option reaches the kernels
    state, s = engine.prefill_group_text(r, state, s)
    state = engine.walk(r, state, s)
    twist = np.asarray(state.particles.twist)
    alive = np.asarray(state.particles.cause) == 0
    assert alive.any() and np.all(twist[alive] == 0.0), twist


def test_candidates_are_tokens_that_may_end_the_value():
    """After ``b`` the top tokens are ``\n`` (ends the hole: psi = 1, no candidate), then ``a`` and ``b``."""
    lm, prog = myopic_case()
    table = prog.table
    start = jnp.asarray([prog.segments[1].start], jnp.int32)
    counts = table.init_counts(1)
    state, counts = table.step(start, counts, jnp.asarray([B], jnp.int32))
    z = jnp.asarray(lm.host_logits([BOS, SP, B]))[None, :]
    masked = jnp.where(table.mask(state, counts, 4), z, -jnp.inf)
    tok, use, _, _ = lookahead.candidates(table, state, counts, jnp.ones((1,), jnp.int32), masked, 3, jnp.int32(5))
    assert int(tok[0, 0]) == NL
    got = {int(t) for t, u in zip(np.asarray(tok[0]), np.asarray(use[0])) if u}
    assert got == {A, B}, got
    _, use, _, _ = lookahead.candidates(table, state, counts, jnp.full((1,), 4, jnp.int32), masked, 3, jnp.int32(5))
    assert not np.asarray(use).any()  # the hard cap: no next step to look at


def test_lookahead_is_refused_where_the_twist_cannot_be_carried():
    with pytest.raises(ValueError, match="lookahead"):
        KernelConfig(select="sample", trace=True, lookahead=2)
    with pytest.raises(ValueError, match="lookahead"):
        KernelConfig(select="argmax", lookahead=2)


def test_lookahead_with_rejuvenate_is_a_located_error():
    import lmprog
    from lmprog.dsl.errors import LmpError

    lmprog.compile('infer smc(particles=8, lookahead=4)\n"[x]\\n"\n', "t.lmp")
    with pytest.raises(LmpError) as err:
        lmprog.compile('infer smc(particles=8, rejuvenate=2, lookahead=4)\n"[x]\\n"\n', "t.lmp")
    (d,) = err.value.diagnostics
    assert "lookahead does not combine with rejuvenate" in d.message
    assert "t.lmp:1:48" in str(err.value)
