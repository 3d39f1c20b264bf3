"""Memory pre-flight: estimates from shapes, runs split into waves that fit, or refused with how many fit."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from _inference_cases import rich_case, z_score_of_mean

import lmprog
from lmprog.backends.tiny import tiny_model
from lmprog.compiler.lower import lower
from lmprog.inference import SMC, Beam, Importance, InferenceError, run
from lmprog.inference.exact import enumerate_program
from lmprog.inference.engine import FEED_CHUNK, layout
from lmprog.inference.memory import MemoryPlanError, cache_slot_bytes, parse_size
from lmprog.inference.memory import plan as memory_plan
from lmprog.inference.samples import InferenceResult
from lmprog.runner import build_strategy


def plan(lm, prog, strategy, groups=1, memory_limit=None):
    return memory_plan(lm, prog, strategy, groups, layout(lm, prog, strategy), FEED_CHUNK, memory_limit)


def test_sizes_parse_with_units_and_reject_nonsense():
    assert parse_size("4G") == 4 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("2.5GiB") == int(2.5 * 2**30)
    assert parse_size("1000") == 1000 and parse_size(123) == 123 and parse_size("8kb") == 8192
    for bad in ("", "lots", "-1G", "0", "nanG", float("inf"), True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cache_slot_bytes_come_from_the_cache_shapes():
    lm = tiny_model(seed=1, max_context=64)
    c = lm.config
    assert cache_slot_bytes(lm) == c.n_layers * 2 * c.n_kv_heads * c.head_dim * 4


@pytest.fixture(scope="module")
def rich():
    lm, prog = rich_case()
    return lm, prog, enumerate_program(lm, prog)


def test_estimate_grows_with_particles_and_a_run_that_fits_runs_as_asked(rich):
    lm, prog, _ = rich
    # (both above the small decode block, so both count the gather of decoding in place: a linear estimate)
    small, big = SMC(particles=80), SMC(particles=8000)
    p_small = plan(lm, prog, small, memory_limit="64G")
    p_big = plan(lm, prog, big, memory_limit="64G")
    assert p_small.waves == p_big.waves == 1
    assert p_big.parts["caches"] == 100 * p_small.parts["caches"] > 0
    assert p_big.need > p_small.need
    r = run(lm, prog, small, seed=3, memory_limit="64G")
    assert "waves" not in r.stats


def _limit_for_waves(lm, prog, strategy, waves: int) -> int:
    """A limit that fits ``1/waves`` of the strategy's particles but not more."""
    part = strategy.with_particles(strategy.num_particles // waves)
    return plan(lm, prog, part, memory_limit="64G").need


def test_a_run_that_does_not_fit_runs_in_waves_that_each_fit(rich):
    lm, prog, _ = rich
    st = SMC(particles=64, ess=0.5)
    limit = _limit_for_waves(lm, prog, st, 4)
    p = plan(lm, prog, st, memory_limit=limit)
    assert p.waves == 4 and p.wave_particles == 16 and p.need <= limit
    r = run(lm, prog, st, seed=5, memory_limit=limit)
    assert r.stats["waves"] == 4 and r.num_particles == 64 and len(r.extra["wave_ess"]) == 4
    # the waves are independent runs of 16 particles with keys folded from the run's key, side by side
    key = jax.random.key(5)
    parts = [run(lm, prog, st.with_particles(16), key=jax.random.fold_in(key, w)) for w in range(4)]
    manual = InferenceResult.concat(parts)
    np.testing.assert_array_equal(r.tokens, manual.tokens)
    np.testing.assert_allclose(r.log_weights, manual.log_weights)
    assert r.log_z == pytest.approx(manual.log_z)
    lse = np.logaddexp.reduce(np.concatenate([q.log_weights[0] for q in parts]))
    assert float(r.log_z[0]) == pytest.approx(lse - math.log(64))


def test_waves_are_properly_weighted_evidence_is_unbiased(rich):
    """Islands combined by their absolute weights: the mean of Z_hat over many wave-split runs is Z."""
    lm, prog, exact = rich
    st = Importance(particles=8)
    limit = _limit_for_waves(lm, prog, st, 2)
    zs, dead_waves = [], 0
    for seed in range(150):
        try:
            r = run(lm, prog, st, seed=seed, memory_limit=limit)
        except InferenceError:  # both islands died: Z_hat = 0, as for a single run
            zs.append(0.0)
            continue
        assert r.stats["waves"] == 2
        dead_waves += r.stats["dead_waves"]
        zs.append(math.exp(r.log_evidence))
    assert dead_waves > 0  # islands that died count with Z = 0 (dropping them would bias Z_hat upwards)
    assert abs(z_score_of_mean(np.array(zs), exact.z)) < 4


def test_a_strategy_that_cannot_be_split_is_refused_with_how_many_particles_fit(rich):
    lm, prog, _ = rich
    st = Beam(width=64)
    limit = _limit_for_waves(lm, prog, st, 4)
    with pytest.raises(MemoryPlanError, match=r"at most \d+ particles fit.*beam cannot be split"):
        run(lm, prog, st, memory_limit=limit)
    with pytest.raises(MemoryPlanError, match="not even one particle fits"):
        run(lm, prog, SMC(particles=4), memory_limit=1000)


def test_the_cli_stops_with_exit_2_and_says_how_many_particles_fit(tmp_path, capsys, monkeypatch):
    import lmprog.runner as runner
    from lmprog import cli
    from lmprog.backends.toy import ToyLM

    lm = ToyLM.random(context=1, positions=32, seed=1)
    monkeypatch.setattr(runner, "get_model", lambda name: lm)
    src = tmp_path / "p.lmp"
    src.write_text('infer beam(width=256)\n"a[x]" where x matches r"[ab]+" and tokens(x) <= 3\n')
    prog = lmprog.load(str(src))
    low = lower(prog, lm.tokenizer, {}, seed=0, default_max_tokens=256)
    need = plan(lm, low.program, Beam(width=256), memory_limit="64G").need
    code = cli.main(["run", str(src), "--memory-limit", str(need - 1)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    m = re.search(r"beam with 256 particles needs about .* available .*at most (\d+) particles fit", err)
    assert m and 0 < int(m.group(1)) < 256, err
    assert cli.main(["run", str(src), "--memory-limit", str(need)]) == 0
    smc = tmp_path / "smc.lmp"
    smc.write_text(src.read_text().replace("beam(width=256)", "smc(particles=256)"))
    capsys.readouterr()
    quarter = plan(lm, low.program, SMC(particles=64), memory_limit="64G").need
    assert cli.main(["run", str(smc), "--memory-limit", str(quarter)]) == 0  # smc splits into waves instead
    assert re.search(r"first of \d+ memory waves.*particles = 256", capsys.readouterr().out, re.S)
    with pytest.raises(SystemExit):
        cli.main(["run", str(src), "--memory-limit", "lots"])
    assert "not a memory size" in capsys.readouterr().err


def test_program_run_passes_the_limit_and_splits_into_waves(monkeypatch):
    from lmprog.backends.toy import ToyLM

    lm = ToyLM.random(context=1, positions=32, seed=2)
    prog = lmprog.compile('infer smc(particles=64)\n"a[x]" where x matches r"[ab]+" and tokens(x) <= 3\n', "p.lmp")
    big = prog.run(lm=lm, seed=1)
    assert "waves" not in big.stats
    low = lower(prog, lm.tokenizer, {}, seed=1, default_max_tokens=256)
    st = build_strategy(prog, low, particles=16)  # the run's strategy (its max_tokens, enumeration) at 16 particles
    limit = plan(lm, low.program, st, memory_limit="64G").need
    r = prog.run(lm=lm, seed=1, memory_limit=limit)
    assert r.stats["waves"] == 4 and r.stats["particles"] == 64
    assert sum(p for _, p in r.posterior) == pytest.approx(1.0)
