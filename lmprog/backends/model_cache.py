"""A parsed model kept on disk, so that a second run does not parse the model file again.

Parsing SmolLM2's GGUF file costs about 4 s on a 2-core CPU: ~2.7 s decoding the tokenizer's 49,152 tokens and
merges from the metadata (``GGUFReader`` builds one numpy view per string), ~1 s dequantizing and transposing
the weights. The first load writes what it built under ``cache_dir()/models/PATH_HASH/KEY/``:

* ``weights.bin``: every weight array as float32, exactly as :class:`~lmprog.backends.llama.LlamaWeights` holds
  it (dequantized, Q/K rows unpermuted, linear maps transposed), each aligned to 64 bytes;
* ``model.json``: the :class:`~lmprog.backends.llama.LlamaConfig`, the arrays' names, shapes and offsets, and the
  tokenizer: the ``tokenizers`` JSON of its encoder and the rest of :class:`~lmprog.backends.tokenizer.Tokenizer`'s
  fields (the byte table as latin-1 strings, which round-trip every byte).

Later loads map ``weights.bin`` and copy each array to the device: a few hundred milliseconds.

``KEY`` hashes the model file's resolved path, size and modification time (every file of a Hugging Face folder)
and the source of the modules that build models (this one, the loaders, the GGUF reader, the tokenizer and the
Llama module): editing the file or the code that reads it invalidates the entry. An entry is written to a
temporary folder and renamed into place, so a reader never sees half an entry, and replaces the path's older
entries (one entry per model path); a damaged or unreadable entry is ignored (the model is parsed again). No
entry is written when the disk lacks room for it with a margin, nor for models under :data:`MIN_BYTES` (they
parse in milliseconds). ``LMPROG_NO_MODEL_CACHE=1`` turns the cache off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from lmprog.backends.jax_setup import cache_dir

__all__ = ["cached", "cached_tokenizer", "entry_folder", "model_key"]

#: Bumped when the layout of an entry changes.
FORMAT = 1
ALIGN = 64
#: Free disk space kept beyond an entry's size when writing one.
DISK_MARGIN = 1 << 30
#: Smaller models (the tiny ones tests write) parse in milliseconds: they are not cached.
MIN_BYTES = 16 << 20

_SOURCES = ("model_cache.py", "loaders.py", "gguf_file.py", "tokenizer.py", "llama.py")


def enabled(path: Path) -> bool:
    if os.environ.get("LMPROG_NO_MODEL_CACHE"):
        return False
    return sum(f.stat().st_size for f in _files(Path(path))) >= MIN_BYTES


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def model_key(path: Path) -> str:
    """The entry's name: a hash of the model's files (path, size, mtime) and of the code that reads them."""
    h = hashlib.sha256(f"lmprog-model-cache-{FORMAT}".encode())
    for f in _files(Path(path).resolve()):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:24]


def entry_folder(path: Path) -> Path:
    """``cache_dir()/models/PATH_HASH/KEY``: one folder per model path, holding its current entry only."""
    where = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "models" / where / model_key(path)


# --------------------------------------------------------------------------------------------------
# Weights <-> named arrays
# --------------------------------------------------------------------------------------------------


def _named_arrays(weights) -> dict[str, np.ndarray]:
    """``{name: array}`` of every array of a ``LlamaWeights`` (``layers.I.FIELD`` for layer fields)."""
    out = {}
    for f in dataclasses.fields(weights):
        value = getattr(weights, f.name)
        if f.name == "layers":
            for i, layer in enumerate(value):
                for g in dataclasses.fields(layer):
                    if getattr(layer, g.name) is not None:
                        out[f"layers.{i}.{g.name}"] = getattr(layer, g.name)
        elif value is not None:
            out[f.name] = value
    return out


def _weights_from(arrays: dict, n_layers: int):
    from lmprog.backends.llama import LayerWeights, LlamaWeights

    layer_fields = [g.name for g in dataclasses.fields(LayerWeights)]
    layers = tuple(LayerWeights(**{g: arrays.get(f"layers.{i}.{g}") for g in layer_fields}) for i in range(n_layers))
    top = {f.name: arrays.get(f.name) for f in dataclasses.fields(LlamaWeights) if f.name != "layers"}
    return LlamaWeights(layers=layers, **top)


# --------------------------------------------------------------------------------------------------
# Tokenizer <-> JSON
# --------------------------------------------------------------------------------------------------


def _encode_value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, bytes):
        return {"bytes": v.decode("latin-1")}
    if isinstance(v, frozenset):
        return {"frozenset": [_encode_value(x) for x in sorted(v)]}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode_value(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[_encode_value(k), _encode_value(x)] for k, x in v.items()]}
    raise TypeError(f"cannot store a {type(v).__name__} in the model cache")


def _decode_value(v):
    if not isinstance(v, dict):
        return v
    (kind, x), = v.items()
    if kind == "bytes":
        return x.encode("latin-1")
    if kind == "frozenset":
        return frozenset(_decode_value(y) for y in x)
    if kind == "tuple":
        return tuple(_decode_value(y) for y in x)
    return {_decode_value(k): _decode_value(y) for k, y in x}


def _tokenizer_json(tok) -> dict:
    fields = {f.name: _encode_value(getattr(tok, f.name)) for f in dataclasses.fields(tok)
              if f.name not in ("hf", "_cache")}
    return {"hf": tok.hf.to_str(), "fields": fields}


def _tokenizer_from(data: dict):
    from tokenizers import Tokenizer as HFTokenizer

    from lmprog.backends.tokenizer import Tokenizer

    fields = {k: _decode_value(v) for k, v in data["fields"].items()}
    return Tokenizer(HFTokenizer.from_str(data["hf"]), **fields)


# --------------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------------


def _write(folder: Path, model) -> None:
    arrays = {k: np.asarray(v, np.float32) for k, v in _named_arrays(model.params).items()}
    table, offset = [], 0
    for name, a in arrays.items():
        table.append({"name": name, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // ALIGN) * ALIGN
    folder.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(folder.parent).free < offset + DISK_MARGIN:
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        with open(tmp / "weights.bin", "wb") as f:
            for entry, a in zip(table, arrays.values()):
                f.seek(entry["offset"])
                f.write(np.ascontiguousarray(a).tobytes())
            f.truncate(offset)
        meta = {"format": FORMAT, "config": dataclasses.asdict(model.config), "arrays": table,
                "tokenizer": _tokenizer_json(model.tokenizer)}
        (tmp / "model.json").write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, folder)  # atomic; fails if another process won the race, which is as good
        for old in folder.parent.iterdir():  # entries of this path for an older file or older code
            if old != folder and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def _read(folder: Path, name: str):
    from lmprog.backends.llama import LlamaConfig, LlamaModel

    meta = _read_meta(folder)
    if meta is None:
        return None
    try:
        config = LlamaConfig(**meta["config"])
        blob = np.memmap(folder / "weights.bin", dtype=np.uint8, mode="r")
        arrays = {}
        for e in meta["arrays"]:
            n = int(np.prod(e["shape"], dtype=np.int64)) * 4
            if e["offset"] + n > blob.size:
                return None
            view = blob[e["offset"]: e["offset"] + n].view(np.float32).reshape(e["shape"])
            arrays[e["name"]] = jax.device_put(np.asarray(view))
        tokenizer = _tokenizer_from(meta["tokenizer"])
        return LlamaModel(name, config, _weights_from(arrays, config.n_layers), tokenizer)
    except Exception:  # a damaged entry (any error reading it): parse the file again
        return None


def cached(path: Path, name: str, load: Callable[[], object]):
    """``load()`` (parse the model at ``path``), or the same model from its cache entry; writes the entry on a
    miss."""
    if not enabled(path):
        return load()
    folder = entry_folder(path)
    if folder.is_dir():
        model = _read(folder, name)
        if model is not None:
            return model
        shutil.rmtree(folder, ignore_errors=True)
    model = load()
    _write(folder, model)
    return model


def cached_tokenizer(path: Path):
    """The tokenizer of the model at ``path`` from its cache entry, or None (no entry)."""
    if not enabled(path):
        return None
    meta = _read_meta(entry_folder(path))
    if meta is None:
        return None
    try:
        return _tokenizer_from(meta["tokenizer"])
    except Exception:
        return None
