"""Kernels compiled ahead of time and kept on disk, so that a warm run neither traces nor lowers them.

``jax.jit`` traces a kernel to a jaxpr, lowers it to StableHLO and only then asks the persistent compilation
cache for the executable: with the 30 unrolled layers of the default model that is about 1.5 s of Python per
process for the hole kernel alone, before any token is computed. :class:`DiskJit` keeps the *compiled
executable* itself (``jax.experimental.serialize_executable``; the output tree is pickled with it, the input tree
is that of the call, since equinox modules' trees do not survive pickling) under ``cache_dir()/kernels/``, keyed
by everything the trace depends on:

* the kernel's name and the static configuration it closes over (:class:`~lmprog.inference.kernel.KernelConfig`,
  the model's ``aot_key``: its architecture, not its weights, which are arguments);
* the arguments' tree structure and every leaf's shape, dtype and weak type, and static argument values;
* the module constants the kernels read when traced (upper-case numbers and flags of the kernel, engine, state,
  table and Llama modules, which tests change);
* the source of every lmprog module, the versions of jax and jaxlib, the backend, device kind and CPU flags
  (an executable compiled for one CPU may not run on another), and the process's place in a ``jax.distributed``
  run and its first device (:func:`_devices`). Sharded runs (particles over devices,
  :mod:`lmprog.inference.sharding`) pass arrays on several devices, so they always run through ``jax.jit``.

A call with a new signature loads the executable from disk if it is there (no trace, no lowering), else
compiles it through ``jax.jit(...).lower(...).compile()`` and writes it. That compilation bypasses XLA's own
persistent cache, which still serves every other jitted function: an executable *loaded* from that cache
serializes without its generated code. Anything that cannot be keyed safely (a leaf that is not an array or a Python number, arrays on
several devices) or serialized (a host callback) simply runs through ``jax.jit``. A model without ``aot_key``
(the toy models of the tests) always does. ``LMPROG_NO_KERNEL_CACHE=1`` turns the disk cache off; the folder
is trimmed to :data:`MAX_BYTES` by least recent use.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import platform
import sys
import weakref
from functools import lru_cache
from pathlib import Path

import jax
import numpy as np
from jax.experimental import serialize_executable

from lmprog.backends.jax_setup import cache_dir
from lmprog.paths import write_atomic
from lmprog.inference import prefetch

__all__ = ["DiskJit", "LOADS", "clear", "enabled"]

FORMAT = 1
#: The kernels folder is trimmed to this size (oldest entries first) after each write.
MAX_BYTES = 2 << 30
#: Executables loaded from disk, by kernel name (run time counts their loading as compile time).
LOADS: collections.Counter = collections.Counter()
#: Modules whose upper-case constants are part of every key.
CONSTANT_MODULES = ("lmprog.inference.kernel", "lmprog.inference.engine", "lmprog.inference.state",
                    "lmprog.automata.table", "lmprog.backends.llama")

_LIVE: "weakref.WeakSet[DiskJit]" = weakref.WeakSet()


def enabled() -> bool:
    return not os.environ.get("LMPROG_NO_KERNEL_CACHE")


def clear() -> None:
    """Drop every in-process executable (as ``jax.clear_caches`` does for ``jax.jit``)."""
    for f in list(_LIVE):
        f._compiled.clear()


@lru_cache(maxsize=1)
def _environment() -> str:
    """What an executable depends on beyond its program: lmprog's source, jax, the device, the CPU."""
    import jaxlib

    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the lmprog package
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    dev = jax.devices()[0]
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    h.update(repr((FORMAT, jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind,
                   getattr(dev.client, "platform_version", ""), platform.machine(), flags,
                   sys.version_info[:2])).encode())
    return h.hexdigest()


def _devices() -> tuple:
    """The devices an executable runs on: a kernel without array arguments is compiled for the default device,
    whose id differs between the processes of a ``jax.distributed`` run (process 1's executable cannot run in
    process 0). Executables taking arrays on several devices are never kept (:func:`_leaf_signature`)."""
    return jax.process_count(), jax.process_index(), jax.local_devices()[0].id


def _constants() -> str:
    parts = []
    for name in CONSTANT_MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        for attr, value in sorted(vars(module).items()):
            if attr.isupper() and isinstance(value, (bool, int, float, str)):
                parts.append(f"{name}.{attr}={value!r}")
    return ";".join(parts)


