"""The HTML report (``lmprog.report``, ``Result.report``, ``lmprog run/batch --report``) on the toy LM.

The pages are checked twice: as text (what the Python side wrote: merged histories, bounds, offline), and as
rendered by headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it): the DOM after the scripts ran,
no script or console error, and a screenshot that is not blank.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import lmprog
from lmprog import cli, report
from test_lower import toy_lm

SMC = '''infer smc(particles=32, ess=0.9, enumerate=false)
"Q: [x] [y]\\n" where x in ["a", "b", "ab", "ba"] and y in ["a", "b", "c"]
condition x != "a"
'''
MCMC = '''infer mcmc(steps=12, chains=3)
"Q: [x] [y]\\n" where x in ["a", "b", "ab", "ba"] and y in ["a", "b", "c"]
'''
BIG = '''infer smc(particles=2000)
"Q: [x]\\n" where x matches "[abc]{1,4}"
'''


@pytest.fixture(scope="module")
def smc():
    return lmprog.compile(SMC, "smc.lmp").run(lm=toy_lm(), seed=1)


@pytest.fixture(scope="module")
def mcmc():
    return lmprog.compile(MCMC, "mcmc.lmp").run(lm=toy_lm(), seed=2)


@pytest.fixture(scope="module")
def big():
    return lmprog.compile(BIG, "big.lmp").run(lm=toy_lm(), seed=3)


def roles(page: str, role: str) -> int:
    return len(re.findall(rf"data-role=['\"]{role}['\"]", page))


def distinct_histories(result) -> int:
    raw = result.raw
    return len({(raw.tokens[0, i, : raw.lengths[0, i]].tobytes(), int(raw.causes[0, i]))
                for i in range(raw.num_particles)})


# ---- the page as text ---------------------------------------------------------------------------------


def test_report_is_one_self_contained_page(smc):
    page = smc.report()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Nothing is loaded: no external scripts, styles, fonts or images.
    assert not re.search(r"<(script|img|link|iframe)[^>]*\s(src|href)=", page)
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "@import" not in page and "url(" not in page
    # The size note states the page's own size.
    size = len(page.encode("utf-8"))
    assert f"({size} bytes)" in page


def test_particle_rows_merge_identical_histories(smc):
    page = smc.report()
    n = distinct_histories(smc)
    assert 1 < n < 32  # the case merges some particles and keeps several histories
    assert roles(page, "particle-row") == n
    counts = [int(c) for c in re.findall(r"data-role='particle-row'[^>]*><td class='num'>\d+</td>"
                                         r"<td class='num'>(\d+)</td>", page)]
    assert sum(counts) == 32 and len(counts) == n
    assert f"32 particles in {n} distinct histories ({32 - n} identical particles merged" in page


def test_posterior_bars_match_the_posterior(smc):
    page = smc.report()
    assert roles(page, "posterior-bar") == len(smc.posterior)
    widths = [float(w) for w in re.findall(r"class='bar' style='width:([0-9.]+)%'", page)[: len(smc.posterior)]]
    assert widths == pytest.approx([100 * p for _, p in smc.posterior], abs=0.01)


def test_holes_are_marked_in_the_text_and_the_source(smc):
    page = smc.report()
    x_marks = re.findall(r"<mark class='hole' data-hole='x'[^>]*>([^<]*)</mark>", page)
    assert len(x_marks) == distinct_histories(smc)
    assert all(m.strip() in ("a", "b", "ab", "ba") for m in x_marks)
    assert roles(page, "source-hole") == 2  # [x] and [y] in the program's source
    assert re.search(r"data-role='source-hole'[^>]*>\[x\]</mark>", page)


def test_dead_particles_show_their_cause_and_statement(smc):
    page = smc.report()
    dead = smc.stats["dead"]
    assert dead > 0
    m = re.search(r"data-role='dead-row'><td class='num'>(\d+)</td><td>([^<]*)</td><td><code>([^<]*)", page)
    assert m and int(m.group(1)) == dead
    assert m.group(2) == "a condition or factor gave weight 0"
    assert html.unescape(m.group(3)) == 'smc.lmp:3:1: condition x != "a"'
    # the statement's line is marked in the source, with its count
    assert re.search(r"data-role='source-deaths' data-line='3'>", page) and f"{dead} particle(s) killed here" in page
    assert smc.stats["killed"] == [{"statement": 'smc.lmp:3:1: condition x != "a"', "segment": 3, "particles": dead}]
    assert page.count("class='dead'") == sum(1 for _ in re.finditer(r"tr id='row-r-\d+' class='dead'", page)) > 0


def test_genealogy_has_a_leaf_per_history(smc):
    page = smc.report()
    assert roles(page, "genealogy") == 1
    assert roles(page, "gen-leaf") == distinct_histories(smc)
    # every leaf points at a particle row of the same history
    for hist in re.findall(r"data-role='gen-leaf' data-hist='([^']+)'", page):
        assert f"id='row-{hist}'" in page


def test_ess_chart_with_threshold(smc):
    page = smc.report()
    assert roles(page, "ess") == 1 and roles(page, "threshold") == 1
    assert "resampling threshold 28.8" in page  # ess=0.9 of 32 particles
    marks = roles(page, "resample-mark")
    assert marks == int(smc.raw.resampled[:, 0].sum()) > 0


def test_log_z_error_bar_only_when_the_result_has_one(smc):
    from dataclasses import replace

    page = smc.report()
    if smc.log_evidence_se is not None:
        assert roles(page, "logz-bar") == 1 and f"± {smc.log_evidence_se:.4f}" in page
    bare = replace(smc, log_evidence_se=None)
    page = report.render(bare)
    assert roles(page, "logz-bar") == 0
    assert "No standard error" in page and f"{smc.log_evidence:.4f}" in page


def test_mcmc_acceptance_and_chain_traces(mcmc):
    page = mcmc.report()
    assert roles(page, "acceptance-bar") == 3
    trace = re.search(r"<svg data-role='chain-trace'.*?</svg>", page).group(0)
    assert trace.count("data-role='series'") == 3
    assert roles(page, "chain-values") == 1
    assert "No ESS history" in page


def test_large_run_is_bounded_and_says_so(big):
    n = distinct_histories(big)
    assert n > 25  # enough histories for the bound to matter
    page = big.report(max_rows=20)
    assert roles(page, "particle-row") == 20
    assert f"2000 particles in {n} distinct histories" in page
    assert f"{n - 20} histories (" in page and "at most 20 rows are shown" in page
    assert roles(page, "gen-leaf") == min(n, report.MAX_LEAVES)
    full = big.report()
    assert roles(full, "particle-row") == min(n, report.MAX_ROWS)
    assert len(full.encode()) < 600_000


def test_repr_html_is_a_fragment_without_script(smc):
    frag = smc._repr_html_()
    assert frag.startswith("<div class='lmprog-report'>") and "<script" not in frag
    assert roles(frag, "posterior-bar") == len(smc.posterior) and roles(frag, "particle-row") <= 20
    assert "probability" in frag


# ---- the genealogy: recorded by the engine, drawn by the report -----------------------------------------

LONG = '''infer smc(particles=64, ess=1, enumerate=false)
"Q: [x]\\n" where x matches "[abc]{2,6}"
'''
TWO_CONDITIONS = '''infer importance(particles=48, enumerate=false)
"Q: [x]" where x in ["a", "b", "ab", "ba"]
condition x != "a"
condition x != "b"
" [y]\\n" where y in ["a", "b"]
'''
ALL_DEAD = '''infer smc(particles=16, ess=0.5, enumerate=false)
"Q: [x] [y]\\n" where x in ["a", "b", "ab", "ba"] and y in ["a", "b", "c"]
condition x == "zz"
'''


def run_engine(source: str, seed: int, chunk: int = 32):
    """The engine's InferenceResult of ``source`` on the toy LM (``chunk`` decode steps per device call)."""
    from lmprog.compiler.lower import lower
    from lmprog.inference import engine
    from lmprog.runner import build_strategy

    program = lmprog.compile(source, "g.lmp")
    low = lower(program, toy_lm().tokenizer, {})
    return engine.run(toy_lm(), low.program, build_strategy(program, low), seed=seed, chunk=chunk)


