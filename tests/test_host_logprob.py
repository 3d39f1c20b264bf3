"""``logprob(X)`` in host statements (factor / condition / let): host views carry each hole's log-probability."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import lmprog
from lmprog.inference.segments import HostView
from tests.test_lower import ids, seq_prob, toy_lm

LMP = Path(__file__).parent / "lmp"


def run(src, lm, **kw):
    return lmprog.compile(src, "t.lmp").run(lm=lm, **kw)


def _exact(lm, power):
    """Normalised ``p(s)**power`` for the hole's two values, ``p(s) = p(" " + s + "\\n" | "Q:")``, and its sum."""
    prompt = [lm.tokenizer.bos_id] + ids(lm, "Q:")
    w = {s: math.exp(power * seq_prob(lm, prompt, ids(lm, " " + s + "\n"))) for s in ("a", "b")}
    z = sum(w.values())
    return {s: v / z for s, v in w.items()}, z


def test_factor_minus_logprob_cancels_the_lm():
    lm = toy_lm()
    # token by token (enumerate=false): each value's weight is then 1 / q(value) of the first token's choice
    src = 'infer importance(particles=2000, enumerate=false)\n"Q: [x]\\n" where x in ["a", "b"]\nfactor -logprob(x)\n'
    r = run(src, lm, seed=4)
    # every hole value gets weight p(s) / p(s) = 1: a uniform posterior and evidence 2
    assert abs(r.probability(x="a") - 0.5) < 0.03
    assert abs(r.log_evidence - math.log(2.0)) < 1e-3


def test_factor_logprob_squares_the_lm():
    lm = toy_lm()
    src = 'infer importance(particles=4000)\n"Q: [x]\\n" where x in ["a", "b"]\nfactor logprob(x)\n'
    r = run(src, lm, seed=5)
    exact, z = _exact(lm, 2.0)
    assert abs(r.probability(x="a") - exact["a"]) < 0.03
    assert abs(r.log_evidence - math.log(z)) < 0.05


def test_let_and_condition_see_the_same_logprob_as_return():
    lm = toy_lm()
    src = '''infer smc(particles=64)
"Q: [x]\\n" where x in ["a", "b"]
let lp = logprob(x)
condition logprob(x) < 0
"Z [y]" where y in ["a", "b"]
return {"x": x, "lp": lp, "after": logprob(x), "y": logprob(y)}
'''
    r = run(src, lm, seed=0)
    prompt = [lm.tokenizer.bos_id] + ids(lm, "Q:")
    for s in r.samples:
        x, lp, lp_after = s.values["x"], s.values["lp"], s.values["after"]
        assert lp == lp_after, (lp, lp_after)
        # float32 on the device vs float64 here
        assert abs(lp - seq_prob(lm, prompt, ids(lm, " " + x + "\n"))) < 1e-4


def test_host_view_logprobs_by_hole():
    view = HostView(tokens=[[1, 2], [1]], spans=[{"a": (0, 2)}, {}], alive=np.array([True, True]),
                    data=[{}, {}], tokenizer=None, holes={"a": None, "b": None},
                    hole_logprobs=np.array([[-1.5, 0.0], [0.0, 0.0]]))
    lp = view.logprobs
    assert set(lp) == {"a"}
    assert lp["a"][0] == -1.5 and np.isnan(lp["a"][1])


def test_everything_lmp_runs_on_a_tiny_model():
    # its factor uses logprob(drink): this used to fail at run time (host views had no log-probabilities)
    from lmprog.backends.tiny import tiny_model

    program = lmprog.load(LMP / "everything.lmp")
    result = program.run(lm=tiny_model(seed=1), particles=4, max_tokens=24, seed=0)
    assert result.posterior
    assert abs(sum(p for _, p in result.posterior) - 1) < 1e-6


def test_exact_enumeration_of_factor_logprob_is_the_reweighted_posterior():
    # the lowered program on the exact enumerator (whose host views carry the same log-probabilities):
    # P(x = s) ∝ p(s) * exp(logprob(x)) = p(s)^2, against the host-side computation
    from lmprog.compiler.lower import lower
    from lmprog.inference.exact import enumerate_program

    lm = toy_lm()
    src = '"Q: [x]\\n" where x in ["a", "b"]\nfactor logprob(x)\n'
    low = lower(lmprog.compile(src, "t.lmp"), lm.tokenizer, {}, default_max_tokens=8)
    post = enumerate_program(lm, low.program, max_tokens=8)
    got = {k: v for k, v in post.marginal(lambda p: p.values["x"]).items()}
    exact, z = _exact(lm, 2.0)
    for s in ("a", "b"):
        assert abs(got[s] - exact[s]) < 1e-6, (got, exact)
    assert abs(post.log_z - math.log(z)) < 1e-5
