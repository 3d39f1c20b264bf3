"""Rolling suffix moves (issue 12 item 6): every chain makes its own ``steps`` moves, one after another, without
waiting for the batch's slowest regeneration, each chain at its own place in the program
(:mod:`lmprog.inference.rolling`).

Statistical tests and their failure rates (for a random seed; the seeds are fixed, so the suite is
deterministic): chi-square goodness of fit at ``ALPHA = 1e-3`` against the exact posterior by enumeration
(Bonferroni over the moves where several are tested). The cases are built so that chains' moves take very
different numbers of LM steps: a hole of 1 to 8 letters ended by EOS, whose proposals are long or short
depending on the state, so a schedule or a recording rule that depended on how long moves take would show
in the distribution of lengths.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from _inference_cases import (ALPHA, BOS, EOS, NL, SP, A, B, C, V, chi_square_pvalue, host_case, letters_then_eos,
                              rich_case)
from lmprog.backends.toy import ToyLM
from lmprog.compiler.automaton import Automaton, stack_automata
from lmprog.automata.values import ValueRule
from lmprog.inference import Hole, SegmentProgram, Text, enumeration, moves, run
from lmprog.inference.exact import enumerate_program
from lmprog.inference.strategies import MCMC


def long_case():
    """A hole of 1 to 8 letters then EOS (``max_tokens=9``), lengths spread wide: after ``a`` the LM rarely
    stops, after ``b`` often. A suffix move cut near the start regenerates up to 9 tokens, one cut near the end
    1: chains finish their moves at very different steps."""

    def fn(pos, ctx):
        p = np.full(V, 1e-9)
        p[BOS] = 0.0
        p[A], p[B], p[C] = 0.45, 0.25, 0.05
        p[EOS] = {A: 0.06, B: 0.5, C: 0.3}.get(ctx[-1], 0.0)
        with np.errstate(divide="ignore"):
            return np.log(p / p.sum())

    lm = ToyLM.from_fn(fn, context=1, positions=14, name="toy-long")
    table, offs = stack_automata([letters_then_eos()])
    prog = SegmentProgram([Text((BOS, SP)), Hole("x", start=offs[0], max_tokens=9, label="long:1:1: x")], table)
    return lm, prog


def deadly_case():
    """One letter then ``\\n``; after ``c`` the LM gives ``\\n`` probability 0, so proposals through ``c`` die
    inside the (last) hole and must be rejected there."""

    def fn(pos, ctx):
        p = np.full(V, 1e-9)
        p[BOS] = 0.0
        last = ctx[-1]
        if last in (BOS, SP):
            p[A], p[B], p[C] = 0.2, 0.3, 0.5
        elif last == A:
            p[NL] = 0.5
        elif last == B:
            p[NL] = 0.1
        elif last == C:
            p[NL] = 0.0
        with np.errstate(divide="ignore"):
            return np.log(p / p.sum())

    ns = -np.ones((3, V), np.int32)
    ns[0, [A, B, C]] = 1
    ns[1, NL] = 2
    lm = ToyLM.from_fn(fn, context=1, positions=8, name="toy-deadly")
    table, offs = stack_automata([Automaton(ns, np.array([False, False, True]), 0)])
    prog = SegmentProgram([Text((BOS,)), Hole("x", start=offs[0], max_tokens=3, value=ValueRule(stop=b"\n"),
                                             label="deadly:1:1: x")], table)
    return lm, prog


def per_move_states(result) -> list[list[tuple]]:
    """``out[k]``: the state of every chain after its ``k``-th kept move."""
    kept, chains = int(result.extra["kept"]), int(result.extra["chains"])
    seqs = result.sequences(0)
    return [[seqs[c * kept + k] for c in range(chains)] for k in range(kept)]


@pytest.fixture(scope="module")
def long():
    lm, prog = long_case()
    return lm, prog, enumerate_program(lm, prog).probs()


def lengths_of(probs: dict) -> dict:
    out: dict = {}
    for k, p in probs.items():
        out[len(k)] = out.get(len(k), 0.0) + p
    return out


def test_rolling_chains_with_unequal_moves_reach_the_posterior(long):
    lm, prog, probs = long
    res = run(lm, prog, MCMC(steps=60, chains=1000, burn_in=59), seed=21)
    assert res.extra["walks"] == 1  # every site is in the last hole: one walk, chains roll
    finals = per_move_states(res)[-1]
    p = chi_square_pvalue(finals, probs)
    assert p > ALPHA, f"chi-square p-value {p:.2e}"
    p_len = chi_square_pvalue([len(s) for s in finals], lengths_of(probs))
    assert p_len > ALPHA, f"lengths: chi-square p-value {p_len:.2e}"


def exact_draws(probs: dict, n: int, seed: int) -> list:
    """``n`` i.i.d. draws from the exact posterior ``probs`` (chains started at stationarity)."""
    keys = list(probs)
    w = np.array([probs[k] for k in keys], np.float64)
    return [keys[i] for i in np.random.default_rng(seed).choice(len(keys), size=n, p=w / w.sum())]


def assert_exact_after_each_move(res, probs: dict, start: list, moves: int) -> None:
    """Chains started from exact draws: after each of their ``moves`` moves the states fit ``probs`` (chi-square
    at ``ALPHA / moves``, Bonferroni), and they did move."""
    states = per_move_states(res)
    assert len(states) == moves and states[-1] != start
    for k, after in enumerate(states):
        p = chi_square_pvalue(after, probs)
        assert p > ALPHA / moves, f"after move {k + 1}: chi-square p-value {p:.2e}"


def test_every_recorded_move_of_rolling_chains_keeps_the_posterior(long):
    """Chains started from exact posterior draws stay exact after *each* of their moves, although the moves of
    different chains end at different LM steps (a record taken at a fixed LM step would favour states whose
    moves are quick). Each of the 6 moves is tested on full sequences and on lengths (Bonferroni: 12 tests)."""
    lm, prog, probs = long
    start = exact_draws(probs, 1000, seed=3)
    res = MCMC(steps=6, chains=1000, burn_in=0).run(lm, prog, key=jax.random.key(8), init=start)
    states = per_move_states(res)
    assert len(states) == 6 and states[-1] != start
    for k, after in enumerate(states):
        p = chi_square_pvalue(after, probs)
        p_len = chi_square_pvalue([len(s) for s in after], lengths_of(probs))
        assert min(p, p_len) > ALPHA / 12, f"after move {k + 1}: p-values {p:.2e} (sequences), {p_len:.2e} (lengths)"


def test_proposals_dying_in_the_last_hole_are_rejected_there():
    lm, prog = deadly_case()
    probs = enumerate_program(lm, prog).probs()
    assert len(probs) == 2  # "a\n", "b\n": every execution through "c" dies
    res = run(lm, prog, MCMC(steps=20, chains=1000, burn_in=19), seed=4)
    assert np.all(res.causes == 0)
    p = chi_square_pvalue(per_move_states(res)[-1], probs)
    assert p > ALPHA, f"chi-square p-value {p:.2e}"


def _lm_calls(lm, prog, rolling: bool, monkeypatch, **kw) -> dict:
    monkeypatch.setattr(moves, "ROLLING", rolling)
    res = run(lm, prog, MCMC(**kw), seed=5)
    return {"calls": res.extra["move_lm_calls"], "walks": res.extra["walks"], "tokens": res.stats["tokens"]}


def test_rolling_moves_take_fewer_lm_calls_than_lock_step(long, monkeypatch):
    """64 chains, 12 moves each. In lock step a move step lasts as long as the longest of 64 regenerated
    suffixes (close to the 9-token maximum); rolling, each chain's moves follow one another and the run lasts
    about as long as the longest *sum* of a chain's suffix lengths (12 x about half a hole)."""
    lm, prog, _ = long
    kw = dict(steps=12, chains=64, burn_in=11)
    lock = _lm_calls(lm, prog, False, monkeypatch, **kw)
    roll = _lm_calls(lm, prog, True, monkeypatch, **kw)
    assert lock["walks"] == 12 and roll["walks"] == 1
    assert roll["calls"] < 0.75 * lock["calls"], (roll, lock)
    # per move and chain, a lock-step move costs several LM calls per regenerated token; rolling close to one
    assert roll["calls"] * 64 < 2.0 * roll["tokens"], roll


