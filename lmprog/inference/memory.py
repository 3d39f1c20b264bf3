"""Memory pre-flight: what a run will allocate, estimated before it allocates anything.

A run's device memory beyond the loaded weights is, per part (``P`` particles in all, ``V`` the width of the
token table, ``L`` a particle's own cache slots, ``S`` the bytes of one cache slot of one row)::

    own KV caches     P x L x S x c      c = 1, +1 when the cache is gathered (beam search; decoding every
                                          particle in place, which first gives each particle its own row:
                                          the gather writes a new copy), +1 when MCMC keeps the current state
                                          beside the proposal. Resampling copies nothing (Particles.row)
    shared prefix     prefix_len x S     (once)
    decode step       B x V x 4 x 6      logits, masked logits, their exponentials and CDF, masks, for the B rows
                                          of the largest decode block (B <= P: distinct histories in blocks of
                                          bounded size, kernel.decode_block_rows; beam: B = P)
    forced text       P x T x V x 4 x 3  T <= FEED_CHUNK: observed text scored in blocks (logits, log-softmax)
    buffers, traces   P x buf_len x 4 x (1 + 7 when MCMC traces)
    token table       its bytes (once); XLA scratch: a fixed allowance
    enumerated holes  (R + P) x L x S + BLOCK x V x 4 x 3: the trie's scratch cache rows (R <= MAX_ROWS:
                                          classes x fed nodes, lmprog.inference.enumeration), every
                                          particle's own row after the draw, one block's logits

The estimate is compared with what the device can give: ``memory_limit`` bytes when set (``--memory-limit``),
else the device's free memory (on the CPU: ``MemAvailable`` of ``/proc/meminfo``; on accelerators:
``memory_stats()``), less a safety margin. A second model (``model judge = "..."``) is loaded before this reads
the free memory, so its weights are counted there; ``logprob_of`` scoring between kernel steps holds at most
``lmprog.backends.scoring.CHUNK_BYTES`` (128 MiB) of logits at a time, inside the fixed scratch allowance. A run that does not fit is split into *waves* when its strategy
allows it (independent runs of fewer particles, one after another, combined with their absolute weights:
an island particle filter, properly weighted, whose ``log Z`` is the mean of the waves' ``Z``), or refused
with :class:`MemoryPlanError` saying how many particles fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import jax
import numpy as np

from lmprog.inference import enumeration
from lmprog.inference.kernel import DECODE_ROW_WORDS, decode_block_rows
from lmprog.inference.segments import Observe

__all__ = ["MemoryPlan", "MemoryPlanError", "available_bytes", "cache_slot_bytes", "estimate", "parse_size", "plan"]

#: Fixed allowance for XLA's scratch buffers and the runtime (bytes).
SCRATCH_BYTES = 256 << 20
#: Share of the free memory a run may plan to use (the rest absorbs what the estimate does not see).
SAFETY = 0.85
#: The most waves a run is split into before it is refused.
MAX_WAVES = 64


class MemoryPlanError(ValueError):
    """A run that cannot fit in the memory it may use (exit status 2 at the CLI)."""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate of a run and how it will run: ``waves`` independent runs of ``wave_particles`` each
    (``waves == 1``: as asked). ``parts`` is the estimate by part (bytes); ``limit`` what it may use."""

    need: int
    limit: int
    parts: dict
    waves: int = 1
    wave_particles: int = 0

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in self.parts.items() if v)
        return f"needs about {_gb(self.need)} of {_gb(self.limit)} available ({parts})"


def _gb(n: float) -> str:
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{max(1, round(n / 2**10))} KiB"