@pytest.fixture(scope="module")
def long_run():
    return run_engine(LONG, seed=5)


def ancestors_by_generation(gen) -> list:
    """``[R + 1]`` arrays: the ancestor in each generation of every final particle, composed step by step from the
    recorded ancestor vectors (an independent reading of ``Genealogy.lineage``)."""
    n = gen.ancestors.shape[2]
    out = [np.arange(n)]
    for r in range(len(gen.steps) - 1, -1, -1):
        out.insert(0, gen.ancestors[r, 0][out[0]])
    return out


def test_engine_records_the_ancestors_of_every_resampling_step(long_run):
    raw, gen = long_run, long_run.genealogy
    n = raw.num_particles
    assert list(gen.steps) == list(np.flatnonzero(raw.resampled[:, 0])) and len(gen.steps) >= 3
    assert gen.dropped == 0 and gen.ancestors.shape == (len(gen.steps), 1, n)
    assert ((gen.ancestors >= 0) & (gen.ancestors < n)).all()
    for r, t in enumerate(gen.steps):
        w = np.exp(gen.log_weights[r, 0])
        assert w.sum() == pytest.approx(1.0)
        # the recorded weights are those the step's ESS was computed from (before resampling)
        assert 1.0 / np.sum(w ** 2) == pytest.approx(float(raw.ess[t, 0]), rel=1e-3)
        # systematic resampling: every particle has floor(N w) or ceil(N w) children; the dead none
        children = np.bincount(gen.ancestors[r, 0], minlength=n)
        assert (children >= np.floor(n * w - 1e-3)).all() and (children <= np.ceil(n * w + 1e-3)).all()
        assert (children[w == 0] == 0).all()
        # in place: a selected ancestor's first child keeps its index
        chosen = np.flatnonzero(children)
        assert (gen.ancestors[r, 0][chosen] == chosen).all()
    assert np.array_equal(gen.lineage(0), np.array(ancestors_by_generation(gen)))


