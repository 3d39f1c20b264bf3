"""``logprob_of(TEXT, given=CONTEXT)`` and ``model judge = "..."``: LM rewards scored on the device in one batch.

What is checked: the scorer equals each model's own log-probabilities of the same token sequence (a toy LM
on the host, a tiny Llama through ``LlamaModel.logprobs``), with and without a shared prefix and in chunks; a
program's ``logprob_of`` and ``judge.logprob_of`` give those values (each under its own model); a host step
makes one batched call per model, never one per particle; a program with ``factor judge.logprob_of(...)`` hits
its exact target (by hand and by enumeration); errors are located (front end: ``tests/golden/errors/
logprob_of.lmp``; run time: a model that cannot be loaded, a request that cannot be scored).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lmprog
from lmprog.backends.scoring import Scorer, ScoreError, encode_request, scorer_for
from lmprog.backends.tiny import tiny_model
from lmprog.backends.toy import ToyLM
from lmprog.compiler.errors import OptionError, RunError
from lmprog.compiler.lower import lower
from lmprog.dsl.errors import LmpError
from lmprog.inference.exact import enumerate_program

VOCAB = ("<bos>", "<eos>", "a", "b", "c", " ", "\n", "Q", ":", "Y", "N", "?")


def toy(seed: int, context: int = 2) -> ToyLM:
    return ToyLM.random(VOCAB, context=context, positions=24, seed=seed, scale=1.0)


def toy_reference(lm: ToyLM, context: str, text: str) -> float:
    """``log p(text | context)`` from the toy's host table, float64, on the scorer's token sequence."""
    ids, n = encode_request(lm.tokenizer, context, text)
    total = 0.0
    for j in range(n, len(ids)):
        logits = lm.host_logits(ids[:j]).astype(np.float64)
        total += logits[ids[j]] - np.logaddexp.reduce(logits)
    return total


def llama_reference(lm, context: str, text: str) -> float:
    """The same from the model's own ``logprobs`` of the whole sequence (one row, no prefix, no batching)."""
    ids, n = encode_request(lm.tokenizer, context, text)
    lp = lm.logprobs(ids)
    return float(sum(lp[j - 1, ids[j]] for j in range(n, len(ids))))


def run(src, lm, **kw):
    return lmprog.compile(src, "t.lmp").run(lm=lm, **kw)


# ----------------------------------------------------------------------------------------------- the scorer


def test_encoding_concatenates_context_and_text_and_adds_bos():
    lm = toy(0)
    tok = lm.tokenizer
    ids, n = encode_request(tok, "ab", " c")
    assert ids == (tok.bos_id, *tok.encode("ab", add_bos=False), *tok.encode(" c", add_bos=False))
    assert n == 3
    assert encode_request(tok, "", "a") == ((tok.bos_id, tok.encode("a", add_bos=False)[0]), 1)
    byte_model = tiny_model(seed=0)  # a byte tokenizer without BOS
    assert encode_request(byte_model.tokenizer, "ab", "c").n == 2
    with pytest.raises(ScoreError, match="no BOS"):
        encode_request(byte_model.tokenizer, "", "c")


def test_scorer_equals_the_toy_lms_own_logprobs():
    lm = toy(3)
    reqs = [("ab ", "c"), ("ab c", "a b"), ("ab ", "c"), ("", "ab"), ("abc", ""), ("Q: a?", " Y"), ("Q: a?", " N")]
    sc = Scorer(lm)
    got = sc.score(reqs)
    want = [toy_reference(lm, c, t) for c, t in reqs]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[4] == 0.0  # empty text: log 1
    assert sc.batches == 1 and sc.rows == 5  # two duplicates and an empty text are not rows


