"""``Program.run_batch``: rows with the same structure run as one engine call (groups), each row's result
matches a run of its own; bad rows get their error and never stop the others."""

from __future__ import annotations

import math

import pytest

import lmprog
from lmprog.dsl.errors import LmpError
from lmprog.inference import InferenceError
from lmprog.runner import run_batch
from test_lower import ids, seq_prob, toy_lm

PROGRAM = '''infer importance(particles=1300)
input who: str = "Q"
"{who}: [x]\\nZ" where x in ["a", "b", "ab"]
'''


@pytest.fixture(scope="module")
def lm():
    return toy_lm()


def exact(lm, who):
    prompt = [lm.tokenizer.bos_id] + ids(lm, f"{who}:")
    p = {s: math.exp(seq_prob(lm, prompt, ids(lm, " " + s + "\nZ"))) for s in ("a", "b", "ab")}
    z = sum(p.values())
    return {s: v / z for s, v in p.items()}, math.log(z)


def test_same_structure_runs_as_one_engine_call_with_each_rows_exact_posterior(lm, engine_calls):
    prog = lmprog.compile(PROGRAM, "t.lmp")
    rows = [{"who": "Q"}, {"who": "A"}, {"who": "Hello there"}]
    results = prog.run_batch(rows, lm=lm, seed=1)
    assert engine_calls == [3]  # one engine call, one group per row
    for row, r in zip(rows, results):
        post, log_z = exact(lm, row["who"])
        got = {v["x"]: p for v, p in r.posterior}
        tv = 0.5 * sum(abs(got.get(s, 0.0) - post[s]) for s in post)
        assert tv < 0.06, (row, got, post)
        assert abs(r.log_evidence - log_z) < 0.06, (row, r.log_evidence, log_z)
        assert r.inputs == row and r.stats["batch_rows"] == 3 and r.stats["particles"] == 1300
        prompt = lm.tokenizer.decode(ids(lm, row["who"] + ":"), skip_special=True)  # the toy tokenizer drops unknown characters
        assert {s.text for s in r.samples} == {f"{prompt} {x}\nZ" for x in post}


def test_greedy_batch_equals_separate_runs_exactly(lm, engine_calls):
    src = 'input who: str = "Q"\n"{who}: [x]\\n" where x matches r"[a-z]{1,3}"\n"{who} again: [y]\\n" where y in ["a", "b"]\n'
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"who": "Q"}, {"who": "Ab"}, {"who": "Q Q"}]
    batched = prog.run_batch(rows, lm=lm, strategy="greedy")
    assert engine_calls == [3]
    for row, b in zip(rows, batched):
        alone = prog.run(row, lm=lm, strategy="greedy")
        assert [s.values for s in b.samples] == [s.values for s in alone.samples]
        assert [s.text for s in b.samples] == [s.text for s in alone.samples]
        assert [s.log_weight for s in b.samples] == pytest.approx([s.log_weight for s in alone.samples], abs=1e-4)
        assert b.raw.scores[0] == pytest.approx(alone.raw.scores[0], abs=1e-4)


def test_bad_rows_get_their_errors_in_order_and_never_stop_the_others(lm, engine_calls):
    prog = lmprog.compile(PROGRAM, "t.lmp")
    rows = [{"who": "Q"}, {"who": 3}, "not a dict", {"who": "A"}, {"nope": 1}]
    out = prog.run_batch(rows, lm=lm, particles=64, errors="return")
    assert engine_calls == [2]
    assert isinstance(out[1], LmpError) and "bad value for input 'who'" in str(out[1])
    assert isinstance(out[2], TypeError)
    assert isinstance(out[4], LmpError) and "unknown input 'nope'" in str(out[4])
    assert out[0].inputs == {"who": "Q"} and out[3].inputs == {"who": "A"}
    with pytest.raises(LmpError, match="bad value for input 'who'"):
        prog.run_batch(rows, lm=lm, particles=64)


def test_a_row_whose_particles_all_die_gets_the_error_of_its_own_run(lm, engine_calls):
    src = PROGRAM + 'condition who != "none"\n'
    prog = lmprog.compile(src, "t.lmp")
    out = prog.run_batch([{"who": "Q"}, {"who": "none"}, {"who": "A"}], lm=lm, particles=32, errors="return")
    assert engine_calls[0] == 3
    assert isinstance(out[1], InferenceError) and "every particle died" in str(out[1])
    assert out[0].samples and out[2].samples and out[2].inputs == {"who": "A"}