def parse_size(text) -> int:
    """``"4G"``, ``"512M"``, ``"2.5GiB"``, ``"1000000"`` -> bytes. Raises ``ValueError`` on anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not text > 0 or not math.isfinite(float(text)):
            raise ValueError(f"a memory size must be positive, got {text!r}")
        return int(text)
    s = str(text).strip().upper().replace("IB", "").replace("B", "")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    mult = 1
    if s and s[-1] in scale:
        mult, s = scale[s[-1]], s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 4G, 512M or a number of bytes)") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value * mult)


def available_bytes(device=None) -> int:
    """Memory a run may allocate now on ``device`` (default: JAX's first device)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))  # pragma: no cover


def cache_slot_bytes(lm) -> int:
    """Bytes of one KV-cache slot of one row (all layers, keys and values), from the cache's shapes alone."""
    def size(n):
        shapes = jax.eval_shape(lambda: lm.init_cache(1, n))
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(shapes))
    return max(0, (size(32) - size(16)) // 16)


def estimate(slot: int, layout, num: int, cfg, vocab: int, table_bytes: int, observe_width: int) -> dict:
    """The parts of a run's memory (bytes), see the module docstring. ``slot``: :func:`cache_slot_bytes` of the
    model; ``layout``: the engine's :class:`~lmprog.inference.engine.Layout`; ``num``: particles in all (groups
    x particles); ``observe_width``: the widest block of observed text fed at once after the shared prefix."""
    small, large = decode_block_rows(num, vocab)
    # A gathered copy of the caches: beam search reorders them every step; decoding every particle in place
    # (more distinct histories than a small block, all particles in one block) first puts each in its own row.
    # Resampling moves row indices only (Particles.row).
    gathered = cfg.select == "beam" or not cfg.distinct or small < num <= large
    copies = 1 + int(gathered) + int(cfg.trace)
    return {
        "caches": num * layout.own_len * slot * copies,
        "prefix": layout.prefix_buf * slot,
        "step": _step_bytes(num, vocab, cfg),
        "observe": num * observe_width * vocab * 4 * 3,
        "buffers": num * layout.buf_len * 4 * (1 + (7 if cfg.trace else 0)),
        "table": int(table_bytes),
        "scratch": SCRATCH_BYTES,
    }


def _step_bytes(num: int, vocab: int, cfg) -> int:
    """A decode step's working set: ``[rows, V]`` float32 arrays for the rows of its largest block (every
    particle for beam search and the per-particle step), plus ``[P]`` words per particle."""
    rows = decode_block_rows(num, vocab)[1] if (cfg.distinct and cfg.select != "beam") else num
    return rows * vocab * 4 * DECODE_ROW_WORDS + num * 4 * 16


def plan(lm, program, strategy, groups: int, layout, feed_chunk: int, memory_limit=None) -> MemoryPlan:
    """How ``strategy`` will run ``program`` with ``groups`` groups (see the module docstring): ``layout`` is the
    engine's :class:`~lmprog.inference.engine.Layout`, ``feed_chunk`` the most forced tokens fed per call.
    Raises :class:`MemoryPlanError` when even the smallest allowed split does not fit."""
    limit = parse_size(memory_limit) if memory_limit is not None else int(available_bytes() * SAFETY)
    width = min(feed_chunk, _observe_width(program, layout.first))
    slot = cache_slot_bytes(lm)  # once: the wave search and the bisection below estimate many particle counts

    def need(particles: int) -> tuple[int, dict]:
        cfg, num = strategy.with_particles(max(1, particles)).footprint(groups)
        num = num if particles else 0
        parts = estimate(slot, layout, num, cfg, program.vocab, program.table.nbytes, width)
        parts["enumerate"] = enumeration.preflight_bytes(program, lm.tokenizer, strategy, cfg, num, slot,
                                                         layout.own_len)
        return sum(parts.values()), parts

    n = strategy.num_particles
    total, parts = need(n)
    if total <= limit:
        return MemoryPlan(total, limit, parts, 1, n)
    if groups == 1 and getattr(strategy, "waveable", False):
        for waves in range(2, min(MAX_WAVES, n) + 1):
            m = -(-n // waves)
            t, p = need(m)
            if t <= limit:
                return MemoryPlan(t, limit, p, -(-n // m), m)
            if m == 1:
                break
    fit = _most_particles(need, limit, n)
    hint = (f"at most {fit} particles fit" if fit else "not even one particle fits") + \
        (" per row" if groups > 1 else "")
    raise MemoryPlanError(
        f"{strategy.name} with {n} particles{f' x {groups} rows' if groups > 1 else ''} "
        f"{MemoryPlan(total, limit, parts).describe()}; {hint}"
        + ("" if getattr(strategy, "waveable", False) and groups == 1 else
           f" ({strategy.name} cannot be split into waves)")
        + "; use fewer particles or a larger --memory-limit")


def _most_particles(need, limit: int, n: int) -> int:
    lo, hi = 0, n  # need(lo) fits (0: trivially), need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if need(mid)[0] <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def _observe_width(program, first: int) -> int:
    widths = [len(s.tokens) if s.tokens is not None else int(s.max_tokens)
              for s in program.segments[first:] if type(s) is Observe]
    return max(widths, default=0)
