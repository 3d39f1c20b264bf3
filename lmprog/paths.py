"""Where lmprog keeps its on-disk caches. A leaf module (no JAX), so the front end, the constraint compiler and
tools that never run a model can find the caches without importing JAX."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Root of lmprog's on-disk caches (``$LMPROG_CACHE_DIR``, else ``~/.cache/lmprog``)."""
    return Path(os.environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog")
