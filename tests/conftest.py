"""Shared fixtures. The real default model loads once per session; most tests use tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


@pytest.fixture(scope="session")
def default_model():
    from lmprog.backends import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def default_tokenizer():
    from lmprog.backends import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def engine_calls(monkeypatch):
    """The ``groups`` of every call to the inference engine's ``run`` (batch mode: one call, a group per row)."""
    from lmprog.inference import engine

    seen = []
    real = engine.run

    def counting(*args, **kwargs):
        seen.append(kwargs.get("groups", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "run", counting)
    return seen


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
    """Drop JAX's compiled executables after every test module. XLA:CPU maps about 3 memory regions per
    executable and Linux allows 65,530 maps per process (``vm.max_map_count``); the whole suite in one process
    compiles enough distinct shapes that XLA crashed with a segfault while compiling, late in the run, on this
    machine. Releasing each module's executables keeps the count bounded (the persistent cache still serves
    them again cheaply). ``LMPROG_TEST_MAPS=FILE`` appends the process's map count after each module."""
    yield
    import os

    import jax

    log = os.environ.get("LMPROG_TEST_MAPS")
    if log:
        with open("/proc/self/maps") as f, open(log, "a") as out:
            out.write(f"{sum(1 for _ in f)}\n")
    jax.clear_caches()
    from lmprog.inference import aot

    aot.clear()  # the executables kept for kernels loaded from lmprog's own disk cache