def test_rows_that_differ_in_structure_run_separately(lm, engine_calls):
    src = 'infer smc(particles=16)\ninput opts: list = ["a"]\n"Q: [x]\\n" where x in opts\n'
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"opts": ["a", "b"]}, {"opts": ["c"]}, {"opts": ["a", "ab"]}, {"opts": ["c"]}]
    out = prog.run_batch(rows, lm=lm)
    assert sorted(engine_calls) == [1, 1, 2]  # the two ["c"] rows share one call; the others differ in automaton
    assert {v["x"] for v, _ in out[1].posterior} == {"c"} == {v["x"] for v, _ in out[3].posterior}
    assert {v["x"] for v, _ in out[0].posterior} <= {"a", "b"}


def test_beam_rows_are_groups_of_one_call_each_the_search_of_its_own_run(lm, engine_calls):
    src = ('input who: str = "Q"\n"{who}: [x]\\n" where x matches r"[a-z]{1,3}"\n'
           'factor -1.5 if x == "a" else 0.0\n"{who} again: [y]\\n" where y in ["a", "b", "ab"]\n')
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"who": "Q"}, {"who": "Ab"}, {"who": "Q Q"}]
    batched = prog.run_batch(rows, lm=lm, strategy="beam", particles=4)
    assert engine_calls == [3]  # one call, a group of 4 beams per row
    alone = [prog.run(row, lm=lm, strategy="beam", particles=4) for row in rows]
    assert engine_calls == [3, 1, 1, 1]
    for b, a in zip(batched, alone):
        assert b.stats["batch_rows"] == 3 and len(b.samples) == 4
        assert [s.text for s in b.samples] == [s.text for s in a.samples]
        assert [s.values for s in b.samples] == [s.values for s in a.samples]
        assert b.raw.scores.ravel() == pytest.approx(a.raw.scores.ravel(), abs=1e-4)
    # the rows' searches differ (their prompts do), so a search that leaked across groups would show
    assert len({tuple(s.text for s in r.samples) for r in batched}) == 3


def test_rows_are_planned_with_their_own_texts_and_a_call_that_does_not_fit_is_halved(lm, engine_calls):
    """Rows' own prompt texts lengthen a call's caches beyond what one row's program needs: the rows per call
    are planned on the program a call runs, and a call that still does not fit runs as two halves (never one
    row at a time)."""
    from lmprog.inference import batch, engine, memory
    from lmprog.runner import _lower_row

    src = 'infer smc(particles=64)\ninput who: str = "Q"\n"{who}: [x]\\n" where x in ["a", "b", "ab"]\n'
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"who": "Q"}] + [{"who": "Hello there " * 6 + str(i)} for i in range(3)]
    lows = [_lower_row(prog, lm, r, seed=1, strategy=None, particles=None, max_tokens=None, temperature=None,
                       from_text=False, scorers={})[1].program for r in rows]
    st = _lower_row(prog, lm, rows[0], seed=1, strategy=None, particles=None, max_tokens=None, temperature=None,
                    from_text=False, scorers={})[2]

    def need(programs):
        c = batch.combine(programs, st.num_particles, [None] * len(programs))
        return memory.plan(lm, c, st, len(programs), engine.layout(lm, c, st), engine.FEED_CHUNK, "1T").need

    first_only, four, two = need([lows[0]] * 4), need(lows), need(lows[:2])
    assert first_only < four and two < four  # the long rows' texts cost cache
    limit = four - 1
    assert batch._rows_that_fit(lm, lows, st, limit, 4) == 2  # planned on the rows' own call (was 4)
    results = prog.run_batch(rows, lm=lm, seed=1, memory_limit=limit)
    assert engine_calls == [2, 2]
    for row, r in zip(rows, results):
        post, _ = exact(lm, row["who"])
        got = {v["x"]: p for v, p in r.posterior}
        assert r.stats["batch_rows"] == 2 and 0.5 * sum(abs(got.get(k, 0.0) - post[k]) for k in post) < 0.2


def test_single_group_strategies_run_row_by_row(lm, engine_calls):
    prog = lmprog.compile(PROGRAM, "t.lmp")
    out = prog.run_batch([{"who": "Q"}, {"who": "A"}], lm=lm, strategy="best_of", particles=8)
    assert engine_calls == [1, 1]
    assert [r.strategy for r in out] == ["best_of", "best_of"]


@pytest.fixture
def fed(monkeypatch):
    """The rows the engine feeds to the particles as forced text (``engine._feed``), one list per call."""
    import lmprog.inference.engine as engine

    seen = []
    real = engine._feed

    def recording(run, state, rows, *args, **kwargs):
        seen.append([list(r) for r in rows])
        return real(run, state, rows, *args, **kwargs)

    monkeypatch.setattr(engine, "_feed", recording)
    return seen


