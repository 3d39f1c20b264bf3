"""The host matcher (context-free ``json()`` / ``grammar()`` holes through llguidance): path selection, the mask
against independent enumeration, posterior and evidence of the weighted strategies, host vs device on a regular
grammar, resampling at every step, MCMC, and samples that parse / validate (docs/constraints.md, "The host path").
"""

from __future__ import annotations

import functools
import json
import math
import re

import jsonschema
import lark
import numpy as np
import pytest

from _inference_cases import ALPHA, chi_square_pvalue, sir_draws, z_score_of_mean
from lmprog.backends.toy import ToyLM
from lmprog.compiler.constraint_ir import Count, Grammar, JsonSchema
from lmprog.compiler.constraints import CompiledHole, compile_hole
from lmprog.compiler.host_hole import HostHole, stack_compiled
from lmprog.inference import MCMC, SMC, Hole, Importance, SegmentProgram, Text, run
from lmprog.inference.exact import enumerate_program

PARENS = 'start: "(" start ")" | "x"\n'
PAREN_VOCAB = ("<bos>", "<eos>", "(", ")", "x", "()", "(x", ")\n", "\n", "x)")
JSON_VOCAB = ("<bos>", "<eos>", "[", "]", "[]", ", ", ",", "[[", "]]")
NESTED = {"type": "array", "items": {"$ref": "#"}}  # arrays of arrays: context-free
BUDGET = 5


def _program(lm, constraints, following, budget, path=None):
    hole = compile_hole(constraints, lm.tokenizer, following_text=following, name="x", cache=False, path=path)
    table, starts = stack_compiled([hole], lm.tokenizer)
    prog = SegmentProgram([Text((0,)), Hole("x", start=starts[0], max_tokens=budget, value=hole.value_rule,
                                            label="t:1: x", path=getattr(hole, "path", "device"))], table)
    return hole, prog


@functools.cache
def parens_case():
    lm = ToyLM.random(PAREN_VOCAB, context=1, positions=12, seed=3, scale=1.0)
    return (lm,) + _program(lm, [Grammar("p.lark", PARENS), Count("tokens", "<=", BUDGET)], "\n", BUDGET)


@functools.cache
def json_case():
    lm = ToyLM.random(JSON_VOCAB, context=1, positions=12, seed=7, scale=1.0)
    return (lm,) + _program(lm, [JsonSchema("n.json", json.dumps(NESTED))], None, BUDGET)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def brute_force(lm, complete, viable, budget):
    """Every token sequence of at most ``budget`` tokens that ``complete`` accepts (``viable`` prunes prefixes),
    with its log-probability under the toy LM after BOS: independent of the matcher."""
    tok = lm.tokenizer
    out = {}

    def go(seq, lp):
        if seq and complete(seq):
            out[tuple(seq)] = lp
            return
        if len(seq) == budget:
            return
        logp = _log_softmax(lm.host_logits((0,) + tuple(seq)))
        for t in range(len(tok.token_bytes)):
            s2 = seq + [t]
            if logp[t] > -math.inf and viable(s2):
                go(s2, lp + float(logp[t]))

    go([], 0.0)
    return out


def parens_reference(lm, language=False):
    """The budgeted target by brute force (``language``: also the independent ``viable``/``complete`` tests)."""
    tok = lm.tokenizer
    parser = lark.Lark(PARENS)

    def text(seq):
        return None if any(t in tok.special_ids for t in seq) else tok.decode_bytes(seq).decode()

    def viable(seq):  # a prefix of "(" * k + "x" + ")" * k + "\n"
        s = text(seq)
        if s is None or not re.fullmatch(r"\(*(x\)*)?\n?", s) or s.count(")") > s.count("("):
            return False
        return "\n" not in s or (s.endswith("\n") and "x" in s and s.count(")") == s.count("("))

    def complete(seq):
        s = text(seq)
        if s is None or not s.endswith("\n") or s.index("\n") != len(s) - 1 or not viable(seq):
            return False
        parser.parse(s[:-1])  # (raises if not a sentence)
        return True

    ref = brute_force(lm, complete, viable, BUDGET)
    return (ref, viable, complete) if language else ref


def json_reference(lm):
    tok = lm.tokenizer
    eos = tok.eos_ids[0]

    def complete(seq):
        if seq[-1] != eos or any(t in tok.special_ids for t in seq[:-1]):
            return False
        s = tok.decode_bytes(seq[:-1]).decode()
        try:
            v = json.loads(s)
        except ValueError:
            return False
        jsonschema.validate(v, NESTED)
        return json.dumps(v) == s  # the host path's whitespace: json.dumps separators

    return brute_force(lm, complete, lambda seq: eos not in seq[:-1], BUDGET)


def _check_exact(exact, reference):
    probs = {p.tokens: p.log_prob for p in exact.paths}
    assert set(probs) == set(reference)
    for k, lp in reference.items():
        assert probs[k] == pytest.approx(lp, abs=1e-5)


# ------------------------------------------------------------------------------------------------ paths