def test_scorer_equals_the_tiny_llamas_own_logprobs_with_and_without_a_shared_prefix():
    lm = tiny_model(seed=1)
    shared = "The question is long enough to share: "
    with_prefix = [(shared + "x", " yes"), (shared + "yy", " no"), (shared, "z!")]
    sc = Scorer(lm)
    np.testing.assert_allclose(sc.score(with_prefix), [llama_reference(lm, c, t) for c, t in with_prefix],
                               atol=1e-4)
    assert sc.prefix_tokens > 0 and sc.forwards == 2  # the prefix prefilled once, then one block of rows
    distinct = [("a", "bc"), ("b", "cd")]  # no common prefix: no Prefix at all
    sc2 = Scorer(lm)
    np.testing.assert_allclose(sc2.score(distinct), [llama_reference(lm, c, t) for c, t in distinct], atol=1e-4)
    assert sc2.prefix_tokens == 0 and sc2.forwards == 1


def test_chunks_give_the_same_scores():
    lm = toy(4)
    reqs = [(f"Q: {'abc'[i % 3]}{'abc'[i // 3 % 3]}", " Y" if i % 2 else " N") for i in range(9)]
    whole, chunked = Scorer(lm), Scorer(lm, chunk_bytes=1)  # one row per device call
    np.testing.assert_allclose(whole.score(reqs), chunked.score(reqs), atol=1e-6)
    assert whole.forwards == 2 and chunked.forwards == 1 + 9  # prefix once, then 1 chunk vs 9


def test_scores_are_remembered_across_calls():
    lm = toy(6)
    sc = Scorer(lm)
    first = sc.score([("ab", "c"), ("ba", "c")])
    assert sc.score([("ba", "c"), ("ab", "c")]) == first[::-1]
    assert (sc.batches, sc.rows) == (1, 2)  # the second call scored nothing
    assert sc.score([("ab", "c"), ("cc", "a")])[1] == pytest.approx(toy_reference(lm, "cc", "a"), abs=1e-5)
    assert (sc.batches, sc.rows) == (2, 3)  # only the new request
    small = Scorer(lm, memo=1)
    small.score([("ab", "c"), ("ba", "c")])
    assert list(small.memo) == [("ba", "c")]


def test_a_request_longer_than_the_model_is_an_error_in_its_place():
    lm = ToyLM.random(VOCAB, positions=8, seed=1)
    lm.max_context = 6
    got = Scorer(lm).score([("ab", "c"), ("abcabc", "a")])
    assert isinstance(got[0], float) and isinstance(got[1], ScoreError)
    assert "reads at most 6" in str(got[1])


# ----------------------------------------------------------------------------------------------- programs

PROGRAM = '''model judge = "unused: given with models="
infer importance(particles={n})
"Q: [x]\\n" where x in ["a", "b", "c"]
let own = logprob_of(" Y", given=f"Q {{x}}?")
let judged = judge.logprob_of(" Y", given=f"Q {{x}}?")
factor judged
return x, own, judged
'''


def test_program_values_are_each_models_own_logprobs():
    lm, judge = toy(3), toy(7)
    r = run(PROGRAM.format(n=64), lm, models={"judge": judge}, seed=0)
    seen = set()
    for s in r.samples:
        x = s.values["x"]
        seen.add(x)
        assert abs(s.values["own"] - toy_reference(lm, f"Q {x}?", " Y")) < 1e-5
        assert abs(s.values["judged"] - toy_reference(judge, f"Q {x}?", " Y")) < 1e-5
    assert seen == {"a", "b", "c"}
    assert toy_reference(lm, "Q a?", " Y") != pytest.approx(toy_reference(judge, "Q a?", " Y"))


def test_one_batched_call_per_host_step_and_model():
    lm, judge = toy(3), toy(7)  # fresh models: fresh scorers and counters
    run(PROGRAM.format(n=256), lm, models={"judge": judge}, seed=1)
    own, judged = scorer_for(lm), scorer_for(judge)
    # two host steps (the lets), one batch each on its own model; 256 particles, 3 distinct requests
    assert (own.batches, judged.batches) == (1, 1)
    assert (own.rows, judged.rows) == (3, 3)


