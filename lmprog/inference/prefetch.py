"""Loading last run's kernel executables in the background, while the process does everything else.

A warm ``lmprog run`` spends most of its set-up loading the kernels' executables from the disk cache
(:mod:`lmprog.inference.aot`): XLA links several megabytes of generated code for the default model's hole
kernel (0.7 s on a 2-core CPU). That work needs nothing but the file, so it can start as soon as JAX is
imported and overlap parsing the program, loading the model and lowering, on another core (XLA's
deserialization releases the GIL).

Which files to load is learnt from the last run of the same command: :func:`remember` writes the names of the
executables a run used under ``cache_dir()/kernels/recent/`` keyed by a *tag* (the CLI's: the program's path
and the command-line options), :func:`start` reads that list and deserializes each file in one background
thread, and :func:`take` hands a finished one to :class:`~lmprog.inference.aot.DiskJit` (waiting for it if it is
still loading). A file the run turns out not to need costs only background work; a missing or damaged one is
skipped (``DiskJit`` then loads or compiles as usual). Nothing here changes what runs: an executable is only
ever used for the exact cache key it was stored under.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from lmprog.backends.jax_setup import cache_dir
from lmprog.paths import write_atomic

__all__ = ["remember", "start", "stop", "take", "used"]

#: At most this many executables are prefetched (the default model's runs use 5-8).
MAX_FILES = 16

#: Executables handed over by :func:`take` in this process.
TAKEN = 0

_pending: dict[str, concurrent.futures.Future] = {}
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_used: list[str] = []


def _index(tag: str) -> Path:
    return cache_dir() / "kernels" / "recent" / (hashlib.sha256(tag.encode()).hexdigest()[:32] + ".json")


def _supported() -> bool:
    return hasattr(serialize_executable, "_JaxPjrtUnpickler")


def start(tag: str) -> int:
    """Start loading the executables the last run with ``tag`` used; returns how many were queued."""
    global _pool
    if not _supported() or os.environ.get("LMPROG_NO_KERNEL_CACHE"):
        return 0
    try:
        names = json.loads(_index(tag).read_text(encoding="utf-8"))[:MAX_FILES]
    except (OSError, ValueError, TypeError):
        return 0
    folder = cache_dir() / "kernels"
    paths = [folder / n for n in names if isinstance(n, str) and "/" not in n and (folder / n).is_file()]
    if not paths:
        return 0
    backend = jax.devices()[0].client
    _pool = _pool or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmprog-prefetch")
    for p in paths:
        if str(p) not in _pending:
            _pending[str(p)] = _pool.submit(_unpickle, p, backend)
    return len(paths)


def _unpickle(path: Path, backend):
    """The first half of ``serialize_executable.deserialize_and_load``: the costly part, no pytree needed."""
    payload, out_tree = pickle.loads(path.read_bytes())
    unloaded, args_info_flat, no_kwargs = serialize_executable._JaxPjrtUnpickler(io.BytesIO(payload),
                                                                                 backend).load()
    return unloaded, args_info_flat, no_kwargs, out_tree


def take(path: Path, in_tree):
    """The prefetched executable stored at ``path`` as a ``jax.stages.Compiled`` (the second half of
    ``deserialize_and_load``), or None when it was not prefetched or failed to load."""
    global TAKEN
    future = _pending.pop(str(path), None)
    if future is None:
        return None
    try:
        unloaded, args_info_flat, no_kwargs, out_tree = future.result()
        compiled = jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info_flat), out_tree,
                                       no_kwargs=no_kwargs)
    except Exception:  # damaged, or from another build: DiskJit loads or compiles it itself
        return None
    TAKEN += 1
    return compiled


def used(path: Path) -> None:
    """Note that this process used the executable at ``path`` (loaded or freshly written)."""
    if path.name not in _used:
        _used.append(path.name)


def stop() -> None:
    """Drop what was prefetched and not used, and wait for the loader thread (before the process exits)."""
    global _pool
    pending = list(_pending.values())
    _pending.clear()
    for f in pending:
        f.cancel()
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


def remember(tag: str) -> None:
    """Record the executables this process used under ``tag``, for the next :func:`start` with that tag."""
    stop()
    if not _used:
        return
    write_atomic(_index(tag), lambda f: f.write(json.dumps(_used[:MAX_FILES]).encode()))
