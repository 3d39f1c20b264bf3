"""Particle state: arrays with a leading particle axis, plus the run-level state around them.

The engine keeps every particle in lock step on the same *segment* of the program (the host walks the
segments); inside a hole each particle has its own automaton state, counters, token count and end flag,
so particles finish holes at different steps and idle (masked) until the slowest one is done.

Token stream conventions (per particle):

* ``last`` is the *pending* token: the newest token of the sequence, not yet fed to the LM. It sits at
  (absolute) position ``position``; the positions before it are in the KV cache: ``0 .. S0 - 1`` in the
  shared prefix (``Consts.prefix``, stored once), ``S0 .. position - 1`` in the particle's own cache
  (own slot ``position - S0``).
* ``tokens[:length]`` is every token after the shared prompt prefix (forced and generated), ``last``
  included once it is past the prefix. ``tokens[length:force_len]`` are tokens to *replay*: while
  ``length < force_len`` a hole step takes ``tokens[length]`` instead of sampling (conditional SMC's
  reference trajectory, MCMC chains started from given sequences).

The :class:`Trace` records, per particle, what MCMC needs to cut a trajectory at any token or segment and
regenerate the rest (see :mod:`lmprog.inference.mcmc`); its arrays have width 0 unless the kernels trace.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from lmprog.automata.table import TokenTable

PyTree = Any


class Trace(NamedTuple):
    """Per-particle history for suffix moves. Token arrays ``[P, L]`` hold the state *before* the token at
    that index of ``tokens`` was generated (only hole tokens are recorded); segment arrays ``[P, S]`` hold
    the state at the start of segment ``s`` of the program (``s = S - 1``: the end of the program). Widths are
    0 when not tracing."""

    auto: jax.Array  # [P, L] int32 automaton state before the token
    counts: jax.Array  # [P, L, 3] int32 hole counters before the token
    log_weight: jax.Array  # [P, L] f32 Particles.lw_total before the token
    score: jax.Array  # [P, L] f32 Particles.score before the token
    hole_logp: jax.Array  # [P, L] f32 the current hole's log-probability before the token
    seg_length: jax.Array  # [P, S] int32 tokens at the start of segment s
    seg_log_weight: jax.Array  # [P, S] f32 lw_total at the start of segment s
    seg_score: jax.Array  # [P, S] f32 score at the start of segment s
    seg_data: jax.Array  # [P, S] int32 id of the host data snapshot at the start of segment s (-1: none)


class Particles(NamedTuple):
    """Per-particle arrays, leading axis ``P`` (= groups x particles per group)."""

    last: jax.Array  # [P] int32 pending token
    position: jax.Array  # [P] int32 absolute position of `last` (own cache slot position - S0)
    length: jax.Array  # [P] int32 tokens after the shared prefix
    tokens: jax.Array  # [P, L] int32 the tokens after the shared prefix
    auto: jax.Array  # [P] int32 global automaton state in the current hole (-1 outside)
    counts: jax.Array  # [P, 3] int32 raw tokens/characters/words counts in the current hole (TokenTable.init_counts)
    hole: jax.Array  # [P] int32 index of the hole being generated (-1 none): the per-particle program counter
    n_hole: jax.Array  # [P] int32 tokens generated in the current hole
    done: jax.Array  # [P] bool finished (or skipped, or died in) the current hole
    log_weight: jax.Array  # [P] f32 log importance weight since the last resampling (beam: the score)
    score: jax.Array  # [P] f32 log target density of the particle's sequence (log gamma): LM log-probs + factors
    cause: jax.Array  # [P] int32 0 alive, else lmprog.inference.segments.Cause
    spans: jax.Array  # [P, H, 2] int32 [start, end) of each hole in `tokens`
    hole_logp: jax.Array  # [P, H] f32 LM log-probability (tempered) of each hole's tokens
    origin: jax.Array  # [P] int32 index, at the last host sync, of the particle this one descends from
    lw_total: jax.Array  # [P] f32 sum of every log-weight increment so far (never reset by resampling)
    force_len: jax.Array  # [P] int32 replay tokens[length:force_len] instead of sampling (0: none)
    # [P] int32 the row of RunState.cache holding the particle's history (its own slots before `position`).
    # Particles may share a row: resampling moves these indices, never the cache. Sharers agree on the row's
    # slots below the least of their positions; a kernel that writes a row first gives a row of its own (a copy)
    # to every sharer that would write something else there (Kernels._unshare). Particles with equal (row,
    # position, last) have the same history and pending token, hence the same next-token logits.
    row: jax.Array
    # [P] int32 the particle's ancestor in the first generation (its "Eve"; follows resampling, never reset):
    # with the final weights it gives log Z's standard error (lmprog.inference.evidence).
    eve: jax.Array
    # [P] f32 log psi of the particle's last hole token: the one-step twist its proposal folded into the weight
    # (lmprog.inference.lookahead), taken out of the weight at its next hole step. 0 without lookahead.
    twist: jax.Array
    trace: Trace


class HoleParams(NamedTuple):
    """The current hole, per particle (so branches can give particles different holes). All traced: one
    compiled kernel serves every hole of every program with the same shapes."""

    start: jax.Array  # [P] int32 start state (-1: the particle skips this hole)
    hole: jax.Array  # [P] int32 hole index
    max_tokens: jax.Array  # [] int32 budget tokens(X) <= max_tokens, enforced by TokenTable.mask
    max_steps: jax.Array  # [] int32 hard cap on tokens generated in the hole (budget + terminator slack)
    pause: jax.Array  # [] int32 particles with n_hole >= pause idle (not done): MCMC moves on a partial hole


class Consts(NamedTuple):
    """Per-run constants the kernels read (device arrays, traced)."""

    table: TokenTable  # every hole's automaton and counters (global state ids)
    temperature: jax.Array  # [] f32
    ess_threshold: jax.Array  # [] f32 resample a group when ESS < ess_threshold * N (>= 1: every step)
    # The shared prompt prefix's KV cache, stored once (one row; lmprog.backends.base.Prefix) and attended to by
    # every particle: RunState.cache holds only the particles' own slots after it. A run constant: never
    # donated, reordered, copied or selected per particle. None: the particles' caches start at position 0.
    prefix: PyTree = None


class RunState(NamedTuple):
    """Everything the device loop carries. Donated to the kernels, updated in place."""

    particles: Particles
    cache: PyTree  # the LM's KV cache, P rows of own slots after Consts.prefix; particle i's is row Particles.row[i]
    log_z: jax.Array  # [G] f32 log-evidence accumulated at resampling steps (see docs/inference.md)
    key: jax.Array  # PRNG key
    n_tokens: jax.Array  # [] int32 tokens processed (generated by live particles + forced)
    n_forward: jax.Array  # [] int32 LM forward passes (batched apply calls)
    n_rows: jax.Array  # [] int32 LM rows computed by the hole steps (distinct histories x blocks, padding included)


def init_trace(num: int, buffer_len: int, num_segments: int) -> Trace:
    """An empty trace (``buffer_len = num_segments = 0``: not tracing), as host arrays."""
    i32, f32 = np.int32, np.float32
    return Trace(
        auto=np.full((num, buffer_len), -1, i32),
        counts=np.zeros((num, buffer_len, 3), i32),
        log_weight=np.zeros((num, buffer_len), f32),
        score=np.zeros((num, buffer_len), f32),
        hole_logp=np.zeros((num, buffer_len), f32),
        seg_length=np.zeros((num, num_segments), i32),
        seg_log_weight=np.zeros((num, num_segments), f32),
        seg_score=np.zeros((num, num_segments), f32),
        seg_data=np.full((num, num_segments), -1, i32),
    )


def init_particles(
    num: int, buffer_len: int, num_holes: int, last: int, position: int, *, num_segments: int = 0, trace: bool = False
) -> Particles:
    """Fresh particles sitting right after the shared prefix (pending token ``last`` at ``position``);
    with ``trace``, room to record every token and segment start (:class:`Trace`). Built on the host and copied
    to the device: building it with ``jnp`` would compile one small program per array."""
    i32 = np.int32
    return jax.device_put(Particles(
        last=np.full((num,), last, i32),
        position=np.full((num,), position, i32),
        length=np.zeros((num,), i32),
        tokens=np.zeros((num, buffer_len), i32),
        auto=np.full((num,), -1, i32),
        counts=np.zeros((num, 3), i32),  # TokenTable.init_counts, on the host
        hole=np.full((num,), -1, i32),
        n_hole=np.zeros((num,), i32),
        done=np.ones((num,), bool),
        log_weight=np.zeros((num,), np.float32),
        score=np.zeros((num,), np.float32),
        cause=np.zeros((num,), i32),
        spans=np.zeros((num, num_holes, 2), i32),
        hole_logp=np.zeros((num, num_holes), np.float32),
        origin=np.arange(num, dtype=i32),
        lw_total=np.zeros((num,), np.float32),
        force_len=np.zeros((num,), i32),
        row=np.zeros((num,), i32),  # fresh particles have the same (empty) history: one row
        eve=np.arange(num, dtype=i32),
        twist=np.zeros((num,), np.float32),
        trace=init_trace(num, buffer_len if trace else 0, num_segments if trace else 0),
    ))
