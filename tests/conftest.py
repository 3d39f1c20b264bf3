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