def test_a_particle_extends_its_ancestors_history(long_run):
    """Final particles with the same ancestor at a resampling step agree on that ancestor's tokens then."""
    raw, gen = long_run, long_run.genealogy
    toks, lens = raw.tokens[0], raw.lengths[0]
    lineage = ancestors_by_generation(gen)
    shared = 0
    for r in range(len(gen.steps)):
        for a in np.unique(lineage[r]):
            kids = np.flatnonzero(lineage[r] == a)
            length = int(gen.lengths[r, 0, a])
            assert (lens[kids] >= length).all()
            assert len({toks[c, :length].tobytes() for c in kids}) == 1
            shared += len(kids) > 1
    assert shared > 0  # the check compared something
    # and a wrong ancestry fails it: shift the last step's ancestors by one
    r = len(gen.steps) - 1
    wrong = lineage[r][(np.arange(len(lineage[r])) + 1) % len(lineage[r])]
    prefixes = [{toks[c, : int(gen.lengths[r, 0, a])].tobytes() for c in np.flatnonzero(wrong == a)}
                for a in np.unique(wrong)]
    assert any(len(p) > 1 for p in prefixes)


def test_genealogy_does_not_depend_on_chunking(long_run):
    small = run_engine(LONG, seed=5, chunk=2)
    assert np.array_equal(small.tokens, long_run.tokens)
    for a, b in zip(small.genealogy[:-1], long_run.genealogy[:-1]):
        assert np.array_equal(a, b)


def test_genealogy_keeps_the_last_steps_past_its_cap(long_run, monkeypatch):
    from lmprog.inference import engine

    monkeypatch.setattr(engine, "GENEALOGY_STEPS", 2)
    capped = run_engine(LONG, seed=5).genealogy
    full = long_run.genealogy
    assert capped.dropped == len(full.steps) - 2 and len(capped.steps) == 2
    assert np.array_equal(capped.ancestors, full.ancestors[-2:]) and np.array_equal(capped.steps, full.steps[-2:])


def test_result_genealogy_is_documented_and_not_in_the_json():
    r = lmprog.compile(LONG, "g.lmp").run(lm=toy_lm(), seed=5)
    assert r.genealogy is r.raw.genealogy and len(r.genealogy.steps) >= 3
    assert "genealogy" not in r.to_dict()
    imp = lmprog.compile(TWO_CONDITIONS, "t.lmp").run(lm=toy_lm(), seed=1)
    assert imp.genealogy is None  # importance never resamples


