"""MCMC strategies from .lmp programs: Program.run, diagnostics in the Result, the CLI table and JSON."""

from __future__ import annotations

import json

import pytest

import lmprog
from lmprog import cli
from test_lower import toy_lm

PROGRAM = '''infer {infer}
sample k ~ uniform_int(1, 3)
"Q: [x]\\n" where x in ["a", "b", "ab"]
factor 1.0 if x == "a" else 0.0
return x, k
'''


@pytest.mark.parametrize("infer", [
    'mcmc(steps=12, chains=3, burn_in=2)',
    'mcmc(steps=6, chains=2, move="independent", particles=4)',
    'particle_gibbs(iterations=5, particles=4)',
    'smc(particles=8, ess=1.0, rejuvenate=2, enumerate=false)',  # resampling (and so moves) is in the token loop
])
def test_every_mcmc_strategy_runs_from_a_program(infer):
    prog = lmprog.compile(PROGRAM.format(infer=infer), "m.lmp")
    res = prog.run(lm=toy_lm(), seed=3)
    assert res.properly_weighted and res.posterior
    assert abs(sum(p for _, p in res.posterior) - 1) < 1e-9
    for v, _ in res.posterior:
        assert v["x"] in ("a", "b", "ab") and v["k"] in (1, 2, 3)
    name = infer.split("(")[0]
    assert res.strategy == name
    if name in ("mcmc", "particle_gibbs"):
        d = res.extra["mcmc"]
        assert set(d) == {"acceptance", "r_hat", "ess"}
        kept = {"mcmc": None, "particle_gibbs": 5}[name]
        if kept:
            assert res.stats["particles"] == kept
        if name == "mcmc":
            assert len(d["acceptance"]) == (3 if "suffix" in infer or "move" not in infer else 2)
            assert all(0.0 <= a <= 1.0 for a in d["acceptance"])
    else:
        assert res.extra["rejuvenation"]["moves"] > 0


def test_the_sample_statement_is_resampled_by_suffix_moves():
    """`k` is drawn by a host step before the hole: the chains must still visit every value of it."""
    prog = lmprog.compile(PROGRAM.format(infer="mcmc(steps=60, chains=2)"), "m.lmp")
    res = prog.run(lm=toy_lm(), seed=0)
    ks = {v["k"] for v, _ in res.posterior}
    assert ks == {1, 2, 3}


def test_cli_prints_mcmc_diagnostics(tmp_path, monkeypatch, capsys):
    import lmprog.runner as runner

    monkeypatch.setattr(runner, "get_model", lambda name: toy_lm())
    path = tmp_path / "m.lmp"
    path.write_text(PROGRAM.format(infer="mcmc(steps=12, chains=2)"))
    assert cli.main(["run", str(path), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "MCMC: acceptance" in out and "R-hat" in out
    assert cli.main(["run", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["strategy"] == "mcmc" and set(d["mcmc"]) == {"acceptance", "r_hat", "ess"}
    assert len(d["samples"]) == 24  # 2 chains x 12 kept steps
