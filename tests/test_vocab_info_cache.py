"""The tokenizer tables of the constraint compiler (``VocabInfo``) are kept on disk: a second process reads them
instead of building them again, and gets exactly what building gives."""

from __future__ import annotations

import dataclasses

import numpy as np

from lmprog.backends.tokenizer import byte_tokenizer
from lmprog.compiler import vocab_index


def _same(a, b) -> None:
    for f in dataclasses.fields(vocab_index.VocabInfo):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f.name
        else:
            assert type(x) is type(y) and x == y, f.name


def _entries(tmp_path):
    return sorted((tmp_path / "vocab").glob("*.npz"))


def test_a_fresh_tokenizer_reads_the_tables_written_by_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    built = vocab_index.vocab_info(byte_tokenizer())
    assert len(_entries(tmp_path)) == 1
    calls = []
    monkeypatch.setattr(vocab_index, "_build_vocab_info", lambda t: calls.append(t))
    loaded = vocab_index.vocab_info(byte_tokenizer())  # a new tokenizer object: no in-memory cache
    assert calls == []
    _same(built, loaded)
    _same(built, vocab_index.VocabInfo(**{f.name: getattr(loaded, f.name)
                                          for f in dataclasses.fields(vocab_index.VocabInfo)}))


def test_a_damaged_entry_is_built_again_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(tmp_path))
    built = vocab_index.vocab_info(byte_tokenizer())
    (entry,) = _entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])
    again = vocab_index.vocab_info(byte_tokenizer())
    _same(built, again)
    assert entry.stat().st_size > 100


def test_an_unwritable_cache_folder_still_builds(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("LMPROG_CACHE_DIR", str(blocked))
    info = vocab_index.vocab_info(byte_tokenizer())
    assert info.size == len(byte_tokenizer())