def drawn_lineages(result) -> tuple[dict, dict]:
    """What the genealogy must draw, from the raw arrays alone: per generation the distinct histories of the
    ancestors of the final particles (generation R: the final histories, by tokens and fate), and per generation
    the distinct (child history, parent history) edges into it."""
    raw, gen = result.raw, result.raw.genealogy
    toks, lens, causes = raw.tokens[0], raw.lengths[0], raw.causes[0]
    lineage = ancestors_by_generation(gen)
    big_r = len(gen.steps)

    def key(r, c):
        if r == big_r:
            return toks[c, : lens[c]].tobytes(), int(causes[c])
        return toks[c, : int(gen.lengths[r, 0, lineage[r][c]])].tobytes()

    n = raw.num_particles
    nodes = {r: len({key(r, c) for c in range(n)}) for r in range(big_r + 1)}
    edges = {r: len({(key(r, c), key(r - 1, c)) for c in range(n)}) for r in range(1, big_r + 1)}
    return nodes, edges


def test_genealogy_draws_the_recorded_lineages(long_run):
    r = lmprog.compile(LONG, "g.lmp").run(lm=toy_lm(), seed=5)
    page = r.report()
    nodes, edges = drawn_lineages(r)
    big_r = len(r.genealogy.steps)
    assert big_r + 1 <= report.MAX_GENERATIONS and distinct_histories(r) <= report.MAX_LEAVES  # all drawn
    assert f"data-generations='{big_r + 1}'" in page
    for g in range(big_r):
        assert len(re.findall(rf"data-role='gen-node' data-gen='{g}'", page)) == nodes[g]
        # the dots of a generation hold every ancestor of the final particles once
        held = sum(int(k) for k in re.findall(rf"data-role='gen-node' data-gen='{g}' data-particles='(\d+)'", page))
        assert held == len(np.unique(ancestors_by_generation(r.genealogy)[g]))
    assert roles(page, "gen-leaf") == nodes[big_r]
    for g in range(1, big_r + 1):
        assert len(re.findall(rf"data-role='gen-edge' data-gen='{g}'", page)) == edges[g]
        counts = re.findall(rf"data-role='gen-edge' data-gen='{g}' data-count='(\d+)'", page)
        assert sum(map(int, counts)) == (r.raw.num_particles if g == big_r
                                         else len(np.unique(ancestors_by_generation(r.genealogy)[g])))


PARTICLE_GIBBS = '''infer particle_gibbs(iterations=5, particles=24)
"Q: [x]\\n" where x matches "(ab|c)(a|bc)*b"
'''


def test_particle_gibbs_draws_its_last_sweep_and_its_genealogy():
    r = lmprog.compile(PARTICLE_GIBBS, "pg.lmp").run(lm=toy_lm(), seed=4)
    raw, sweep = r.raw, r.raw.sweep
    assert sweep is not None and sweep.num_particles == 24 and raw.num_particles == 5  # 5 references kept
    gen = sweep.genealogy
    assert gen is not None and len(gen.steps) >= 1
    assert list(gen.steps) == list(np.flatnonzero(sweep.resampled[:, 0]))  # this sweep's steps only
    assert (gen.ancestors[:, 0, 0] == 0).all()  # conditional SMC: the reference is its own ancestor
    seq = lambda res, i: res.tokens[0, i, : res.lengths[0, i]].tobytes()  # noqa: E731
    # particle 0 of the last sweep replayed the previous reference; the last reference is one of the sweep's
    assert seq(sweep, 0) == seq(raw, 3)
    assert seq(raw, 4) in {seq(sweep, i) for i in range(24)}
    page = r.report()
    assert roles(page, "sweep-genealogy") == 1 and roles(page, "genealogy") == 0
    assert roles(page, "sweep-particle-row") == distinct_histories(SimpleNamespace(raw=sweep))
    assert roles(page, "particle-row") == distinct_histories(r)
    assert f"data-generations='{len(gen.steps) + 1}'" in page
    # the sweep's rows and leaves are linked by their own ids, apart from the references' rows
    leaves = set(re.findall(r"data-role='gen-leaf' data-hist='([^']+)'", page))
    assert leaves and all(h.startswith("rs-") for h in leaves)
    assert leaves <= set(re.findall(r"data-role='sweep-particle-row' data-hist='([^']+)'", page))


def test_mcmc_chains_say_why_there_is_no_resampling_genealogy(mcmc):
    page = mcmc.report()
    assert "chains do not resample" in page and roles(page, "genealogy") == 1


