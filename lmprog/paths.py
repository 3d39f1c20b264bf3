"""Where lmprog keeps its on-disk caches. A leaf module (no JAX), so the front end, the constraint compiler and
tools that never run a model can find the caches without importing JAX."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["cache_dir", "save_npz", "write_atomic"]


def cache_dir() -> Path:
    """Root of lmprog's on-disk caches (``$LMPROG_CACHE_DIR``, else ``~/.cache/lmprog``)."""
    return Path(os.environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog")


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> bool:
    """Write the cache entry ``path`` with ``write(f)`` (``f`` a binary file) atomically: a temporary file in the
    same folder, then renamed, so a reader never sees half an entry (another process may be writing the same
    one). A cache folder that cannot be written is not an error: the entry is built again next time. Returns
    whether the entry was written."""
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


def save_npz(path: Path, arrays: dict) -> bool:
    """Write ``arrays`` to the cache entry ``path`` (``np.savez``) atomically (:func:`write_atomic`)."""
    import numpy as np

    return write_atomic(path, lambda f: np.savez(f, **arrays))