def test_lock_step_moves_stay_exact(long, monkeypatch):
    """The lock-step scheme (``moves.ROLLING = False``, kept for comparisons) on the same case."""
    lm, prog, probs = long
    monkeypatch.setattr(moves, "ROLLING", False)
    res = run(lm, prog, MCMC(steps=60, chains=1000, burn_in=59), seed=21)
    assert res.extra["walks"] == 60
    p = chi_square_pvalue(per_move_states(res)[-1], probs)
    assert p > ALPHA, f"chi-square p-value {p:.2e}"


@pytest.mark.parametrize("case", [rich_case, host_case])
def test_rolling_with_sites_before_the_last_hole_keeps_the_posterior(case):
    """Chains whose next cut is in an earlier hole, at observed text or at a host step go back there while the
    others go on elsewhere in the program (host data restored on rejection). Started from exact posterior
    draws, the chains must stay exact after each of 4 moves (Bonferroni: 4 tests)."""
    lm, prog = case()
    probs = enumerate_program(lm, prog).probs()
    start = exact_draws(probs, 1000, seed=1)
    res = MCMC(steps=4, chains=1000, burn_in=0).run(lm, prog, key=jax.random.key(2), init=start)
    assert res.extra["walks"] == 1
    assert_exact_after_each_move(res, probs, start, moves=4)
    if case is host_case:  # host data follows the kept states: the factor step stores the first letter of x
        for smp in res.samples:
            assert smp.data["first"] == smp.values["x"][:1]