def test_recursive_languages_take_the_host_path_and_regular_ones_the_device():
    lm = parens_case()[0]
    assert isinstance(compile_hole([Grammar("p.lark", PARENS)], lm.tokenizer, cache=False), HostHole)
    flat = Grammar("f.lark", 'start: "(" "x" ")" | "x"\n')
    assert isinstance(compile_hole([flat], lm.tokenizer, cache=False), CompiledHole)
    assert isinstance(compile_hole([flat], lm.tokenizer, cache=False, path="host"), HostHole)
    jl = json_case()[0]
    assert isinstance(compile_hole([JsonSchema("n.json", json.dumps(NESTED))], jl.tokenizer, cache=False), HostHole)


def test_run_reports_the_path_of_every_hole():
    lm, _, prog = parens_case()
    r = run(lm, prog, Importance(particles=8), seed=0)
    assert r.stats["constraint_paths"] == {"x": "host"}
    assert r.stats["host_matcher"]["masks"] > 0


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("case,reference", [(parens_case, parens_reference), (json_case, json_reference)],
                         ids=["parens", "json"])
def test_mask_allows_exactly_the_completable_tokens(case, reference):
    """Enumerating through the host mask finds exactly the complete sequences found by brute force (with an
    independent definition of the language), with the same probabilities."""
    lm, _, prog = case()
    ref = reference(lm)
    assert len(ref) >= 5
    _check_exact(enumerate_program(lm, prog, max_tokens=BUDGET), ref)


def test_budget_mask_is_viability_plus_the_last_token_rule():
    """What the host mask is under ``tokens(X) <= N`` (docs/constraints.md, "The token budget on the host path"):
    exactly the tokens after which the hole can still be completed *with any number of tokens* (checked against
    an independent definition of the language at every prefix), restricted to tokens that end the hole on the
    N-th token. That is a superset of the tokens that can complete *within* the budget — every prefix of every
    sequence of the budgeted target is allowed, so the target keeps its support and the weights stay proper —
    and a strict one: some allowed prefixes cannot finish in time, and particles that take them die (weight 0)."""
    lm, _, prog = parens_case()
    target, viable, complete = parens_reference(lm, language=True)
    _, pool = prog.table.bind()
    v = len(lm.tokenizer.token_bytes)
    prefixes_of_target = {seq[:k] for seq in target for k in range(len(seq))}
    strict = 0

    def visit(seq, state):
        nonlocal strict
        packed = pool.masks(np.array([state]), np.array([len(seq)]), np.array([BUDGET]))
        mask = np.unpackbits(packed.view(np.uint8), bitorder="little")[:v].astype(bool)
        last = len(seq) + 1 == BUDGET
        want = [viable(seq + [t]) and (not last or complete(seq + [t])) for t in range(v)]
        assert mask.tolist() == want, seq
        in_time = {s[len(seq)] for s in target if s[: len(seq)] == tuple(seq)}
        assert in_time <= set(np.flatnonzero(mask).tolist())  # every prefix of the target is allowed
        strict += len(set(np.flatnonzero(mask).tolist()) - in_time)
        for t in np.flatnonzero(mask).tolist():
            child = int(pool.step(np.array([state]), np.array([t]))[0])
            if (child - pool.base) % 2 == 0:
                visit(seq + [t], child)

    visit([], pool.start(0))
    assert () in prefixes_of_target and strict > 0
    r = run(lm, prog, Importance(particles=N), seed=1, groups=50)
    assert np.isneginf(np.asarray(r.log_weights)).any()  # the particles that took such a prefix died


G, N = 400, 32


@pytest.mark.parametrize("case,ref,n", [(parens_case, parens_reference, N), (json_case, json_reference, 4 * N)],
                         ids=["parens", "json"])
def test_importance_posterior_and_evidence(case, ref, n):
    """Particles that cannot finish within the budget die (the mask knows viability, not the budget), so the
    draws need more particles per group for the same O(1/N) resampling bias where many die (json)."""
    lm, _, prog = case()
    reference = ref(lm)
    z = sum(math.exp(v) for v in reference.values())
    probs = {k: math.exp(v) / z for k, v in reference.items()}
    r = run(lm, prog, Importance(particles=n), seed=11, groups=G)
    assert chi_square_pvalue(sir_draws(r, 1), probs) > ALPHA
    assert abs(z_score_of_mean(np.exp(r.log_z), z)) < 4


def test_smc_resampling_at_every_step_is_exact():
    lm, _, prog = parens_case()
    reference = parens_reference(lm)
    z = sum(math.exp(v) for v in reference.values())
    probs = {k: math.exp(v) / z for k, v in reference.items()}
    r = run(lm, prog, SMC(particles=N, ess=1.0, resample="multinomial"), seed=5, groups=G)
    assert r.resampled.any()
    assert chi_square_pvalue(sir_draws(r, 2), probs) > ALPHA
    assert abs(z_score_of_mean(np.exp(r.log_z), z)) < 4


