"""Particles over devices (:mod:`lmprog.inference.sharding`), on 4 simulated CPU devices.

The test process has one device, so the checks run in one subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (this file run as a script); it writes its measurements
to a JSON file and the tests below judge them:

* exactness: SMC with resampling (systematic at ESS 0.5, multinomial at every step) with the particles of
  every group spread over 4 devices: Pearson chi-square of ``G`` SIR draws against the enumerated posterior
  (failure rate ``ALPHA``) and the mean of ``Z_hat`` within 4 standard errors of the exact ``Z``;
* the same seed gives the same particles on 1 and 4 devices (the partitioned kernels compute the same thing;
  only the order of float reductions may differ), for the toy LM and for a tiny Llama, also with its weights
  split over a ``model`` axis (a 2 x 2 mesh);
* a particle count the requested devices do not divide is refused with a clear error; by default a run uses
  the most devices that divide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _inference_cases import ALPHA

HERE = Path(__file__).resolve().parent
G, N = 200, 16  # groups x particles of the exactness runs: 3200 particles, 800 per device
SCHEMES = {"systematic": 0.5, "multinomial": 1.0}  # resampler -> ESS threshold


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "measured.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_smc_with_resampling_is_exact_with_particles_on_4_devices(sharded, scheme):
    m = sharded["exact"][scheme]
    assert m["devices"] == 4 and m["placed"] == "P('particles',)"
    assert m["p_value"] > ALPHA, m
    assert abs(m["z"]) < 4, m
    assert m["resampled_frac"] > 0.05, m  # resampling (across devices) did happen


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_same_seed_same_particles_on_1_and_4_devices(sharded, scheme):
    m = sharded["exact"][scheme]
    assert m["tokens_equal"] and m["dead_equal"], m
    assert m["max_lw_diff"] < 1e-4 and m["max_log_z_diff"] < 1e-4, m


@pytest.mark.parametrize("mesh", ["4x1", "2x2"])
def test_tiny_llama_same_samples_on_a_mesh(sharded, mesh):
    m = sharded["tiny"][mesh]
    assert m["devices"] == 4 and m["texts_equal"], m
    assert m["max_lw_diff"] < 1e-3 and m["log_z_diff"] < 1e-3, m


def test_weights_split_over_the_model_axis(sharded):
    specs = sharded["tiny"]["2x2"]["specs"]
    assert specs["wq"] == "P(None, 'model')" and specs["w_up"] == "P(None, 'model')"
    assert specs["wo"] == "P('model', None)" and specs["w_down"] == "P('model', None)"
    assert specs["attn_norm"] == "P()"
    assert sharded["tiny"]["4x1"]["specs"]["wq"] == "P()"  # replicated without a model axis


def test_particles_must_divide_over_the_devices(sharded):
    m = sharded["divide"]
    assert "6 particles cannot be split evenly over 4 devices" in m["error"], m
    assert "--devices 3" in m["error"] and "e.g. 8" in m["error"], m
    assert m["default_devices"] == 3  # the most of the 4 devices that divide 6


def test_device_requests_are_checked_before_anything_runs():
    from lmprog.inference import sharding

    with pytest.raises(ValueError, match="2 x 1 devices requested but this process has 1"):
        sharding.check_request(2)
    with pytest.raises(ValueError, match="devices must be a positive integer"):
        sharding.check_request(0)
    assert sharding.plan(64) is None  # one device: nothing is placed


def test_cli_refuses_more_devices_than_there_are(capsys):
    from lmprog.cli import main

    assert main(["run", str(HERE.parent / "examples" / "capital.lmp"), "--devices", "2"]) == 2
    assert "2 x 1 devices requested but this process has 1" in capsys.readouterr().err


def test_weight_spec_layout():
    from jax.sharding import PartitionSpec as P
    from jax.tree_util import GetAttrKey

    from lmprog.inference.sharding import weight_spec

    assert weight_spec((GetAttrKey("wk"),), (32, 16), 2) == P(None, "model")
    assert weight_spec((GetAttrKey("w_down"),), (48, 32), 2) == P("model", None)
    assert weight_spec((GetAttrKey("embed"),), (257, 32), 2) == P()  # 257 rows do not split over 2
    assert weight_spec((GetAttrKey("final_norm"),), (32,), 2) == P()


# ------------------------------------------------------------------------------------------------------
# The subprocess: measurements on 4 simulated devices
# ------------------------------------------------------------------------------------------------------


def _finite_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    same_inf = np.array_equal(np.isfinite(a), np.isfinite(b))
    fin = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[fin] - b[fin]), initial=0.0)) if same_inf else float("inf")


def _measure_exact() -> dict:
    from _inference_cases import chi_square_pvalue, rich_case, sir_draws, z_score_of_mean
    from lmprog.inference import SMC, engine, run, sharding
    from lmprog.inference.exact import enumerate_program

    lm, prog = rich_case()
    exact = enumerate_program(lm, prog)
    placed = {}
    real_assemble = engine.assemble

    def spy(r, state, s, t):  # how the particles were laid out at the end of the run
        placed["spec"] = str(state.particles.log_weight.sharding.spec) if r.placement is not None else "one device"
        return real_assemble(r, state, s, t)

    engine.assemble = spy
    out = {}
    try:
        for scheme, ess in SCHEMES.items():
            st = SMC(particles=N, ess=ess, resample=scheme)
            with sharding.devices(4):
                r4 = run(lm, prog, st, seed=11, groups=G)
            spec = placed["spec"]
            with sharding.devices(1):
                r1 = run(lm, prog, st, seed=11, groups=G)
            out[scheme] = dict(
                devices=r4.stats["devices"], placed=spec,
                p_value=chi_square_pvalue(sir_draws(r4, 1), exact.probs()),
                z=z_score_of_mean(np.exp(r4.log_z), exact.z),
                resampled_frac=float(np.asarray(r4.resampled).mean()),
                tokens_equal=bool(np.array_equal(r1.tokens, r4.tokens) and np.array_equal(r1.lengths, r4.lengths)),
                dead_equal=bool(np.array_equal(r1.causes, r4.causes)),
                max_lw_diff=_finite_diff(r1.log_weights, r4.log_weights),
                max_log_z_diff=_finite_diff(r1.log_z, r4.log_z),
            )
    finally:
        engine.assemble = real_assemble
    return out


def _measure_tiny() -> dict:
    import jax

    import lmprog
    from lmprog.backends.tiny import tiny_model
    from lmprog.inference import sharding

    lm = tiny_model(seed=1)
    prog = lmprog.compile('infer smc(particles=8, ess=0.5, resample="systematic")\n'
                          '"Q: [a]\\nB: [b]\\n"\n'
                          '    where a matches r"[a-z]+" and tokens(a) <= 6\n'
                          '    where b matches r"[a-z ]+" and tokens(b) <= 6\n'
                          'return a, b\n')
    with sharding.devices(1):
        base = prog.run(lm=lm, seed=3)
    out = {}
    for name, (d, m) in {"4x1": (4, 1), "2x2": (2, 2)}.items():
        with sharding.devices(d, m):
            r = prog.run(lm=lm, seed=3)
            placed = sharding.plan(8).model(lm).params
        layer = placed.layers[0]
        out[name] = dict(
            devices=r.stats["devices"],
            texts_equal=[s.text for s in r.samples] == [s.text for s in base.samples],
            max_lw_diff=_finite_diff([s.log_weight for s in r.samples], [s.log_weight for s in base.samples]),
            log_z_diff=abs(r.log_evidence - base.log_evidence),
            specs={k: str(getattr(layer, k).sharding.spec) for k in ("wq", "wo", "w_up", "w_down", "attn_norm")},
        )
    assert jax.local_device_count() == 4
    return out


def _measure_divide() -> dict:
    import lmprog
    from lmprog.backends.tiny import tiny_model
    from lmprog.inference import sharding

    lm = tiny_model(seed=1)
    prog = lmprog.compile('infer smc(particles=6)\n"Q: [a]\\n"\n    where a matches r"[a-z]+" and tokens(a) <= 3\n')
    try:
        with sharding.devices(4):
            prog.run(lm=lm, seed=0)
        error = ""
    except ValueError as exc:
        error = str(exc)
    return dict(error=error, default_devices=prog.run(lm=lm, seed=0).stats["devices"])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    measured = dict(exact=_measure_exact(), tiny=_measure_tiny(), divide=_measure_divide())
    Path(sys.argv[1]).write_text(json.dumps(measured, indent=1))
