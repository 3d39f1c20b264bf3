"""Process-wide JAX settings lmprog relies on."""

from __future__ import annotations

import os

import jax
import numpy as np

from lmprog.paths import cache_dir  # noqa: F401 (re-exported: the caches beside the JAX settings)

_done = False


def to_device(x, dtype=None) -> jax.Array:
    """Host data ``x`` as a device array, compiling nothing. ``jnp.asarray`` of a numpy array, ``jnp.int32(n)``
    and ``jnp.zeros(shape)`` each compile a small XLA program per shape and dtype outside ``jit`` (10-50 ms each,
    paid again by every process: most of a warm run's set-up); ``device_put`` of a numpy array only copies it."""
    a = np.asarray(x, dtype)
    want = jax.dtypes.canonicalize_dtype(a.dtype)  # float64 -> float32 unless x64 is on, as jnp.asarray does
    return jax.device_put(a if a.dtype == want else a.astype(want))


def round_pow2(n: int, least: int = 1) -> int:
    """``n`` rounded up to a power of two, at least ``least``: array sizes from few shapes, so that varying
    lengths reuse few compilations."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache so a second run does not recompile the kernels."""
    global _done
    if _done or os.environ.get("LMPROG_NO_COMPILATION_CACHE"):
        return
    path = cache_dir() / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Only compilations this slow are stored (LMPROG_XLA_CACHE_MIN_SECS: tests store every one).
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("LMPROG_XLA_CACHE_MIN_SECS", 0.5)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _done = True