def test_each_rows_own_prompt_text_is_prefilled_once_not_fed_to_every_particle(lm, engine_calls, fed):
    # rows whose prompts differ in length and content (two of them equal): each row's own prompt text is
    # prefilled for the row and broadcast to its particles, never fed to the particles; posteriors stay exact
    prog = lmprog.compile(PROGRAM, "t.lmp")
    rows = [{"who": "Q"}, {"who": "Hello there"}, {"who": "Q"}]
    results = prog.run_batch(rows, lm=lm, particles=600, seed=2)
    assert engine_calls == [3]
    assert all(not any(r) for rows_fed in fed for r in rows_fed), fed
    for row, r in zip(rows, results):
        post, log_z = exact(lm, row["who"])
        got = {v["x"]: p for v, p in r.posterior}
        assert 0.5 * sum(abs(got.get(s, 0.0) - post[s]) for s in post) < 0.1, (row, got, post)
        assert abs(r.log_evidence - log_z) < 0.1, (row, r.log_evidence, log_z)
        prompt = lm.tokenizer.decode(ids(lm, row["who"] + ":"), skip_special=True)
        assert {s.text for s in r.samples} <= {f"{prompt} {x}\nZ" for x in post}


def test_per_row_prompt_text_gives_the_same_greedy_run_as_a_run_of_its_own(lm, engine_calls, fed):
    # the row's prompt text continues the shared prefix's cache (prefill) in the batch, and is part of the
    # one-shot prompt prefill in a run of its own: same tokens, same scores; text after a hole is still fed
    src = 'input who: str = "Q"\n"{who}: [x]\\n" where x matches r"[a-z]{1,3}"\n"{who} and [y]\\n" where y in ["a", "b"]\n'
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"who": "Ab"}, {"who": "Q Q Q"}]
    batched = prog.run_batch(rows, lm=lm, strategy="greedy")
    assert engine_calls == [2]
    assert fed and all(any(r) for r in fed[0])  # "{who} and" after the first hole: fed per particle
    for row, b in zip(rows, batched):
        alone = prog.run(row, lm=lm, strategy="greedy")
        assert [s.text for s in b.samples] == [s.text for s in alone.samples]
        assert b.raw.scores[0] == pytest.approx(alone.raw.scores[0], abs=1e-4)


def test_rows_beyond_max_batch_particles_run_in_calls_of_equal_size(lm, engine_calls):
    # 3 rows, at most 2 per call: two engine_calls of 2 rows (the second padded with a copy of its row, whose
    # result is dropped), so both engine_calls share one kernel shape
    src = 'input who: str = "Q"\n"{who}: [x]\\n" where x in ["a", "b", "ab"]\n'
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"who": "Q"}, {"who": "A"}, {"who": "Ab"}]
    progress = []
    out = run_batch(prog, rows, lm=lm, strategy="greedy", max_batch_particles=2, progress=progress.append)
    assert engine_calls == [2, 2]
    assert [r.inputs for r in out] == rows
    for row, b in zip(rows, out):
        alone = prog.run(row, lm=lm, strategy="greedy")
        assert [s.text for s in b.samples] == [s.text for s in alone.samples]
    assert progress and {p.hole for p in progress} == {"x"}  # the engine's progress callback, every call


def test_particle_gibbs_rows_run_as_groups_of_one_call_each_with_its_exact_posterior(lm, engine_calls):
    # rows of two prompts (so the text before and between the holes is rendered per row, and replayed by each
    # row's reference), 160 of each in one engine call; the last reference of every row is an exact draw
    from _inference_cases import ALPHA, chi_square_pvalue
    from lmprog.compiler.lower import Lowering
    from lmprog.inference.exact import enumerate_program

    src = ('infer particle_gibbs(iterations=6, particles=3)\ninput who: str = "Q"\n'
           '"{who}: [x]\\n{who} and [y]\\nZ" where x in ["a", "b", "ab"] and y in ["a", "b"]\nreturn x, y\n')
    prog = lmprog.compile(src, "t.lmp")
    rows = [{"who": w} for w in ("Q", "Hello there") for _ in range(160)]
    out = prog.run_batch(rows, lm=lm, seed=4)
    assert engine_calls == [len(rows)]
    for who in ("Q", "Hello there"):
        exact = enumerate_program(lm, Lowering(prog, lm.tokenizer, {"who": who}, 0, 256).run().program)
        probs = exact.marginal(lambda p: (p.values["x"], p.values["y"]))
        mine = [r for row, r in zip(rows, out) if row["who"] == who]
        assert all(r.inputs == {"who": who} and r.stats["batch_rows"] == len(rows) for r in mine)
        last = [(r.samples[-1].values["x"], r.samples[-1].values["y"]) for r in mine]
        p = chi_square_pvalue(last, probs)
        assert p > ALPHA, (who, p, probs)
        rates = [float(r.raw.extra["reference_update_rate"][0, 0]) for r in mine]
        assert all(0.0 <= v <= 1.0 for v in rates) and len({*rates}) > 1  # each row's own rate, not row 0's