def test_genealogy_of_many_particles_is_bounded():
    big = lmprog.compile(BIG.replace("smc(particles=2000)", "smc(particles=2000, ess=1, enumerate=false)"),
                         "big.lmp").run(lm=toy_lm(), seed=3)
    page = big.report()
    assert roles(page, "gen-leaf") == min(distinct_histories(big), report.MAX_LEAVES)
    per_gen = [len(re.findall(rf"data-role='gen-node' data-gen='{g}'", page)) for g in range(len(big.genealogy.steps))]
    assert max(per_gen) <= report.MAX_LEAVES and sum(per_gen) > 0
    assert len(page.encode()) < 600_000


# ---- deaths by statement ------------------------------------------------------------------------------


def test_deaths_are_attributed_to_the_statement_that_killed_them():
    r = lmprog.compile(TWO_CONDITIONS, "t.lmp").run(lm=toy_lm(), seed=1)
    dead_x = [s.values["x"] for s in r.raw.samples if not s.alive]
    expect = {'t.lmp:3:1: condition x != "a"': dead_x.count("a"), 't.lmp:4:1: condition x != "b"': dead_x.count("b")}
    assert all(expect.values()) and sum(expect.values()) == len(dead_x) == r.stats["dead"]
    got = {d["statement"]: d["particles"] for d in r.stats["deaths"]}
    assert got == expect
    assert {d["segment"] for d in r.stats["deaths"]} == {2, 3}  # the two Host segments
    json.loads(r.to_json())["stats"]["deaths"]  # plain JSON
    page = r.report()
    for statement, k in expect.items():
        assert re.search(rf"data-role='dead-row'><td class='num'>{k}</td><td>[^<]*</td><td><code>"
                         rf"{re.escape(html.escape(statement, quote=True))}</code>", page)
        line = statement.split(":")[1]
        assert f"data-role='source-deaths' data-line='{line}'" in page


REPLACED = '''infer smc(particles=48, ess=0.8, enumerate=false)
"Q: [x]" where x matches "[abc]{2,5}"
condition not startswith(x, "c")
" [y]\\n" where y in ["a", "b", "c"]
condition y != "c"
'''


def test_kills_count_the_particles_resampling_replaced():
    r = lmprog.compile(REPLACED, "k.lmp").run(lm=toy_lm(), seed=2)
    gen = r.genealogy
    in_y = [k for k, j in enumerate(gen.segments) if j == 3]  # resampling steps in hole y (segment 3)
    assert in_y
    dead_then = int(np.sum(~np.isfinite(gen.log_weights[in_y[0], 0])))  # the condition's victims, still there
    killed = {d["statement"]: d["particles"] for d in r.stats["killed"]}
    assert killed['k.lmp:3:1: condition not startswith(x, "c")'] == dead_then > 0
    # they were replaced: none of them is among the dead at the end, all of which the last condition killed
    assert {d["statement"] for d in r.stats["deaths"]} == {'k.lmp:5:1: condition y != "c"'}
    assert killed['k.lmp:5:1: condition y != "c"'] == r.stats["dead"]
    page = r.report()
    assert roles(page, "killed-row") == 2 and roles(page, "gen-deaths") >= 1
    assert f"{dead_then} particle(s) killed here" in page


def test_every_particle_dead_carries_the_particles():
    from lmprog.inference import InferenceError

    with pytest.raises(InferenceError) as info:
        lmprog.compile(ALL_DEAD, "dead.lmp").run(lm=toy_lm(), seed=1)
    partial = info.value.partial
    assert partial.num_particles == 16 and not partial.alive.any()
    assert partial.deaths() == [{"statement": 'dead.lmp:3:1: condition x == "zz"', "segment": 3,
                                 "cause": "a condition or factor gave weight 0", "particles": 16}]
    from lmprog.result import Result

    page = report.render_failure(info.value, result=Result.from_failure(info.value))
    assert roles(page, "failure") == 1 and roles(page, "particle-row") >= 1
    assert Result.from_failure(ValueError("no particles")) is None