def _leaf_signature(x):
    """A leaf's shape, dtype and weak type, or None where the leaf cannot be keyed safely."""
    if isinstance(x, jax.Array):
        devs = x.sharding.device_set
        if len(devs) != 1 or (getattr(x, "committed", False) and devs != set(jax.local_devices()[:1])):
            return None  # kept executables run on the first local device (_devices)
        return (x.shape, str(x.dtype), bool(getattr(x, "weak_type", False)))
    if isinstance(x, np.ndarray):
        return (x.shape, str(x.dtype), False)
    if isinstance(x, (bool, int, float)) and not isinstance(x, np.generic):
        return (type(x).__name__,)
    if isinstance(x, np.generic):
        return ((), str(x.dtype), False)
    return None


class DiskJit:
    """``jax.jit(fn, ...)`` whose executables are also kept on disk (see the module docstring).

    ``key`` names the static context ``fn`` closes over (None: plain ``jax.jit``, nothing kept)."""

    def __init__(self, fn, name: str, key: str | None, static_argnames=(), donate_argnames=()):
        self.jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnames=donate_argnames)
        self.name = name
        self.key = key
        self.static = tuple(static_argnames)
        self._compiled: dict = {}
        _LIVE.add(self)

    def __call__(self, *args, **kwargs):
        if self.key is None or not enabled():
            return self.jitted(*args, **kwargs)
        static = tuple((k, kwargs[k]) for k in self.static if k in kwargs)
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
        leaves, tree = jax.tree_util.tree_flatten((args, dynamic))
        sigs = tuple(_leaf_signature(x) for x in leaves)
        if any(s is None for s in sigs):
            return self.jitted(*args, **kwargs)
        sig = (tree, static, sigs)
        compiled = self._compiled.get(sig)
        if compiled is None:
            compiled = self._compiled[sig] = self._load_or_compile(sig, args, kwargs)
        return compiled(*args, **dynamic)

    # ---- disk ----------------------------------------------------------------------------------

    def _path(self, sig) -> Path:
        tree, static, sigs = sig
        text = repr((self.name, self.key, str(tree), static, sigs, _constants(), _environment(), _devices()))
        return cache_dir() / "kernels" / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.bin"

    def _load_or_compile(self, sig, args, kwargs):
        path = self._path(sig)
        prefetch.used(path)
        compiled = prefetch.take(path, sig[0])
        if compiled is not None:
            _touch(path)
            LOADS[self.name] += 1
            return compiled
        if path.is_file():
            try:
                payload, out_tree = pickle.loads(path.read_bytes())
                # On this process's first device, where it was compiled (the default: every device of the
                # backend, which on a machine of several devices, or in a jax.distributed run, is not it).
                compiled = serialize_executable.deserialize_and_load(payload, sig[0], out_tree,
                                                                     execution_devices=jax.local_devices()[:1])
                _touch(path)
                LOADS[self.name] += 1
                return compiled
            except Exception:  # damaged, or written by an incompatible build: compile again
                path.unlink(missing_ok=True)
        compiled = _compile_afresh(self.jitted.lower(*args, **kwargs))
        try:
            payload, _, out_tree = serialize_executable.serialize(compiled)
            blob = pickle.dumps((payload, out_tree))
            if pickle.loads(blob)[1] != out_tree:  # a node type whose tree does not survive pickling
                return compiled
        except Exception:  # not serializable (e.g. a host callback): keep it in this process only
            return compiled
        _write(path, blob)
        return compiled


def _touch(path: Path) -> None:
    """Least recently used entries go first when trimming."""
    try:
        os.utime(path)
    except OSError:
        pass


def _compile_afresh(lowered):
    """``lowered.compile()``, never served by XLA's persistent cache: an executable *loaded* from that cache
    serializes without its generated code (calling it after loading fails: "Function ... not found"). JAX decides
    once per process whether it uses that cache; ``reset_cache`` makes it decide again (public since jax 0.4.26,
    documented in its persistent cache guide), so the cache is off for this compilation only."""
    from jax._src import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def _write(path: Path, blob: bytes) -> None:
    if write_atomic(path, lambda f: f.write(blob)):
        _trim(path.parent)


def _trim(folder: Path) -> None:
    entries = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in folder.glob("*.bin"))
    total = sum(size for _, size, _ in entries)
    for _, size, p in entries:
        if total <= MAX_BYTES:
            break
        p.unlink(missing_ok=True)
        total -= size


