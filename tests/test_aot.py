"""Kernels kept on disk (lmprog/inference/aot.py): a later process loads the executable instead of tracing, and
gets the same results; keys follow shapes, static arguments and the constants kernels read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lmprog.inference import aot, kernel

# One program on a tiny random Llama (LlamaModel: it has an aot_key), run in a fresh process. Prints what the
# process traced and loaded, and the result.
SCRIPT = r"""
import json, sys
import lmprog
from lmprog.backends.tiny import tiny_model
from lmprog.inference import aot, kernel
lm = tiny_model(seed=4, n_layers=int(sys.argv[1]))
prog = lmprog.compile('infer smc(particles=6, ess=0.9)\n"ab[x] c[y]" where x in ["a", "bb", "c"] and len(y) <= 3\n'
                      'return x + y\n', "t.lmp")
r = prog.run(lm=lm, seed=3)
print(json.dumps({"traces": sum(kernel.TRACE_COUNTS.values()), "loads": sum(aot.LOADS.values()),
                  "samples": json.loads(r.to_json())["samples"],
                  "log_z": r.log_evidence, "compile_s": r.stats["compile_s"]}))
"""


def _run(cache, layers=2, **env):
    e = {**os.environ, "LMPROG_CACHE_DIR": str(cache), "LMPROG_XLA_CACHE_MIN_SECS": "0", "JAX_PLATFORMS": "cpu", **env}
    if "LMPROG_NO_KERNEL_CACHE" not in env:
        e.pop("LMPROG_NO_KERNEL_CACHE", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(layers)], capture_output=True, text=True, env=e, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_kernels_and_gets_the_same_result(tmp_path):
    first = _run(tmp_path)
    assert first["traces"] > 0 and first["loads"] == 0
    assert list((tmp_path / "kernels").glob("hole_chunk-*.bin"))
    second = _run(tmp_path)
    assert second["traces"] == 0 and second["loads"] > 0 and second["compile_s"] > 0
    assert second["samples"] == first["samples"] and second["log_z"] == first["log_z"]


def test_an_entry_written_when_xla_had_the_program_cached_still_runs(tmp_path):
    """A kernel first compiled while XLA's persistent cache holds it is written and loads in the next process.
    (On SmolLM2, an executable *served* by that cache serialized without its code, and the next process failed
    with "Function bitcast_gather_fusion not found"; on this tiny model it happens to serialize whole, so this
    test covers the path, and benchmarks/bench_first_result.py the real model.)"""
    off = _run(tmp_path, LMPROG_NO_KERNEL_CACHE="1")  # XLA's persistent cache now holds every kernel
    assert not (tmp_path / "kernels").exists()
    written = _run(tmp_path)
    assert written["loads"] == 0
    loaded = _run(tmp_path)
    assert loaded["loads"] > 0 and loaded["traces"] == 0
    assert off["samples"] == written["samples"] == loaded["samples"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LMPROG_NO_KERNEL_CACHE", raising=False)
    return tmp_path


def _scale(x, y, times):
    return x * times + y


def test_keys_follow_shapes_static_arguments_and_kernel_constants(cache_dir, monkeypatch):
    f = aot.DiskJit(_scale, "scale", "test-key", static_argnames=("times",))
    x, y = jnp.ones((3,)), jnp.arange(3.0)
    np.testing.assert_array_equal(f(x, y, times=2), np.array([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(f(x, y, times=3), np.array([3.0, 4.0, 5.0]))
    f(jnp.ones((4,)), jnp.ones((4,)), times=2)
    assert len(list((cache_dir / "kernels").glob("scale-*.bin"))) == 3
    f(x, y, times=2)  # in-process hit: nothing new
    assert len(list((cache_dir / "kernels").glob("scale-*.bin"))) == 3
    monkeypatch.setattr(kernel, "SMALL_BLOCK_ROWS", kernel.SMALL_BLOCK_ROWS + 1)
    g = aot.DiskJit(_scale, "scale", "test-key", static_argnames=("times",))
    g(x, y, times=2)
    assert len(list((cache_dir / "kernels").glob("scale-*.bin"))) == 4


def test_a_fresh_instance_loads_from_disk_and_a_damaged_entry_is_compiled_again(cache_dir):
    f = aot.DiskJit(_scale, "scale", "test-key", static_argnames=("times",))
    want = np.asarray(f(jnp.ones((5,)), jnp.ones((5,)), times=4))
    (path,) = (cache_dir / "kernels").glob("scale-*.bin")
    before = aot.LOADS["scale"]
    g = aot.DiskJit(_scale, "scale", "test-key", static_argnames=("times",))
    np.testing.assert_array_equal(g(jnp.ones((5,)), jnp.ones((5,)), times=4), want)
    assert aot.LOADS["scale"] == before + 1
    path.write_bytes(b"not an executable")
    h = aot.DiskJit(_scale, "scale", "test-key", static_argnames=("times",))
    np.testing.assert_array_equal(h(jnp.ones((5,)), jnp.ones((5,)), times=4), want)
    assert aot.LOADS["scale"] == before + 1 and path.stat().st_size > 100  # rewritten


def test_without_a_key_or_switched_off_it_is_plain_jit(cache_dir, monkeypatch):
    f = aot.DiskJit(_scale, "scale", None, static_argnames=("times",))
    f(jnp.ones((2,)), jnp.ones((2,)), times=2)
    monkeypatch.setenv("LMPROG_NO_KERNEL_CACHE", "1")
    g = aot.DiskJit(_scale, "scale", "k", static_argnames=("times",))
    g(jnp.ones((2,)), jnp.ones((2,)), times=2)
    assert not (cache_dir / "kernels").exists()


def test_donated_arguments_stay_donated(cache_dir):
    f = aot.DiskJit(lambda s, d: s + d, "donate", "k", donate_argnames=("s",))
    s = jnp.ones((1024,))
    out = f(s, jnp.ones((1024,)))
    assert float(out[0]) == 2.0 and s.is_deleted()


def test_the_folder_is_trimmed_to_its_budget(cache_dir, monkeypatch):
    monkeypatch.setattr(aot, "MAX_BYTES", 1)
    f = aot.DiskJit(_scale, "scale", "k", static_argnames=("times",))
    for n in (2, 3, 4):
        f(jnp.ones((n,)), jnp.ones((n,)), times=1)
    assert len(list((cache_dir / "kernels").glob("scale-*.bin"))) <= 1




PREFETCH_SCRIPT = r"""
import json, sys
import lmprog
from lmprog.backends.tiny import tiny_model
from lmprog.inference import aot, kernel, prefetch
queued = prefetch.start("test-tag")
lm = tiny_model(seed=4, n_layers=2)
prog = lmprog.compile('infer smc(particles=6, ess=0.9)\n"ab[x] c[y]" where x in ["a", "bb", "c"] and len(y) <= 3\n'
                      'return x + y\n', "t.lmp")