def test_cli_all_dead_still_writes_the_report(tmp_path, monkeypatch, capsys):
    import lmprog.runner as runner

    monkeypatch.setattr(runner, "get_model", lambda name: toy_lm())
    prog = tmp_path / "dead.lmp"
    prog.write_text(ALL_DEAD)
    assert cli.main(["run", str(prog), "--seed", "1"]) == 1
    plain = capsys.readouterr().err
    out = tmp_path / "dead.html"
    assert cli.main(["run", str(prog), "--seed", "1", "--json", "--report", str(out)]) == 1  # the same status
    captured = capsys.readouterr()
    assert captured.out == ""
    err = " ".join(captured.err.split())  # (rich wraps the report line)
    assert f"report: {out} (" in err and "self-contained HTML" in err
    assert " ".join(plain.split()) in err  # the same message
    assert "every particle died" in plain
    page = out.read_text()
    assert roles(page, "failure") == 1 and "every particle died" in page
    assert html.unescape(re.search(r"data-role='failure-site'>([^<]*)<", page).group(1)) == \
        f'{prog}:3:1: condition x == "zz"'
    assert "data-role='source-deaths' data-line='3'>" in page and "16 particle(s) killed here" in page
    assert roles(page, "particle-row") >= 1 and roles(page, "dead-row") == 1


# ---- the CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def prog_file(tmp_path, monkeypatch):
    import lmprog.runner as runner

    monkeypatch.setattr(runner, "get_model", lambda name: toy_lm())
    path = tmp_path / "p.lmp"
    path.write_text(SMC)
    return path


