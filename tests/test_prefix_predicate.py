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
