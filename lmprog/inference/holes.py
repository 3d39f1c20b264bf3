"""What a hole costs and how it starts: its token budget, its slots in a particle's buffer and cache, the traced
parameters its kernels take, and the progress report of its token loop.

A leaf of the inference package (the engine, exact enumeration and the memory pre-flight all size holes the same
way, and none of them may import another for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmprog.backends.jax_setup import to_device
from lmprog.inference.segments import Hole, Observe, Text
from lmprog.inference.state import HoleParams

__all__ = ["BIG", "Progress", "budget", "hole_params", "room", "slack"]

#: "No limit" for traced step counts (a hole's pause step when it is not paused).
BIG = 1 << 30


@dataclass
class Progress:
    """Passed to the ``progress`` callback after every device chunk of a hole."""

    hole: str
    steps: int  # decode steps so far in this hole
    budget: int
    active: int  # particles still generating


def budget(hole: Hole, strategy) -> int:
    """A hole's token budget: its own ``tokens(X) <= N``, else the strategy's ``max_tokens``."""
    return int(hole.max_tokens if hole.max_tokens is not None else strategy.max_tokens)


def slack(table) -> int:
    """Tokens a hole may take beyond its ``tokens(X) <= N`` budget (``table``: the program's token table): its
    terminator's pending bytes (>= 1 byte per token) or an EOS. A hole's hard cap is ``budget + slack``."""
    return table.max_pending() + 1


def room(seg, strategy, slack: int) -> int:
    """Token slots a segment may take in a particle's buffer and cache. A hole: its hard cap ``budget + slack``
    (:func:`hole_params`), or fewer when its ``reach`` (the most steps its automaton allows) is known; the cap
    is never below any path the mask allows, so sizing by reach never truncates a hole."""
    if type(seg) in (Text, Observe):
        return len(seg.tokens) if seg.tokens is not None else int(seg.max_tokens)
    if type(seg) is Hole:
        cap = budget(seg, strategy) + slack
        return cap if seg.reach is None else min(cap, int(seg.reach))
    return 0


def hole_params(run, state, h: int, hole: Hole, budget_: int, slack: int):
    """The traced parameters of hole ``hole`` (index ``h``) for ``run`` (an engine ``Run``): per-particle start
    states, budget, hard cap. Returns ``(state, HoleParams)`` (a callable start reads the particles' view)."""
    num = run.num
    s_total = run.program.num_states
    if callable(hole.start):
        state, view = run.view(state)
        start = np.asarray(hole.start(view), np.int64).reshape(-1)
        if start.shape != (num,):
            raise ValueError(f"hole {hole.name!r}: start callable returned shape {start.shape}, expected ({num},)")
    else:
        start = np.full((num,), int(hole.start))
    if np.any(start >= s_total) or np.any(start < -1):
        raise ValueError(f"hole {hole.name!r}: start state out of range [0, {s_total})")
    hp = HoleParams(
        start=to_device(start, np.int32),
        hole=to_device(np.full((num,), h, np.int32)),
        max_tokens=to_device(budget_, np.int32),
        max_steps=to_device(budget_ + slack, np.int32),  # not Hole.reach: sizing only (room), the mask never sees it
        pause=to_device(BIG, np.int32),
    )
    return state, hp