@pytest.mark.parametrize("case, max_fed", [(rich_case, 20), (host_case, 10)])
def test_a_hole_run_on_its_own_while_other_chains_decode_keeps_the_posterior(case, max_fed, monkeypatch):
    """The last hole exactly enumerated (its trie is under ``TRACED_MAX_FED``), the first one not: chains arriving
    at the last hole run it at once while the chains inside the first are parked (``Kernels.hold`` /
    ``release``) and then go on. Started from exact draws, exact after each of 4 moves (Bonferroni: 4 tests)."""
    monkeypatch.setattr(enumeration, "TRACED_MAX_FED", max_fed)
    monkeypatch.setattr(enumeration, "MAX_ROWS", 1 << 20)
    lm, prog = case()
    probs = enumerate_program(lm, prog).probs()
    start = exact_draws(probs, 1000, seed=3)
    res = MCMC(steps=4, chains=1000, burn_in=0, enumerate=True).run(lm, prog, key=jax.random.key(4), init=start)
    first, last = prog.holes[0].name, prog.holes[-1].name
    assert last in res.stats["enumerated"] and first not in res.stats["enumerated"], res.stats["enumerated"]
    assert_exact_after_each_move(res, probs, start, moves=4)


def test_rolling_chains_in_different_holes_take_fewer_lm_calls_than_lock_step(monkeypatch):
    """64 chains, 8 moves each, on a two-hole program (``rich_case``: a hole of up to 5 tokens, observed text,
    a hole of up to 3): in lock step every move step walks from the earliest cut (nearly always in the first
    hole) to the end; rolling, a chain cut in the last hole regenerates only that while another regenerates
    both, and the chains reaching the observed text are fed together (``rolling.FLUSH``)."""
    lm, prog = rich_case()
    kw = dict(steps=8, chains=64, burn_in=7)
    lock = _lm_calls(lm, prog, False, monkeypatch, **kw)
    roll = _lm_calls(lm, prog, True, monkeypatch, **kw)
    assert lock["walks"] == 8 and roll["walks"] == 1
    assert roll["calls"] < 0.9 * lock["calls"], (roll, lock)


def test_rolling_costs_about_lock_step_where_every_move_is_about_as_long(monkeypatch):
    """``host_case``: short holes (up to 5 and 2 tokens) around a host step and per-chain text. With 64 chains
    nearly every lock step walk is as long as the program and so is nearly every chain's move: rolling gains
    no decode steps there, and its waiting rule keeps the text feeds it adds to a few (at most 20 % more LM
    calls than lock step)."""
    lm, prog = host_case()
    kw = dict(steps=8, chains=64, burn_in=7)
    lock = _lm_calls(lm, prog, False, monkeypatch, **kw)
    roll = _lm_calls(lm, prog, True, monkeypatch, **kw)
    assert roll["calls"] <= 1.2 * lock["calls"], (roll, lock)