def test_host_and_device_agree_on_a_regular_grammar():
    lm = ToyLM.random(context=1, positions=12, seed=4, scale=1.0)
    g = Grammar("w.lark", 'start: WORD (" " WORD)*\nWORD: /[ab]+/\n')
    _, dev = _program(lm, [g], "\n", 4, path="device")
    hole, host = _program(lm, [g], "\n", 4, path="host")
    assert isinstance(hole, HostHole)
    ed, eh = enumerate_program(lm, dev, max_tokens=4), enumerate_program(lm, host, max_tokens=4)
    _check_exact(eh, {p.tokens: p.log_prob for p in ed.paths})
    r = run(lm, host, SMC(particles=N, ess=0.5), seed=3, groups=G)
    assert chi_square_pvalue(sir_draws(r, 3), ed.probs()) > ALPHA
    assert abs(z_score_of_mean(np.exp(r.log_z), ed.z)) < 4


def test_mcmc_suffix_moves_on_a_host_hole():
    """Suffix moves cut inside the hole and restore the matcher state recorded in the trace (a pool index)."""
    lm, _, prog = parens_case()
    probs = enumerate_program(lm, prog, max_tokens=BUDGET).probs()
    steps = 20
    res = run(lm, prog, MCMC(steps=steps, chains=300, burn_in=steps - 1, move="suffix", particles=2), seed=11)
    kept = int(res.extra["kept"])
    final = [res.sequences(g)[c * kept + kept - 1] for g in range(res.groups) for c in range(int(res.extra["chains"]))]
    assert chi_square_pvalue(final, probs) > ALPHA
    assert 0.0 < res.extra["acceptance"].mean() < 1.0


def test_samples_parse_and_validate():
    lm, hole, prog = parens_case()
    parser = lark.Lark(PARENS)
    r = run(lm, prog, Importance(particles=64), seed=2)
    for s in r.samples:
        if s.log_weight > -math.inf:
            parser.parse(s.values["x"])
    lm, hole, prog = json_case()
    r = run(lm, prog, Importance(particles=64), seed=2)
    for s in r.samples:
        if s.log_weight > -math.inf:
            jsonschema.validate(json.loads(s.values["x"]), NESTED)


def test_a_program_with_a_recursive_grammar_runs_end_to_end(tmp_path):
    """From .lmp source: the checker accepts the recursive grammar, the hole takes the host path, every sample
    parses with lark, and the posterior equals the enumeration of the lowered program (same LM)."""
    from lmprog.compiler.lower import lower
    from lmprog.program import Program

    lm = parens_case()[0]
    (tmp_path / "p.lark").write_text(PARENS)
    src = 'infer smc(particles=64, ess=0.5)\n"[x]\\n" where grammar(x, "p.lark") and tokens(x) <= 5\nreturn x\n'
    program = Program(src, "t.lmp", base_dir=tmp_path)
    result = program.run(lm=lm, seed=4)
    assert result.stats["constraint_paths"] == {"x": "host"}
    parser = lark.Lark(PARENS)
    for s in result.samples:
        parser.parse(s.values["x"])
    exact = enumerate_program(lm, lower(program, lm.tokenizer, {}, default_max_tokens=5).program).probs()
    support = {lm.tokenizer.decode(list(seq)).split("\n")[0] for seq in exact}  # each sequence's value
    assert result.posterior and {v["x"] for v, _ in result.posterior} <= support


# ------------------------------------------------------------------------------------------------ pool memory


@pytest.mark.parametrize("strategy", [SMC(particles=32, ess=1.0, resample="multinomial"),
                                      MCMC(steps=12, chains=16, burn_in=2, move="suffix", particles=2)],
                         ids=["smc", "mcmc"])
def test_freeing_pool_states_changes_no_result(monkeypatch, strategy):
    """States no particle uses are freed (matchers, masks, children memos); a freed state used again (an MCMC
    trace restored by a suffix move) is rebuilt from its lineage. The run is the same, draw for draw, as one that
    never frees, while the states holding matchers stay few."""
    from lmprog.automata.host import HostPool

    lm, _, prog = parens_case()
    runs = {}
    for hold in (1 << 30, 2):
        monkeypatch.setattr(HostPool, "HOLD_MIN", hold)
        monkeypatch.setattr(HostPool, "RECENT", 1)
        runs[hold] = run(lm, prog, strategy, seed=3, groups=4)
    keep, free = runs[1 << 30], runs[2]
    np.testing.assert_array_equal(np.asarray(keep.log_weights), np.asarray(free.log_weights))
    assert [keep.sequences(g) for g in range(4)] == [free.sequences(g) for g in range(4)]
    hk, hf = keep.stats["host_matcher"], free.stats["host_matcher"]
    assert hk["freed"] == 0 and hf["freed"] > 0
    if isinstance(strategy, MCMC):  # (a rebuilt state stepped again is a new state: more states, few held)
        assert hf["rebuilt"] > 0
    else:
        assert hf["held_max"] < hk["held_max"]
