"""Toy programs with enumerable posteriors, and the statistics the inference tests use."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import stats

from lmprog.automata.values import ValueRule
from lmprog.backends.toy import DEFAULT_TOY_VOCAB, ToyLM
from lmprog.compiler.automaton import Automaton, stack_automata
from lmprog.compiler.automaton import stack_holes
from lmprog.compiler.constraint_ir import Count, Regex
from lmprog.compiler.constraints import compile_hole
from lmprog.inference import Hole, Host, Observe, SegmentProgram, Text

BOS, EOS, A, B, C, SP, NL = range(7)
LETTERS = (A, B, C)
assert DEFAULT_TOY_VOCAB[A] == "a" and DEFAULT_TOY_VOCAB[NL] == "\n"
V = len(DEFAULT_TOY_VOCAB)

#: Failure rate of every chi-square goodness-of-fit test below (for a random seed; seeds are fixed here).
ALPHA = 1e-3


def no_repeat_then_newline() -> Automaton:
    """Letters with no letter twice in a row, at least one, then ``\\n`` (final). State 0: start; state
    1 + i: last letter i; state 4: done."""
    ns = -np.ones((5, V), np.int32)
    for i, t in enumerate(LETTERS):
        ns[0, t] = 1 + i
        for j in range(3):
            if j != i:
                ns[1 + j, t] = 1 + i
    for j in range(3):
        ns[1 + j, NL] = 4
    return Automaton(ns, np.array([False, False, False, False, True]), 0)


def letters_then_eos() -> Automaton:
    """Any letters, ended by EOS (the hole's terminator is the end-of-sequence token)."""
    ns = -np.ones((2, V), np.int32)
    ns[0, list(LETTERS)] = 0
    ns[0, EOS] = 1
    return Automaton(ns, np.array([False, True]), 0)


def exactly_letters(n: int) -> Automaton:
    """Exactly ``n`` letters (``tokens(X) == n`` written as an unrolled automaton)."""
    ns = -np.ones((n + 1, V), np.int32)
    for i in range(n):
        ns[i, list(LETTERS)] = i + 1
    return Automaton(ns, np.arange(n + 1) == n, 0)


def one_letter_then_newline(letters=(A, B)) -> Automaton:
    ns = -np.ones((3, V), np.int32)
    ns[0, list(letters)] = 1
    ns[1, NL] = 2
    return Automaton(ns, np.array([False, False, True]), 0)


@functools.cache
def rich_case(seed: int = 3):
    """A trigram random LM; prompt, a hole whose terminator ``\n`` is in its automaton, observed text, a hole
    ended by EOS. 585 complete sequences."""
    lm = ToyLM.random(context=2, positions=16, seed=seed, scale=1.5)
    table, offs = stack_automata([no_repeat_then_newline(), letters_then_eos()])
    prog = SegmentProgram(
        [
            Text((BOS, SP)),
            Hole("x", start=offs[0], max_tokens=5, value=ValueRule(stop=b"\n"), label="case:2:1: x"),
            Observe((SP, A), label="case:3:1: observe"),
            Hole("y", start=offs[1], max_tokens=3, label="case:4:1: y"),
        ],
        table,
    )
    return lm, prog


@functools.cache
def bias_case():
    """Local masking is badly biased here: after ``a`` the LM almost never says ``\n`` (which the constraint
    requires), after ``b`` it usually does. Exact P(a) = 0.01 / 0.46 ~= 0.022; locally-constrained sampling
    gives 0.5."""

    def fn(pos, ctx):
        p = np.full(V, 1e-9)
        p[BOS] = 0.0
        last = ctx[-1]
        if last == BOS:
            p[A] = p[B] = 0.5
        elif last == A:
            p[NL], p[C] = 0.02, 0.98
        elif last == B:
            p[NL], p[C] = 0.9, 0.1
        else:
            p[:] = 1.0 / (V - 1)
            p[BOS] = 0.0
        with np.errstate(divide="ignore"):
            return np.log(p / p.sum())

    lm = ToyLM.from_fn(fn, context=1, positions=8, name="toy-bias")
    table, offs = stack_automata([one_letter_then_newline()])
    prog = SegmentProgram([Text((BOS,)), Hole("x", start=offs[0], max_tokens=3, value=ValueRule(stop=b"\n"), label="bias:1:1: x")], table)
    return lm, prog


@functools.cache
def host_case(seed: int = 5):
    """Holes compiled by the constraint compiler (a regex with a ``len`` bound and a ``\n`` terminator; a
    fixed-length ``tokens(y) == 2`` hole), a host factor + condition that also stores per-particle data, and
    per-particle rendered text that echoes it."""
    lm = ToyLM.random(context=1, positions=16, seed=seed, scale=1.5)
    hx = compile_hole([Regex("[abc]+"), Count("len", "<=", 2)], lm.tokenizer, following_text="\n", name="x", cache=False)
    hy = compile_hole([Count("tokens", "==", 2)], lm.tokenizer, name="y", cache=False)
    table, offs = stack_holes([hx, hy])

    def factor(view):
        out = []
        for i, vals in enumerate(view.values):
            x = vals.get("x", "")
            out.append(-math.inf if x == "b" else (math.log(3.0) if x.startswith("c") else 0.0))
            view.data[i]["first"] = x[:1]
        return np.array(out)

    def echo(view):
        return [[{"a": A, "b": B, "c": C}.get(d.get("first"), A), SP] for d in view.data]

    prog = SegmentProgram(
        [
            Text((BOS,)),
            Hole("x", start=offs[0], max_tokens=5, value=hx.value_rule, label="host:1: x"),
            Host(factor, label="host:2: factor"),
            Text(render=echo, max_tokens=2, label="host:3: echo"),
            Hole("y", start=offs[1], max_tokens=2, label="host:4: y"),
        ],
        table,
    )
    return lm, prog


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def sir_draws(result, seed: int = 0) -> list[tuple]:
    """One draw per group from that group's weighted particles (i.i.d. across groups)."""
    rng = np.random.default_rng(seed)
    w = np.asarray(result.weights, dtype=np.float64)  # float64: choice() checks sum(p) == 1 to ~1e-8
    out = []
    for g in range(result.groups):
        i = rng.choice(w.shape[1], p=w[g] / w[g].sum())
        out.append(tuple(int(t) for t in result.tokens[g, i, : result.lengths[g, i]]))
    return out


def chi_square_pvalue(draws: list, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson goodness of fit of ``draws`` to ``probs`` (categories with expected count < 5 pooled).
    A draw outside the support gives p-value 0."""
    m = len(draws)
    counts: dict = {}
    for d in draws:
        if d not in probs or probs[d] <= 0:
            return 0.0
        counts[d] = counts.get(d, 0) + 1
    obs, exp = [], []
    pool_o, pool_e = 0.0, 0.0
    for k, p in probs.items():
        e = m * p
        if e < min_expected:
            pool_o += counts.get(k, 0)
            pool_e += e
        else:
            obs.append(counts.get(k, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    obs, exp = np.array(obs, float), np.array(exp, float)
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(stats.chi2.sf(stat, df=len(obs) - 1))


def weighted_tv(result, probs: dict, pool: int = 1) -> np.ndarray:
    """Total variation between ``probs`` and the weighted particles of each block of ``pool`` consecutive
    groups, pooled with their absolute weights (``exp(log_weights)``, which carry each group's evidence).

    For importance sampling, ``pool`` independent groups of ``N`` particles pooled this way *are* one run
    with ``pool * N`` particles; for SMC they are ``pool`` independent islands."""
    out = []
    for g0 in range(0, result.groups - pool + 1, pool):
        lw = result.log_weights[g0 : g0 + pool].reshape(-1)
        with np.errstate(invalid="ignore"):
            w = np.exp(lw - lw.max())
        w = np.where(np.isfinite(lw), w, 0.0)
        w = w / w.sum()
        toks = result.tokens[g0 : g0 + pool].reshape(-1, result.tokens.shape[-1])
        lens = result.lengths[g0 : g0 + pool].reshape(-1)
        est: dict = {}
        for i in np.flatnonzero(w > 0):
            k = tuple(int(t) for t in toks[i, : lens[i]])
            est[k] = est.get(k, 0.0) + float(w[i])
        keys = set(est) | set(probs)
        out.append(0.5 * sum(abs(est.get(k, 0.0) - probs.get(k, 0.0)) for k in keys))
    return np.array(out)


def z_score_of_mean(samples: np.ndarray, target: float) -> float:
    samples = np.asarray(samples, np.float64)
    se = samples.std(ddof=1) / math.sqrt(len(samples))
    return float((samples.mean() - target) / se)


@functools.cache
def length_case():
    """Sequences of very different lengths (letters then EOS, 1 to 5 letters): the number of suffix-move
    sites varies a lot between executions, so a wrong site-count correction in the MH ratio shows."""

    def fn(pos, ctx):
        p = np.full(V, 1e-9)
        p[BOS] = 0.0
        p[A], p[B], p[C] = 0.3, 0.2, 0.1
        p[EOS] = 0.15 if ctx[-1] == A else 0.45
        with np.errstate(divide="ignore"):
            return np.log(p / p.sum())

    lm = ToyLM.from_fn(fn, context=1, positions=10, name="toy-length")
    table, offs = stack_automata([letters_then_eos()])
    prog = SegmentProgram([Text((BOS, SP)), Hole("x", start=offs[0], max_tokens=6, label="len:1:1: x")], table)
    return lm, prog