def test_stats_count_each_runs_scoring_per_model():
    lm, judge = toy(3), toy(9)
    r = run(PROGRAM.format(n=256), lm, models={"judge": judge}, seed=1)
    again = run(PROGRAM.format(n=256), lm, models={"judge": judge}, seed=2)  # the same requests: remembered
    sc = r.stats["scorer"]
    assert set(sc) == {"model", "judge"}
    for name, model in (("model", lm), ("judge", judge)):
        assert (sc[name]["batches"], sc[name]["rows"]) == (1, 3)  # one host step each, 3 distinct requests
        assert sc[name]["forwards"] == scorer_for(model).forwards >= 1
    assert "scorer" not in again.stats and "scorer" not in run('"Q: [x]" where x in ["a"]\n', lm).stats
    assert r.to_dict()["stats"]["scorer"] == sc
    program = lmprog.compile(PROGRAM.format(n=16).replace('"Q: [x]', 'input c = "a"\n"Q{c}: [x]'), "t.lmp")
    rows = program.run_batch([{"c": "b"}, {"c": "c"}], lm=toy(4), models={"judge": toy(5)}, seed=0)
    for b in rows:  # one engine call: its two rows share its host steps' batches
        assert b.stats["scorer"]["judge"]["rows_sharing"] == 2 and b.stats["scorer"]["judge"]["batches"] == 1


def test_a_judge_that_is_the_programs_model_shares_its_batch():
    lm = toy(8)
    src = '''model judge = "given with models="
infer importance(particles=32)
"Q: [x]\\n" where x in ["a", "b", "c"]
let both = judge.logprob_of(" N", given=x) + logprob_of(" Y", given=x)
return x, both
'''
    r = run(src, lm, models={"judge": lm}, seed=0)
    sc = scorer_for(lm)
    assert (sc.batches, sc.rows) == (1, 6)  # one host step, one model object: one batch of 3 + 3 requests
    for s in r.samples:
        x = s.values["x"]
        assert abs(s.values["both"] - toy_reference(lm, x, " N") - toy_reference(lm, x, " Y")) < 1e-5


def test_logprob_of_in_if_sample_and_interpolation_is_batched_too():
    lm = toy(5)
    src = '''infer importance(particles=128)
"Q: [x]\\n" where x in ["a", "b"]
if logprob_of(" Y", given=x) > logprob_of(" N", given=x):
    let v = "Y"
else:
    let v = "N"
sample flip ~ bernoulli(exp(logprob_of("a", given=x)))
"{v}{'a' if logprob_of('b', given=x) > -3.0 else 'b'} [y]" where y in ["a"]
return x, v, flip
'''
    r = run(src, lm, seed=2)
    sc = scorer_for(lm)
    assert sc.batches == 3  # the if, the sample, the rendered text: one batch each
    for s in r.samples:
        x = s.values["x"]
        want = "Y" if toy_reference(lm, x, " Y") > toy_reference(lm, x, " N") else "N"
        assert s.values["v"] == want
        assert s.text.startswith(f"Q: {x}\n{want}{'a' if toy_reference(lm, x, 'b') > -3.0 else 'b'} ")


def test_factor_judge_hits_the_exact_target():
    """target(x) ∝ p_LM(" " + x + "\\n" | "Q:") · p_judge(" Y" | "Q x?"): by hand, by enumeration of the
    lowered program, and from importance sampling and SMC."""
    lm, judge = toy(3), toy(7)
    program = lmprog.compile(PROGRAM.format(n=4000), "t.lmp")
    tok = lm.tokenizer
    prompt = [tok.bos_id, *tok.encode("Q:", add_bos=False)]

    def seq(history, text):
        total, h = 0.0, list(history)
        for t in tok.encode(text, add_bos=False):
            logits = lm.host_logits(h).astype(np.float64)
            total += logits[t] - np.logaddexp.reduce(logits)
            h.append(t)
        return total

    logw = {x: seq(prompt, f" {x}\n") + toy_reference(judge, f"Q {x}?", " Y") for x in "abc"}
    log_z = float(np.logaddexp.reduce(list(logw.values())))
    exact = {x: math.exp(v - log_z) for x, v in logw.items()}

    low = lower(program, tok, {}, scorers={None: Scorer(lm), "judge": Scorer(judge)})
    enum = enumerate_program(lm, low.program)
    marginal = enum.marginal(lambda p: p.values["x"])
    for x in "abc":
        assert abs(marginal[x] - exact[x]) < 1e-5
    assert abs(enum.log_z - log_z) < 1e-4

    r = program.run(lm=lm, models={"judge": judge}, seed=3)
    for x in "abc":
        assert abs(r.probability(x=x) - exact[x]) < 0.03
    assert abs(r.log_evidence - log_z) < 0.05
    r = program.run(lm=lm, models={"judge": judge}, seed=4, strategy="smc", particles=2000)
    for x in "abc":
        assert abs(r.probability(x=x) - exact[x]) < 0.04


