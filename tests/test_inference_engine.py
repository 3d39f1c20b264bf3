"""The engine's mechanics: no retracing inside the loop, reproducibility, jit == no-jit, dead particles and
errors, branching, strategies and results."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from _inference_cases import (
    ALPHA,
    A,
    B,
    BOS,
    C,
    NL,
    SP,
    V,
    bias_case,
    chi_square_pvalue,
    no_repeat_then_newline,
    rich_case,
    sir_draws,
    z_score_of_mean,
)
from lmprog.backends.toy import ToyLM
from lmprog.compiler.automaton import Automaton, stack_automata
from lmprog.inference import (
    SMC,
    TRACE_COUNTS,
    Hole,
    Host,
    Importance,
    InferenceError,
    Observe,
    SegmentProgram,
    Text,
    make_strategy,
    run,
)
from lmprog.inference.exact import enumerate_program
from lmprog.result import Result

# --------------------------------------------------------------------------------------------------
# The token loop compiles once; same seed, same result
# --------------------------------------------------------------------------------------------------


def test_the_step_is_traced_once_and_runs_are_reproducible():
    lm = ToyLM.random(context=2, positions=16, seed=3)  # a fresh model: nothing compiled for it yet
    _, prog = rich_case()
    strategy = SMC(particles=8, ess=0.9)
    chunks = []
    before = dict(TRACE_COUNTS)
    r1 = run(lm, prog, strategy, seed=0, chunk=2, progress=chunks.append)
    r2 = run(lm, prog, strategy, seed=1, chunk=2)
    r3 = run(lm, prog, strategy, seed=0, chunk=2)
    traced = {k: v - before.get(k, 0) for k, v in TRACE_COUNTS.items() if v != before.get(k, 0)}
    # Two holes, several device chunks each, three runs: the hole kernel was traced exactly once.
    assert sum(1 for c in chunks if c.hole == "x") >= 2 and sum(1 for c in chunks if c.hole == "y") >= 2
    # (refine_causes runs after a hole where particles died: here some exceed the budget)
    assert {k: v for k, v in traced.items() if k != "refine_causes"} == {"prefill": 1, "begin_hole": 1, "hole_chunk": 1, "feed": 1}
    assert traced.get("refine_causes", 1) == 1, traced
    assert r1.stats["compile_s"] > 0 and r2.stats["compile_s"] == 0
    np.testing.assert_array_equal(r1.tokens, r3.tokens)
    np.testing.assert_array_equal(r1.log_weights, r3.log_weights)
    np.testing.assert_array_equal(r1.ess, r3.ess)
    assert r1.log_evidence == r3.log_evidence
    assert r1.sequences() != r2.sequences()
    # explicit keys work the same way
    r4 = run(lm, prog, strategy, key=jax.random.key(0), chunk=2)
    np.testing.assert_array_equal(r1.tokens, r4.tokens)


# --------------------------------------------------------------------------------------------------
# The same exactness check, jitted and not
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jit_and_nojit():
    lm, prog = bias_case()
    strategy = SMC(particles=16, ess=1.0, resample="residual")
    out = {}
    for jit in (True, False):
        with jax.disable_jit(not jit):
            out[jit] = run(lm, prog, strategy, seed=21, groups=300)
    return lm, prog, out


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_exact_jitted_and_unjitted(jit_and_nojit, jit):
    lm, prog, out = jit_and_nojit
    exact = enumerate_program(lm, prog)
    r = out[jit]
    assert chi_square_pvalue(sir_draws(r, 5), exact.probs()) > ALPHA
    assert abs(z_score_of_mean(np.exp(r.log_z), exact.z)) < 4


def test_jitted_and_unjitted_runs_agree(jit_and_nojit):
    _, _, out = jit_and_nojit
    np.testing.assert_array_equal(out[True].tokens, out[False].tokens)
    np.testing.assert_allclose(out[True].log_weights, out[False].log_weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[True].log_z, out[False].log_z, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Dead particles and errors (every program below has the same shapes: one compiled kernel per strategy)
# --------------------------------------------------------------------------------------------------


def _death_table():
    # 0: 'b' then '\n' (2 tokens), or 'a' then 'b' 'c' '\n' (4 tokens): with a budget of 3 the 'a' path dies.
    d = -np.ones((6, V), np.int32)
    d[0, B], d[1, NL] = 1, 2
    d[0, A], d[3, B], d[4, C], d[5, NL] = 3, 4, 5, 2
    dead_end = Automaton(d, np.array([False, False, True, False, False, False]), 0)
    e = -np.ones((5, V), np.int32)
    e[0, A], e[1, B], e[2, C], e[3, NL] = 1, 2, 3, 4
    abc = Automaton(e, np.arange(5) == 4, 0)  # 4 tokens: never fits a budget of 3
    only_bos = Automaton(np.where(np.arange(V) == BOS, 1, -1)[None, :].repeat(2, 0).astype(np.int32), np.array([False, True]), 0)
    table, offs = stack_automata([dead_end, only_bos, no_repeat_then_newline(), abc])
    return table, {"mixed": offs[0], "only_a": offs[3], "bos": offs[1], "letters": offs[2]}


TABLE, STARTS = _death_table()


def _prog(start, observe=(SP,), host=None):
    return SegmentProgram(
        [
            Text((BOS,)),
            Hole("x", start=start, max_tokens=3, label="death.lmp:2:5: x matches r'b|abc'"),
            Observe(observe, label="death.lmp:3:1: observe"),
            Host(host or (lambda view: None), label="death.lmp:4:1: condition"),
        ],
        TABLE,
    )


@pytest.fixture(scope="module")
def lm():
    return rich_case()[0]


@pytest.mark.parametrize("strategy", [Importance(particles=32), SMC(particles=32, ess=1.0)], ids=["importance", "smc"])
def test_some_particles_die_without_nan_or_abort(lm, strategy):
    prog = _prog(STARTS["mixed"])
    r = run(lm, prog, strategy, seed=3)
    exact = enumerate_program(lm, prog)
    assert len(exact.paths) == 1 and exact.paths[0].tokens == (B, NL, SP)
    assert not np.isnan(r.log_weights).any() and not np.isnan(r.weights).any() and not np.isnan(r.scores).any()
    assert r.weights.sum() == pytest.approx(1.0) and math.isfinite(r.log_evidence)
    alive = [s for s in r.samples if s.alive]
    assert alive and all(s.values == {"x": "b\n"} for s in alive)
    dead = [s for s in r.samples if not s.alive]
    assert dead, "the 'a' path should kill some particles (they die on the hole's last step: nothing to resample)"
    assert all(s.weight == 0 and s.log_weight == -math.inf and "budget" in s.cause for s in dead)
    assert r.log_evidence == pytest.approx(exact.log_z, abs=1.0)


@pytest.mark.parametrize(
    "start, observe, host, where, why",
    [
        ("only_a", (SP,), None, "hole 'x' at death.lmp:2:5", "budget"),
        ("bos", (SP,), None, "hole 'x' at death.lmp:2:5", "constraint allowed no token"),
        ("mixed", (BOS,), None, "observe at death.lmp:3:1", "observed text had probability 0"),
        ("mixed", (SP,), lambda view: np.full(len(view), -np.inf), "host step at death.lmp:4:1", "condition"),
    ],
    ids=["budget", "constraint", "observe", "condition"],
)
def test_every_particle_dead_raises_naming_the_source(lm, start, observe, host, where, why):
    with pytest.raises(InferenceError) as info:
        run(lm, _prog(STARTS[start], observe, host), Importance(particles=32), seed=0)
    msg = str(info.value)
    assert where in msg and why in msg, msg
    assert info.value.label in msg and sum(info.value.causes.values()) == 32


def test_branches_skip_holes_per_particle(lm):
    """A callable start gives particles different automata (or none: -1 skips the hole)."""
    starts = np.array([STARTS["letters"], -1] * 16)
    r = run(lm, _prog(lambda view: starts), Importance(particles=32), seed=4)
    for s in r.samples:
        if s.index % 2:
            assert "x" not in s.values and s.tokens == [SP]
        elif s.alive:  # (3 tokens do not fit every no-repeat word plus its newline: some die)
            assert s.values["x"].endswith("\n") and s.tokens[-1] == SP


# --------------------------------------------------------------------------------------------------
# Strategies, options, results
# --------------------------------------------------------------------------------------------------


def test_make_strategy_validates():
    assert make_strategy("smc", particles=8, ess=0.25, resample="residual") == SMC(particles=8, ess=0.25, resample="residual")
    assert make_strategy("importance", 5).particles == 5
    assert make_strategy("sample", 3).properly_weighted is False
    with pytest.raises(ValueError, match="valid: sample, greedy, importance, smc, beam, best_of, vote"):
        make_strategy("mcmcc")
    with pytest.raises(ValueError, match="unknown argument.*particle\\b.*valid"):
        make_strategy("smc", particle=3)
    with pytest.raises(ValueError, match="resample"):
        make_strategy("smc", resample="fancy")
    with pytest.raises(ValueError, match="ess must be in"):
        make_strategy("smc", ess=2)
    with pytest.raises(ValueError, match="temperature"):
        make_strategy("sample", temperature=0)
    with pytest.raises(ValueError, match="score must be a callable"):
        make_strategy("best_of", n=3)


def test_program_validation_and_context_limit():
    with pytest.raises(ValueError, match="unique"):
        SegmentProgram([Hole("x"), Hole("x")], TABLE)
    with pytest.raises(ValueError, match="max_tokens"):
        Text(render=lambda v: [])
    small = ToyLM(rich_case()[0].table, rich_case()[0].tokenizer, context=2, max_context=4)
    with pytest.raises(ValueError, match="needs up to .* tokens of context"):
        run(small, _prog(STARTS["mixed"]), Importance(particles=2))


def test_result_from_the_engine_is_json(lm):
    raw = run(lm, _prog(STARTS["letters"]), Importance(particles=32), seed=1)
    out = json.loads(Result.from_inference(raw, lambda s: dict(s.values), {}).to_json())
    assert set(out) >= {"strategy", "properly_weighted", "samples", "posterior", "log_evidence", "ess", "stats"}
    assert out["strategy"] == "importance" and out["properly_weighted"] is True
    assert sum(p["probability"] for p in out["posterior"]) == pytest.approx(1.0)
    probs = [p["probability"] for p in out["posterior"]]
    assert probs == sorted(probs, reverse=True)
    assert out["stats"]["forward_passes"] > 0 and out["stats"]["tokens"] > 0
    assert all(s["text"].startswith(s["values"]["x"][:1]) for s in out["samples"])
