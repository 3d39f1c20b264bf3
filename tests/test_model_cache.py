"""The on-disk cache of parsed models (lmprog/backends/model_cache.py): a cached load is the same model."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from lmprog.backends import load_model, load_tokenizer, model_cache
from lmprog.backends.registry import load_tokenizer as _load_tokenizer_cached
from lmprog.backends.tiny import tiny_model

from model_files import write_gguf

TEXTS = ["hello world", "The capital of France is Paris.\n", " \t spaces and ünïcödé ", ""]


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LMPROG_NO_MODEL_CACHE", raising=False)
    monkeypatch.setattr(model_cache, "MIN_BYTES", 0)
    _load_tokenizer_cached.cache_clear()
    source = tiny_model(seed=3, intermediate_size=64)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, source.config, source.params, source.tokenizer)
    return path


def _entries(tmp_path):
    root = tmp_path / "cache" / "models"
    return sorted(p for p in root.glob("*/*") if not p.name.startswith(".tmp-")) if root.is_dir() else []


def _assert_same(a, b):
    assert a.config == b.config
    la, ta = jax.tree_util.tree_flatten(a.params)
    lb, tb = jax.tree_util.tree_flatten(b.params)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for f in ("token_bytes", "special_ids", "bos_id", "eos_ids", "add_bos", "chat_template", "chat_tokens"):
        assert getattr(a.tokenizer, f) == getattr(b.tokenizer, f), f
    for text in TEXTS:
        assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    cache_a, cache_b = a.init_cache(1, 8), b.init_cache(1, 8)
    tokens, pos = np.array([[1, 2, 3]]), np.array([0])
    logits_a, _ = a.forward(cache_a, tokens, pos)
    logits_b, _ = b.forward(cache_b, tokens, pos)
    np.testing.assert_array_equal(np.asarray(logits_a), np.asarray(logits_b))


def test_second_load_reads_the_entry_and_is_the_same_model(model_file, tmp_path, monkeypatch):
    first = load_model(str(model_file))
    assert len(_entries(tmp_path)) == 1
    parsed = []
    real = model_cache._read
    monkeypatch.setattr(model_cache, "_read", lambda *a: parsed.append(1) or real(*a))
    second = load_model(str(model_file))
    assert parsed == [1]
    _assert_same(first, second)


def test_a_changed_file_gets_a_new_entry_and_the_old_one_goes(model_file, tmp_path):
    load_model(str(model_file))
    (old,) = _entries(tmp_path)
    st = os.stat(model_file)
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_model(str(model_file))
    (new,) = _entries(tmp_path)
    assert new != old and new.parent == old.parent


def test_a_damaged_entry_is_parsed_again(model_file, tmp_path):
    first = load_model(str(model_file))
    (entry,) = _entries(tmp_path)
    with open(entry / "weights.bin", "r+b") as f:
        f.truncate(100)
    again = load_model(str(model_file))
    _assert_same(first, again)
    (entry,) = _entries(tmp_path)  # rewritten whole
    assert (entry / "weights.bin").stat().st_size > 100
    (entry / "model.json").write_text("{not json")
    _assert_same(first, load_model(str(model_file)))


def test_the_tokenizer_alone_comes_from_the_entry(model_file, tmp_path, monkeypatch):
    model = load_model(str(model_file))
    import lmprog.backends.gguf_file as gguf_file

    monkeypatch.setattr(gguf_file, "GGUFFile", None)  # the file must not be parsed again
    tok = load_tokenizer(str(model_file))
    assert tok.token_bytes == model.tokenizer.token_bytes
    assert [tok.encode(t) for t in TEXTS] == [model.tokenizer.encode(t) for t in TEXTS]


def test_off_switch_and_small_models_write_nothing(model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_NO_MODEL_CACHE", "1")
    load_model(str(model_file))
    assert _entries(tmp_path) == []
    monkeypatch.delenv("LMPROG_NO_MODEL_CACHE")
    monkeypatch.setattr(model_cache, "MIN_BYTES", 1 << 40)
    load_model(str(model_file))
    assert _entries(tmp_path) == []


def test_default_model_from_the_cache_equals_the_parsed_file(default_model, monkeypatch):
    """The real default model: the entry (written by this or an earlier load) reproduces the parsed file."""
    monkeypatch.setenv("LMPROG_NO_MODEL_CACHE", "1")
    parsed = load_model("smollm2-135m")
    monkeypatch.delenv("LMPROG_NO_MODEL_CACHE")
    again = load_model("smollm2-135m")
    if model_cache.entry_folder(model_cache_path()).is_dir():
        _assert_same(parsed, again)
    _assert_same(parsed, default_model)


def model_cache_path():
    from lmprog.backends.registry import resolve_model

    return resolve_model("smollm2-135m")
