"""The command line: models, generate, and clean errors (no tracebacks) for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmprog.backends.tiny import tiny_model
from lmprog.cli import main

from model_files import write_gguf


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lmprog.cli", *args], capture_output=True, text=True, timeout=600)


def test_models_lists_the_default_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "SmolLM2" in out


def test_generate_with_a_gguf_path(tmp_path, capsys):
    source = tiny_model(seed=5, intermediate_size=64)
    write_gguf(tmp_path / "tiny.gguf", source.config, source.params, source.tokenizer)
    assert main(["generate", "hello", "--model", str(tmp_path / "tiny.gguf"), "--tokens", "5", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "sample 1" in out and "sample 2" in out and "log p =" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "hi", "--tokens", "0"], "expected a positive integer"),
        (["generate", "hi", "--temperature", "-1"], "expected a positive number"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_a_clear_error_without_traceback(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
