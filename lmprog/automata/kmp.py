"""The Knuth-Morris-Pratt automaton of a byte string (terminator matching, on the device and on the host)."""

from __future__ import annotations

import numpy as np

__all__ = ["kmp_table"]


def kmp_table(t: bytes) -> np.ndarray:
    """``[len(t), 256] int32``: ``table[k, b]`` is how many bytes of ``t`` are matched after byte ``b`` when
    ``k`` were matched (``len(t)``: all of it)."""
    m = len(t)
    table = np.zeros((m, 256), np.int32)
    table[0, t[0]] = 1
    x = 0
    for k in range(1, m):
        table[k] = table[x]
        table[k, t[k]] = k + 1
        x = int(table[x, t[k]])
    return table
