"""The value of a ``json()`` hole as the program sees it: the parsed JSON value, whose objects and arrays become
*JSON text* wherever the program turns them into text (docs/constraints.md, "Values").

A json hole's value is parsed (``rec["name"]`` indexes it, ``rec == {...}`` compares it), but when a program
writes ``{rec}`` in a later template, ``f"{rec}"`` or ``str(rec)``, the user means the JSON it stands for, not
Python's ``{'name': 'x'}``. So objects and arrays of a json hole are :class:`JsonObject` / :class:`JsonArray`
(``dict`` / ``list`` subclasses: equal to, and usable as, plain dicts and lists) whose ``str`` is JSON text:

* the whole value of the hole: exactly the text the hole generated (``{"a": 1}`` stays ``{"a": 1}``; spacing as
  the model wrote it);
* a part of it (``rec["items"]``): canonical JSON, ``json.dumps(v, ensure_ascii=False)`` (separators ``", "`` and
  ``": "``, keys in their order, non-ASCII characters as they are).

Scalars stay plain Python values: a string is its characters (``{rec["name"]}`` gives ``x``, not ``"x"``), numbers
print as ``str`` does, booleans as ``true`` / ``false`` (:func:`lmprog.compiler.runtime_eval.to_text`); ``null``
interpolates as nothing, as ``None`` does everywhere (inside an object or array it is ``null``).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JsonArray", "JsonObject", "json_hole_value"]


def _dumps(v) -> str:
    return json.dumps(v, ensure_ascii=False)


class JsonObject(dict):
    """A JSON object of a json hole: a ``dict`` whose ``str``/``repr`` is JSON text (the hole's own text when it
    is the hole's whole value)."""

    __slots__ = ("text",)

    def __init__(self, *args, text: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.text = text

    def __str__(self) -> str:
        return self.text if self.text is not None else _dumps(self)

    __repr__ = __str__

    def __reduce__(self):  # pickles (multiprocess batch runs) keep the class and the text
        return (_rebuild, (JsonObject, dict(self), self.text))


class JsonArray(list):
    """A JSON array of a json hole: a ``list`` whose ``str``/``repr`` is JSON text (see :class:`JsonObject`)."""

    __slots__ = ("text",)

    def __init__(self, items=(), text: str | None = None):
        super().__init__(items)
        self.text = text

    def __str__(self) -> str:
        return self.text if self.text is not None else _dumps(self)

    __repr__ = __str__

    def __reduce__(self):
        return (_rebuild, (JsonArray, list(self), self.text))


def _rebuild(cls, items, text):
    return cls(items, text=text)


def _wrap(v: Any) -> Any:
    if isinstance(v, dict):
        return JsonObject({k: _wrap(x) for k, x in v.items()})
    if isinstance(v, list):
        return JsonArray(_wrap(x) for x in v)
    return v


def json_hole_value(text: str) -> Any:
    """The value of a json hole that generated ``text``: ``json.loads(text)`` with objects and arrays as
    :class:`JsonObject` / :class:`JsonArray`; the outermost one keeps ``text`` (its ``str`` is exactly what was
    generated)."""
    v = _wrap(json.loads(text))
    if isinstance(v, (JsonObject, JsonArray)):
        v.text = text
    return v
