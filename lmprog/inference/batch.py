"""Batch mode in the engine: many rows (the same program lowered with different inputs) as groups of one call.

Rows whose segment programs have the same *structure key* (computed at lowering: segment kinds, holes, value
rules, token table) run together: row ``g`` is group ``g`` (its own particles, resampling and log Z), so the
whole batch is one set of compiled kernels and one device loop. :func:`combine` builds the one segment program
that runs ``programs[g]`` on group ``g``'s particles: static text that is the same for every row stays
static (the shared prefix is prefilled once), text that differs is rendered per row (the engine prefills a
row's own prompt text once and broadcasts it to the row's particles), and each row's host callables see only
their own rows of the host view. A row whose callable raises gets its particles killed and the exception
recorded, never stopping the others.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Hashable, Sequence

import numpy as np

from lmprog.inference import engine, memory
from lmprog.inference.segments import Hole, Host, Observe, SegmentProgram, Text

__all__ = ["MAX_BATCH_PARTICLES", "combine", "run_groups", "run_rows"]

#: Rows per engine call are limited so that rows x particles stays within this many particles.
MAX_BATCH_PARTICLES = 4096


def run_rows(lm, rows: Sequence[tuple[Hashable, SegmentProgram]], strategy, *, seed: int,
             max_batch_particles: int = MAX_BATCH_PARTICLES, progress=None, memory_limit=None) -> list:
    """Run every ``(structure key, program)`` row with ``strategy``: rows with equal keys as groups of one
    engine call, in calls of equal size (as many as ``max_batch_particles`` needs; the last one padded with a
    copy of one of its rows, whose result is dropped), so they share one compiled kernel set.

    Returns per row, in order, a one-group :class:`InferenceResult`, the exception of a row that ran alone,
    or ``None`` for a row that failed inside its batch (every particle dead, a failing callable): run it alone
    to get its own error. A strategy that is not ``batchable`` runs each row alone. Rows per call are also
    limited to what fits in memory (``memory_limit``, see :mod:`lmprog.inference.memory`).
    """
    out: list = [None] * len(rows)

    def alone(k: int):
        try:
            out[k] = engine.run(lm, rows[k][1], strategy, seed=seed, progress=progress, memory_limit=memory_limit)
        except Exception as exc:  # noqa: BLE001 - reported in the row's place
            out[k] = exc

    if not strategy.batchable:
        for k in range(len(rows)):
            alone(k)
        return out
    classes: dict[Hashable, list[int]] = {}
    for k, (key, _) in enumerate(rows):
        classes.setdefault(key, []).append(k)

    def call(chunk: list[int], size: int) -> None:
        if size == 1:
            alone(chunk[0])
            return
        programs = [rows[k][1] for k in chunk]
        programs += [programs[0]] * (size - len(chunk))  # same batch shape as the other calls: no new compile
        try:
            results = run_groups(lm, programs, strategy, seed=seed, progress=progress,
                                 memory_limit=memory_limit)[:len(chunk)]
        except memory.MemoryPlanError:  # this call's rows need more than the sample planned for: halves
            half = -(-len(chunk) // 2)
            for part in (chunk[:half], chunk[half:]):
                if part:
                    call(part, len(part))
            return
        except Exception:  # noqa: BLE001 - e.g. every particle of every row died: the rows run alone
            results = [None] * len(chunk)
        for k, res in zip(chunk, results):
            out[k] = res

    for members in classes.values():
        per = _rows_that_fit(lm, [rows[k][1] for k in members], strategy, memory_limit,
                             min(len(members), max(1, int(max_batch_particles) // max(1, strategy.num_particles))))
        size = -(-len(members) // -(-len(members) // per))  # rows per call: as many calls as needed, all one size
        for c0 in range(0, len(members), size):
            call(members[c0:c0 + size], size)
    return out


def _rows_that_fit(lm, programs: Sequence[SegmentProgram], strategy, memory_limit, upto: int) -> int:
    """The most rows (``<= upto``) of ``programs`` (one structure) whose particles fit in one call, planned on
    the program a call of the first ones runs (rows' own texts make its caches longer than one row's); at
    least 1: a row alone gets the pre-flight's own answer, waves or a clear error. A later call whose rows need
    more is split in halves when it runs."""
    rows = upto
    while rows > 1:
        combined = combine(list(programs[:rows]), strategy.num_particles, [None] * rows)  # rows <= len(programs)
        try:
            memory.plan(lm, combined, strategy, rows, engine.layout(lm, combined, strategy), engine.FEED_CHUNK,
                        memory_limit)
            return rows
        except memory.MemoryPlanError:
            rows = (rows + 1) // 2 if rows > 2 else 1
        except Exception:  # noqa: BLE001 - the rows cannot run as one call (e.g. no shared text to start from
            return 1  # on a model without BOS): each runs alone, with its own answer
    return 1


def run_groups(lm, programs: Sequence[SegmentProgram], strategy, *, seed: int, progress=None,
               memory_limit=None) -> list:
    """Run ``programs`` (of one structure) as the groups of one engine call. Returns one one-group
    :class:`InferenceResult` per program, or ``None`` for a row whose particles all died or whose callables
    raised."""
    n = strategy.num_particles
    failed: list = [None] * len(programs)
    raw = engine.run(lm, combine(programs, n, failed), strategy, seed=seed, groups=len(programs), progress=progress,
                     memory_limit=memory_limit)
    out = []
    for g in range(len(programs)):
        part = raw.group(g)
        part.stats["batch_rows"] = len(programs)
        out.append(None if failed[g] is not None or not np.any(part.causes == 0) else part)
    return out


def combine(programs: Sequence[SegmentProgram], n: int, failed: list) -> SegmentProgram:
    """One segment program running ``programs[g]`` on particles ``g*n:(g+1)*n``. Errors of a row's callables
    are recorded in ``failed[g]`` (its particles die) instead of stopping the batch."""
    ranges = [(g * n, (g + 1) * n) for g in range(len(programs))]

    def per_row(fn, view, on_error):
        parts = []
        for g, (a, b) in enumerate(ranges):
            if failed[g] is None:
                try:
                    parts.append(fn(g, view.rows(a, b)))
                    continue
                except Exception as exc:  # noqa: BLE001 - the row's own error, reported in its place
                    failed[g] = exc
            parts.append(on_error(b - a))
        return parts

    segs = []
    for j, first in enumerate(programs[0].segments):
        col = [p.segments[j] for p in programs]
        segs += COMBINERS[type(first)](first, col, n, per_row)
    return SegmentProgram(segs, programs[0].table)


def _combine_forced(first, col, n, per_row) -> list:
    cls = type(first)
    if all(s.tokens is not None for s in col):
        toks = [list(s.tokens) for s in col]
        if all(t == toks[0] for t in toks):
            return [first]
        # the common token prefix stays static (a shared prompt prefix is prefilled once)
        common = 0
        while all(len(t) > common and t[common] == toks[0][common] for t in toks):
            common += 1
        out = [cls(tokens=tuple(toks[0][:common]), label=first.label)] if common else []
        rest = [t[common:] for t in toks]
        return out + [cls(render=lambda view, rest=rest: [rest[i // n] for i in range(len(view))],
                          max_tokens=max(len(t) for t in rest), label=first.label)]
    bound = max(len(s.tokens) if s.tokens is not None else int(s.max_tokens) for s in col)

    def render(view):
        def one(g, sub):
            s = col[g]
            return [list(s.tokens)] * len(sub) if s.tokens is not None else s.render(sub)
        return [r for part in per_row(one, view, lambda m: [[]] * m) for r in part]

    return [cls(render=render, max_tokens=bound, label=first.label)]


def _combine_hole(first, col, n, per_row) -> list:
    def start(view):
        parts = per_row(lambda g, sub: np.asarray(col[g].start(sub), np.int64).reshape(-1), view,
                        lambda m: np.full(m, -1, np.int64))
        return np.concatenate(parts)

    def prefix_check(view):  # a row's predicate may depend on its inputs: each row its own
        parts = per_row(lambda g, sub: np.asarray(col[g].prefix_check(sub), bool).reshape(-1), view,
                        lambda m: np.ones(m, bool))
        return np.concatenate(parts)

    reaches = [s.reach for s in col]  # sizing: enough room for every row's hole (equal under one structure key)
    return [replace(first, start=start if callable(first.start) else first.start,
                    prefix_check=None if first.prefix_check is None else prefix_check,
                    reach=None if None in reaches else max(reaches))]


def _combine_host(first, col, n, per_row) -> list:
    def host(view):
        def one(g, sub):
            inc = col[g].fn(sub)
            return np.zeros(len(sub)) if inc is None else np.asarray(inc, np.float64).reshape(-1)
        return np.concatenate(per_row(one, view, lambda m: np.full(m, -math.inf)))

    return [Host(host, first.label)]


COMBINERS = {Text: _combine_forced, Observe: _combine_forced, Hole: _combine_hole, Host: _combine_host}
