"""Process-wide JAX settings lmprog relies on."""

from __future__ import annotations

import os
from pathlib import Path

import jax

_done = False


def cache_dir() -> Path:
    """Root of lmprog's on-disk caches (``$LMPROG_CACHE_DIR``, else ``~/.cache/lmprog``)."""
    return Path(os.environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog")


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache so a second run does not recompile the kernels."""
    global _done
    if _done or os.environ.get("LMPROG_NO_COMPILATION_CACHE"):
        return
    path = cache_dir() / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _done = True
