"""Values as JSON holds them: the one strict JSON writer of results, batch records and reports."""

from __future__ import annotations

import json
import math
from typing import Optional

__all__ = ["dumps", "from_numpy", "json_value"]


def dumps(obj, indent: Optional[int] = None) -> str:
    """Strict JSON of ``obj`` (``allow_nan=False``; the one JSON writer of results and batch records): a
    non-finite number that got this far is a bug to report, never ``NaN`` in the output."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def from_numpy(v):
    """NumPy scalars and arrays as plain Python numbers and lists; anything else as it is."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def json_value(v):
    """A returned value as JSON can hold it: non-finite floats as the strings ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``; NumPy scalars and arrays as plain numbers and lists; tuples as lists; dict keys as
    strings; anything else JSON has no type for as its ``str()``."""
    v = from_numpy(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else _NON_FINITE.get(v, "NaN")
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    return str(v)