def test_batch_rows_score_their_own_inputs():
    lm, judge = toy(3), toy(7)
    src = PROGRAM.format(n=16).replace('"Q: [x]', 'input c = "a"\n"Q{c}: [x]').replace("f\"Q {x}?\"", "f\"{c} {x}?\"")
    assert 'given=f"{c} {x}?"' in src
    rows = [{"c": "b"}, {"c": "c"}]
    for row, r in zip(rows, lmprog.compile(src, "t.lmp").run_batch(rows, lm=lm, models={"judge": judge}, seed=0)):
        for s in r.samples:
            want = toy_reference(judge, f"{row['c']} {s.values['x']}?", " Y")
            assert abs(s.values["judged"] - want) < 1e-5


def test_mcmc_reruns_host_steps_with_the_same_scores():
    lm, judge = toy(3), toy(7)
    src = PROGRAM.format(n=4).replace("infer importance(particles=4)", "infer mcmc(steps=30, chains=4)")
    r = run(src, lm, models={"judge": judge}, seed=5)
    for s in r.samples:
        assert abs(s.values["judged"] - toy_reference(judge, f"Q {s.values['x']}?", " Y")) < 1e-5
    assert scorer_for(judge).rows == 3  # every re-run of the step found its scores remembered


def test_tiny_llamas_score_under_their_own_models():
    lm, judge = tiny_model(seed=2), tiny_model(seed=3)
    src = '''model judge = "given with models="
infer importance(particles=8)
"Question: [x]." where x in ["ab", "ba"]
let s = logprob_of(" ok", given=f"Question: {x}.")
let j = judge.logprob_of(" ok", given=f"Question: {x}.")
return x, s, j
'''
    r = run(src, lm, models={"judge": judge}, seed=0, max_tokens=8)
    for s in r.samples:
        context = f"Question: {s.values['x']}."
        assert abs(s.values["s"] - llama_reference(lm, context, " ok")) < 1e-4
        assert abs(s.values["j"] - llama_reference(judge, context, " ok")) < 1e-4
        assert abs(s.values["s"] - s.values["j"]) > 1e-3  # two different models


# ------------------------------------------------------------------------------------------------- errors


def test_a_model_that_cannot_be_loaded_is_located_at_its_declaration():
    program = lmprog.compile('model judge = "no-such-model"\n"Q: [x]" where x in ["a"]\n'
                             'factor judge.logprob_of("a", given=x)\n', "t.lmp")
    with pytest.raises(LmpError) as info:
        program.run(lm=toy(0))
    text = info.value.render()
    assert text.startswith("t.lmp:1:1: cannot load the model 'no-such-model' of 'judge'")
    assert 'model judge = "no-such-model"' in text and "^^^" in text


def test_models_must_name_declared_models():
    with pytest.raises(OptionError, match="does not declare"):
        run('"Q: [x]" where x in ["a"]\n', toy(0), models={"judge": toy(1)})


def test_an_unscorable_request_for_every_particle_is_a_located_run_error():
    src = '"Q[x]" where x in ["a"]\nlet s = logprob_of("a", given="")\n'
    with pytest.raises(RunError, match=r"t.lmp:2:1: .*failed for every particle: .*no BOS"):
        run(src, tiny_model(seed=0), max_tokens=4)


def test_check_accepts_models_and_logprob_of_without_jax(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "judge.lmp"
    path.write_text('model judge = "smollm2-135m"\n"Q: [x]\\n" where x in ["a", "b"]\n'
                    'factor judge.logprob_of(" Yes", given=f"{x}\\nIs this correct?")\n')
    code = ("import sys, lmprog.program as p; rc = p.check_files([sys.argv[1]], sys.stdout); "
            "assert 'jax' not in sys.modules, 'check loaded jax'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
