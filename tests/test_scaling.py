"""Reward-guided step-wise search (issue 17): the exact step checker, step-level SMC with a process reward
against enumeration on a toy LM (each reward aggregation of docs/inference.md "Reward-guided search"), beam
scored by the reward, and the accuracy-vs-budget benchmark in its reduced mode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import lmprog
from lmprog.backends.toy import ToyLM
from lmprog.compiler.lower import Lowering
from lmprog.inference import SMC, Beam, Sampling, Vote, run
from lmprog.inference.exact import enumerate_program

from _inference_cases import z_score_of_mean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import arith_steps  # noqa: E402

# --------------------------------------------------------------------------------------------- the checker


def test_step_checker_verdicts():
    q = "7 + 5 - 3 + 9"
    assert arith_steps.reference_steps(q) == ["7 + 5 = 12", "12 - 3 = 9", "9 + 9 = 18"]
    assert arith_steps.step_correct(q, 0, "7 + 5 = 12")
    assert arith_steps.step_correct(q, 1, " 12  - 3 = 9")  # spacing does not matter
    assert not arith_steps.step_correct(q, 0, "7 + 5 = 13")  # wrong result
    assert not arith_steps.step_correct(q, 1, "12 + 3 = 15")  # right arithmetic, wrong operator
    assert not arith_steps.step_correct(q, 1, "13 - 3 = 10")  # continues a mistake: still wrong
    assert not arith_steps.step_correct(q, 3, "18 + 0 = 18")  # no such step
    assert arith_steps.step_logreward(q, 2, "9 + 9 = 18") == 0.0
    assert arith_steps.step_logreward(q, 2, "9 + 9 = 19", penalty=2.5) == -2.5
    assert arith_steps.answer(["7 + 5 = 12", "12 - 3 = 9", "9 + 9 = 18"]) == "18"
    assert arith_steps.answer(["7 + 5 = 12", "no step"]) == ""
    assert arith_steps.solved(q, "18") and not arith_steps.solved(q, "17")


def test_problems_are_fixed_distinct_and_in_range():
    probs = arith_steps.make_problems(100, seed=0)
    assert probs == arith_steps.make_problems(100, seed=0)
    assert probs != arith_steps.make_problems(100, seed=1)
    assert len({p["question"] for p in probs}) == 100
    for p in probs:
        nums, ops = arith_steps.parse(p["question"])
        assert len(nums) == 4 and len(ops) == 3
        assert p["answer"] == str(eval(p["question"]))  # left to right, + and - only
        assert all(0 <= int(s.split(" = ")[1]) <= 40 for s in p["steps"])


# ------------------------------------------------------------------- step-level SMC against enumeration

TOY_VOCAB = ("<bos>", "<eos>", "1", "2", "=", "\n", " ")
#: Two steps, each "x=y" with x, y in {1, 2}, ended by a newline; the correct steps are "1=2" then "2=1".
TOY_PROGRAM = """
input agg: str = "product"
input penalty: float = 1.5
"=\\n"
let score = 0.0
for i in range(2):
    "[step]\\n" where step matches r"[12]=[12]"
    let r = check(i, step, penalty)
    if agg == "product":
        let new = score + r
    elif agg == "min":
        let new = min(score, r)
    else:
        let new = r
    factor new - score
    let score = new
return step
"""


def _check(i, step, penalty):
    return 0.0 if step == ("1=2", "2=1")[int(i)] else -float(penalty)


def _toy_lowered(agg: str, penalty: float = 1.5):
    lm = ToyLM.random(TOY_VOCAB, context=2, positions=16, seed=7, scale=1.5, name="toy-steps")
    prog = lmprog.compile(TOY_PROGRAM, "steps.lmp", functions={"check": _check})
    low = Lowering(prog, lm.tokenizer, {"agg": agg, "penalty": penalty}, 0, 256).run()
    return lm, low


def _aggregate(agg: str, rewards: list[float]) -> float:
    return {"product": sum, "min": lambda r: min(0.0, *r), "last": lambda r: r[-1]}[agg](rewards)


@pytest.mark.parametrize("agg", ["product", "min", "last"])
def test_step_rewards_telescope_to_the_aggregated_reward(agg):
    """The factors ``new - score`` add up to the aggregation R_T (log): the exact target is p_LM x exp(R_T)."""
    lm, low = _toy_lowered(agg)
    _, flat = _toy_lowered(agg, penalty=0.0)  # no reward: p_LM alone
    exact, base = enumerate_program(lm, low.program), enumerate_program(lm, flat.program)
    assert len(exact.paths) == 16
    lm_only = {p.tokens: p.log_prob for p in base.paths}
    for p in exact.paths:
        steps = lm.tokenizer.decode(list(p.tokens)).split("\n")[:2]
        reward = _aggregate(agg, [_check(i, s, 1.5) for i, s in enumerate(steps)])
        assert p.log_prob - lm_only[p.tokens] == pytest.approx(reward, abs=1e-6), (steps, agg)


@pytest.mark.parametrize("agg", ["product", "min", "last"])
def test_step_level_smc_with_an_exact_reward_matches_enumeration(agg):
    """SMC that resamples on the step rewards targets p_LM x exp(R_T) exactly: over 500 independent groups,
    the mean of ``exp(log_weight) / N`` summed over the particles on a sequence is unbiased for that sequence's
    unnormalized target (every sequence with >= 2 % of the mass, and their total, Z); the rewards make it
    resample (between steps) in most groups (with the steps' finite holes enumerated, ``enumerate=True``: the
    weights then differ by the rewards, not by proposal noise, so the ESS rule resamples in most groups)."""
    lm, low = _toy_lowered(agg)
    exact = enumerate_program(lm, low.program)
    groups, n = 500, 16
    r = run(lm, low.program, SMC(particles=n, ess=0.5, resample="systematic", enumerate=True), seed=3, groups=groups)
    assert r.resampled.any(axis=0).mean() > 0.5
    w = np.exp(np.asarray(r.log_weights, np.float64)) / n  # [G, N]
    seqs = [[tuple(int(t) for t in r.tokens[g, i, : r.lengths[g, i]]) for i in range(n)] for g in range(groups)]
    gamma = {p.tokens: math.exp(p.log_prob) for p in exact.paths}
    big = [k for k, v in gamma.items() if v / exact.z >= 0.02]
    assert len(big) >= 4
    for k in big:
        est = np.array([sum(w[g, i] for i in range(n) if seqs[g][i] == k) for g in range(groups)])
        z = z_score_of_mean(est, gamma[k])
        assert abs(z) < 4.5, (lm.tokenizer.decode(list(k)), est.mean(), gamma[k], z)
    assert abs(z_score_of_mean(w.sum(axis=1), exact.z)) < 4.5


def test_beam_is_scored_by_the_reward():
    """A beam as wide as the program's sequences returns the exact best of p_LM x exp(R_T), which the reward
    moves away from the LM's own best sequence."""
    lm, low = _toy_lowered("product", penalty=6.0)
    _, flat = _toy_lowered("product", penalty=0.0)
    best, lm_best = enumerate_program(lm, low.program).best(), enumerate_program(lm, flat.program).best()
    assert best.tokens != lm_best.tokens  # the reward matters here
    r = run(lm, low.program, Beam(width=16), seed=0)
    top = int(np.argmax(r.log_weights[0]))
    assert tuple(int(t) for t in r.tokens[0, top, : r.lengths[0, top]]) == best.tokens
    assert r.log_weights[0, top] == pytest.approx(best.log_prob, abs=1e-4)


