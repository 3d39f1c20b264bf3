"""Where lmprog keeps its on-disk caches. A leaf module (no JAX), so the front end, the constraint compiler and
tools that never run a model can find the caches without importing JAX."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "save_npz"]


def cache_dir() -> Path:
    """Root of lmprog's on-disk caches (``$LMPROG_CACHE_DIR``, else ``~/.cache/lmprog``)."""
    return Path(os.environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog")


def save_npz(path: Path, arrays: dict) -> None:
    """Write ``arrays`` to the cache entry ``path`` (``np.savez``) atomically: a temporary file in the same
    folder, then renamed, so a reader never sees half an entry. A read-only cache folder is not an error: the
    entry is built again next time."""
    import tempfile

    import numpy as np

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