def test_cli_run_report(prog_file, tmp_path, capsys):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4)  # the message stays one line past the console width
    deep.mkdir()
    out = deep / "r.html"
    assert cli.main(["run", str(prog_file), "--seed", "1", "--json", "--report", str(out)]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout is still only the JSON
    size = out.stat().st_size
    assert f"report: {out} (" in captured.err and report.size_text(size) in captured.err
    page = out.read_text()
    assert roles(page, "source-hole") == 2 and roles(page, "particle-row") > 1


def test_cli_report_path_checked_before_the_run(prog_file, tmp_path, capsys):
    assert cli.main(["run", str(prog_file), "--report", str(tmp_path / "missing" / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "--report" in err and "does not exist" in err
    assert cli.main(["run", str(prog_file), "--report", str(prog_file)]) == 2
    assert "would destroy it" in capsys.readouterr().err
    same = str(tmp_path / "x.out")
    assert cli.main(["run", str(prog_file), "--out", same, "--report", same]) == 2
    assert "same file as --out" in capsys.readouterr().err


def test_cli_batch_report_one_section_per_row(prog_file, tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    rows.write_text('{}\nnot json\n{}\n')
    out = tmp_path / "b.html"
    assert cli.main(["batch", str(prog_file), str(rows), "--out", str(tmp_path / "o.jsonl"),
                     "--report", str(out)]) == 2  # the bad row
    page = out.read_text()
    assert roles(page, "batch-summary") == 1 and roles(page, "batch-row") == 3
    assert len(re.findall(r"<section class='result' data-prefix='row\d'", page)) == 2
    assert "not valid JSON" in page
    assert "report: " in capsys.readouterr().err


# ---- rendered by headless Chromium --------------------------------------------------------------------


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


needs_chromium = pytest.mark.skipif(chromium_path() is None,
                                    reason="headless Chromium is not installed (apt-get install chromium; "
                                           ".ci/run installs it)")


def chromium(tmp_path, page_path, *args) -> subprocess.CompletedProcess:
    cmd = [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           *args, page_path.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def rendered_dom(tmp_path, name: str, page: str) -> str:
    """The DOM of ``page`` after headless Chromium ran its scripts, which must have run to their end without
    an error."""
    path = tmp_path / name
    path.write_text(page, encoding="utf-8")
    dom = chromium(tmp_path, path, "--dump-dom").stdout
    assert 'data-lmprog-ready="1"' in dom and page_errors(dom) == ""
    return dom


def page_errors(dom: str) -> str:
    m = re.search(r'<pre id="lmprog-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert m, "the page's error element is missing"
    return m.group(1).strip()


@needs_chromium
def test_chromium_dom_after_scripts(smc, tmp_path):
    path = tmp_path / "r.html"
    assert smc.report(path) == str(path) and path.read_bytes().startswith(b"<!DOCTYPE html>")
    dom = chromium(tmp_path, path, "--dump-dom").stdout
    assert 'data-lmprog-ready="1"' in dom  # the page's script ran to its end
    assert page_errors(dom) == ""
    n = distinct_histories(smc)
    assert len(re.findall(r'data-role="particle-row"', dom)) == n
    assert len(re.findall(r'data-role="posterior-bar"', dom)) == len(smc.posterior)
    assert len(re.findall(r'data-role="gen-leaf"', dom)) == n


@needs_chromium
def test_chromium_error_hook_catches_a_broken_script(smc, tmp_path):
    """The no-error check can fail: a page with a failing script reports it in its error element."""
    path = tmp_path / "broken.html"
    page = smc.report().replace("</body>", "<script>undefinedFunction();</script><script>console.error('boom');</script></body>")
    path.write_text(page, encoding="utf-8")
    errors = page_errors(chromium(tmp_path, path, "--dump-dom").stdout)
    assert "undefinedFunction" in errors and "console.error: boom" in errors


@needs_chromium
def test_chromium_batch_page(smc, mcmc, tmp_path):
    dom = rendered_dom(tmp_path, "batch.html",
                       report.render_batch([(1, {"n": 2}, mcmc), (0, {"n": 1}, smc), (2, {"n": 3}, "row failed")]))
    assert len(re.findall(r'data-role="batch-row"', dom)) == 3
    assert re.findall(r'<section class="result" data-prefix="(row\d)"', dom) == ["row0", "row1"]  # in row order
    assert len(re.findall(r'data-role="acceptance-bar"', dom)) == 3 and "row failed" in dom


@needs_chromium
def test_chromium_genealogy_and_failure_pages(tmp_path):
    r = lmprog.compile(LONG, "g.lmp").run(lm=toy_lm(), seed=5)
    dom = rendered_dom(tmp_path, "g.html", r.report())
    nodes, edges = drawn_lineages(r)
    big_r = len(r.genealogy.steps)
    for g in range(big_r):
        assert len(re.findall(rf'data-role="gen-node" data-gen="{g}"', dom)) == nodes[g]
    for g in range(1, big_r + 1):
        assert len(re.findall(rf'data-role="gen-edge" data-gen="{g}"', dom)) == edges[g]
    from lmprog.inference import InferenceError

    program = lmprog.compile(ALL_DEAD, "dead.lmp")
    with pytest.raises(InferenceError) as info:
        program.run(lm=toy_lm(), seed=1)
    from lmprog.result import Result

    dom = rendered_dom(tmp_path, "dead.html",
                       report.render_failure(info.value, result=Result.from_failure(info.value), program=program))
    assert len(re.findall(r'data-role="failure"', dom)) == 1 and 'data-role="source-deaths"' in dom


def png_rows(path) -> tuple[int, int, bytes]:
    """``(width, height, the IDAT stream inflated)`` of a PNG (its filtered scanlines)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def not_blank(path) -> bool:
    """A screenshot with content: the filtered scanlines of a one-colour image hold a few byte values (0 and the
    colour's bytes, whatever the PNG filter), those of a page with text and drawings nearly all 256 and many
    bytes that are neither 0 nor 255."""
    _, _, raw = png_rows(path)
    values = np.frombuffer(raw, np.uint8)
    distinct = len(np.unique(values))
    busy = float(np.mean((values != 0) & (values != 255)))
    return distinct >= 64 and busy > 0.005


@needs_chromium
def test_chromium_screenshot_is_not_blank(smc, tmp_path):
    path = tmp_path / "r.html"
    smc.report(path)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, path, f"--screenshot={shot}", "--window-size=1100,1400")
    width, height, _ = png_rows(shot)
    assert (width, height) == (1100, 1400)
    assert not_blank(shot)
    # the check can fail: a blank page is blank
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body style='background:#fff'></body></html>")
    blank = tmp_path / "blank.png"
    chromium(tmp_path, empty, f"--screenshot={blank}", "--window-size=1100,1400")
    assert not not_blank(blank)


def test_screenshot_in_docs_is_a_png():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "img", "report.png")
    assert png_rows(path)[0] > 0


@needs_chromium
def test_chromium_particle_gibbs_page(tmp_path):
    r = lmprog.compile(PARTICLE_GIBBS, "pg.lmp").run(lm=toy_lm(), seed=4)
    dom = rendered_dom(tmp_path, "pg.html", r.report())
    assert len(re.findall(r'data-role="sweep-particle-row"', dom)) == distinct_histories(SimpleNamespace(raw=r.raw.sweep))
    assert len(re.findall(r'data-role="sweep-genealogy"', dom)) == 1
