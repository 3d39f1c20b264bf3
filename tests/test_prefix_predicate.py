"""``h.pred(X, prefix=true)`` end to end: every prefix of the value satisfies the predicate (LANGUAGE.md), the
target is exact, and the engine kills a particle at the token where a prefix fails (``Hole.prefix_check``)."""

from __future__ import annotations

import itertools
import math


import lmprog
from lmprog.inference import Cause
from tests.test_lower import ids, seq_prob, toy_lm


def balanced(v: str) -> bool:
    """No more b's than a's: true of "ab", false of "ba" — whose prefix "b" fails."""
    return v.count("b") <= v.count("a")


def prefixes(v: str):
    return [v[:j] for j in range(1, len(v) + 1)]


SRC = '''infer importance(particles={n})
"Q: [x]\\n" where x matches r"[ab]{{1,3}}" and balanced(x, prefix=true)
return x
'''


def program(n):
    return lmprog.compile(SRC.format(n=n), "t.lmp", functions={"balanced": balanced})


def test_every_returned_value_satisfies_the_predicate_on_every_prefix():
    r = program(256).run(lm=toy_lm(), seed=0)
    assert r.samples
    for s in r.samples:
        v = s.values["x"]
        assert all(balanced(p) for p in prefixes(v)), v
        assert s.text == f"Q: {v}\n"


def test_the_target_is_the_prefix_constrained_posterior():
    # target: P(x = v) ∝ p(" " + v + "\n" | "Q:") for v in [ab]{1,3} with every prefix balanced; a check of the
    # complete value only would also admit "ba" and "baa"
    lm = toy_lm()
    r = program(3000).run(lm=lm, seed=1)
    prompt = [lm.tokenizer.bos_id] + ids(lm, "Q:")
    values = ["".join(t) for n in (1, 2, 3) for t in itertools.product("ab", repeat=n)]
    exact = {v: math.exp(seq_prob(lm, prompt, ids(lm, " " + v + "\n")))
             for v in values if all(balanced(p) for p in prefixes(v))}
    assert "ba" not in exact and balanced("ba")
    z = sum(exact.values())
    got = {v["x"]: p for v, p in r.posterior}
    assert set(got) <= set(exact), got
    tv = 0.5 * sum(abs(got.get(v, 0.0) - exact[v] / z) for v in exact)
    assert tv < 0.05, (got, exact)
    assert abs(r.log_evidence - math.log(z)) < 0.1


def test_the_engine_kills_a_particle_at_the_token_where_a_prefix_fails():
    # needs the engine to call Hole.prefix_check after every token of the hole: then no particle goes on
    # generating after a failing prefix (with the complete-value check alone, dead particles have finished
    # values whose early prefixes fail)
    lm = toy_lm()
    r = program(256).run(lm=lm, seed=2)
    raw = r.raw
    h = [hole.name for hole in raw.holes].index("x")
    tok = lm.tokenizer
    killed = 0
    for g in range(raw.tokens.shape[0]):
        for i in range(raw.tokens.shape[1]):
            a, b = (int(x) for x in raw.spans[g, i, h])
            hole_tokens = [int(t) for t in raw.tokens[g, i, a:b]]
            # the value before the last token: drop the healed space and the terminator
            before = tok.decode(hole_tokens[:-1], skip_special=True)[1:].split("\n")[0]
            assert all(balanced(p) for p in prefixes(before)), (g, i, before)
            killed += int(raw.causes[g, i]) == int(Cause.HOST)
    assert killed > 0  # the predicate did kill particles (the check above is not vacuous)


TWO_HOLES = '''infer mcmc(steps=60, chains=1000, burn_in=59)
"Q: [x]\\nZ: [y]\\n" where x matches r"[ab]{1,3}" and balanced(x, prefix=true) and y matches r"[ab]{1,2}"
return x, y
'''


def test_mcmc_moves_through_a_prefix_checked_hole_keep_the_posterior():
    """Rolling MCMC chains (lmprog/inference/rolling.py) regenerate the prefix-checked hole ``x`` on its own (a host
    call after every token, only the arriving chains alive in the view) while other chains decode ``y``. The
    chains' last states must fit ``P(x, y)`` ∝ ``p(" x\\nZ: y\\n" | "Q:")`` over balanced-prefix ``x``. The chains
    start from unweighted proposals, far from this posterior (x = "a" has 0.997 of it): after 25 moves seeds 3 and 4
    failed, in lock step as well as rolling (burn-in, not bias); after 60 both pass in both schemes."""
    from tests._inference_cases import ALPHA, chi_square_pvalue

    lm = toy_lm()
    r = lmprog.compile(TWO_HOLES, "t.lmp", functions={"balanced": balanced}).run(lm=lm, seed=3)
    prompt = [lm.tokenizer.bos_id] + ids(lm, "Q:")
    words = lambda n: ["".join(t) for k in range(1, n + 1) for t in itertools.product("ab", repeat=k)]  # noqa: E731
    exact = {(x, y): math.exp(seq_prob(lm, prompt, ids(lm, f" {x}\nZ: {y}\n")))
             for x in words(3) if all(balanced(p) for p in prefixes(x)) for y in words(2)}
    z = sum(exact.values())
    raw = r.raw
    kept = int(raw.extra["kept"])
    last = [s for i, s in enumerate(r.samples) if i % kept == kept - 1]
    assert len(last) == 1000
    draws = [(s.values["x"], s.values["y"]) for s in last]
    p = chi_square_pvalue(draws, {k: v / z for k, v in exact.items()})
    assert p > ALPHA, f"chi-square p-value {p:.2e}"