r = prog.run(lm=lm, seed=3)
prefetch.remember("test-tag")
print(json.dumps({"queued": queued, "taken": prefetch.TAKEN, "traces": sum(kernel.TRACE_COUNTS.values()),
                  "loads": sum(aot.LOADS.values()), "samples": json.loads(r.to_json())["samples"]}))
"""


def test_the_next_process_prefetches_what_the_last_one_used_and_gets_the_same_result(tmp_path):
    def run():
        e = {**os.environ, "LMPROG_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
        e.pop("LMPROG_NO_KERNEL_CACHE", None)
        out = subprocess.run([sys.executable, "-c", PREFETCH_SCRIPT], capture_output=True, text=True, env=e,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    assert first["queued"] == 0 and first["taken"] == 0 and first["traces"] > 0
    (index,) = (tmp_path / "kernels" / "recent").glob("*.json")
    names = json.loads(index.read_text())
    assert names and all((tmp_path / "kernels" / n).is_file() for n in names)
    second = run()
    assert second["queued"] == len(names) and second["taken"] == len(names) == second["loads"]
    assert second["traces"] == 0 and second["samples"] == first["samples"]
    (tmp_path / "kernels" / names[0]).write_bytes(b"damaged")  # a damaged file: loaded the usual way (recompiled)
    third = run()
    assert third["taken"] == len(names) - 1 and third["samples"] == first["samples"]