def test_unweighted_vote_is_self_consistency():
    """``vote(weighted=false)`` draws ``sample(n)`` and gives every sample one vote (the rewards, which weight
    ``vote``'s default importance base, do not count); the weighted vote's tally differs on the same program."""
    lm, low = _toy_lowered("product", penalty=6.0)
    key = lambda s: s.values["step[1]"]  # noqa: E731
    plain = Vote(n=32, key=key, weighted=False)
    assert isinstance(plain.base_strategy(), Sampling) and not plain.properly_weighted
    r = run(lm, low.program, plain, seed=2)
    alive = [s for s in r.samples if s.alive]
    counts = {}
    for s in alive:
        counts[key(s)] = counts.get(key(s), 0) + 1
    assert dict(r.extra["vote"]) == pytest.approx({k: c / len(alive) for k, c in counts.items()})
    assert r.log_z is None
    weighted = run(lm, low.program, Vote(n=32, key=key), seed=2)
    assert dict(weighted.extra["vote"]) != pytest.approx(dict(r.extra["vote"]))


# ------------------------------------------------------------------------------- the benchmark, reduced


def test_benchmark_quick_mode_runs(tmp_path):
    """``bench_scaling.py --quick`` on a tiny random model: every strategy answers every problem, accuracies
    are fractions in [0, 1] inside their intervals, and the JSON has one record per problem and run."""
    import bench_scaling

    out = tmp_path / "s.json"
    data = bench_scaling.main(["--quick", "--model", "tiny", "--out", str(out), "--png", str(tmp_path / "s.png")])
    saved = json.loads(out.read_text())
    assert saved["runs"] == data["runs"] and saved["meta"]["problems"] == 2
    runs = list(saved["runs"].values())
    assert sorted((r["family"], r["problem"]) for r in runs) == sorted(
        (f, p) for f in ("importance", "smc", "beam", "pg") for p in (0, 1))
    for r in runs:
        assert r["budget"] == 8 and r["tokens"] > 0 and r["wall_s"] > 0
        if r["family"] == "importance":
            assert 0 < len(r["particles"]) <= 8
            assert all(set(p) == {"answer", "reward", "log_weight"} and p["reward"] <= 0 for p in r["particles"])
        else:
            assert set(r["answers"]) == set(r["correct"]) == {r["family"]}
            assert isinstance(r["correct"][r["family"]], bool)
    rows = bench_scaling.summarize(saved)
    assert {r["strategy"] for r in rows} == set(bench_scaling.STRATEGIES) - {"greedy"}
    for row in rows:
        assert row["budget"] == 8 and row["problems"] == 2
        assert 0.0 <= row["ci"][0] <= row["accuracy"] <= row["ci"][1] <= 1.0
    assert bench_scaling.wilson(0, 10)[0] == 0.0 and bench_scaling.wilson(10, 10)[1] == 1.0
    lo, hi = bench_scaling.wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)


def test_importance_blocks_give_each_strategy_its_answer():
    """The three importance-based strategies on hand-made particles (two blocks of 3)."""
    import bench_scaling

    parts = [{"answer": a, "reward": rw, "log_weight": lw} for a, rw, lw in
             [("5", -4.0, -9.0), ("5", -4.0, -9.0), ("7", 0.0, -5.0),  # majority 5; weighted and best: 7
              ("1", 0.0, -1.0), ("2", -8.0, -0.5), ("2", -8.0, -0.5)]]  # weighted 2 (2 x 1 vs 0.61)
    blocks = bench_scaling.importance_answers(parts, 3)
    assert blocks == [{"majority": "5", "weighted": "7", "best_of": "7"},
                      {"majority": "2", "weighted": "2", "best_of": "1"}]
    assert len(bench_scaling.importance_answers(parts, 6)) == 1 and len(bench_scaling.importance_answers(parts, 4)) == 1
