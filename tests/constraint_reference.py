"""Reference semantics of hole constraints, written directly with Python's ``re``, ``in`` and ``str`` methods.

Used by the constraint tests to check the compiled automata: a token sequence is a *complete* hole iff its
bytes are ``value + terminator`` with the terminator's first occurrence at the end (text terminators), the
value + EOS (EOS), or exactly N tokens (fixed length), the value is valid UTF-8, and every constraint holds.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import product as iproduct

from lmprog.compiler import constraints as K


def holds(c: K.Constraint, value: str, tokens: int) -> bool:
    """Whether ``value`` (generated in ``tokens`` tokens, terminator included) satisfies ``c``."""
    if isinstance(c, K.Regex):
        return re.fullmatch(c.pattern, value) is not None
    if isinstance(c, K.Choices):
        return value in c.items
    if isinstance(c, K.Contains):
        return c.s in value
    if isinstance(c, K.StartsWith):
        return value.startswith(c.s)
    if isinstance(c, K.EndsWith):
        return value.endswith(c.s)
    if isinstance(c, K.IsInt):
        return re.fullmatch(K.INT_PATTERN, value) is not None
    if isinstance(c, K.IsFloat):
        return re.fullmatch(K.FLOAT_PATTERN, value) is not None
    if isinstance(c, K.Not):
        return not holds(c.c, value, tokens)
    if isinstance(c, K.And):
        return all(holds(x, value, tokens) for x in c.items)
    if isinstance(c, K.Or):
        return any(holds(x, value, tokens) for x in c.items)
    if isinstance(c, K.StopAt):
        return True  # the terminator is checked by `complete`
    if isinstance(c, K.Count):
        n = {"tokens": tokens, "len": len(value), "words": len(value.split())}[c.kind]
        return {"<=": n <= c.n, "<": n < c.n, "==": n == c.n, ">=": n >= c.n, ">": n > c.n}[c.op]
    raise TypeError(c)


@lru_cache(maxsize=256)
def _plan(constraints: tuple, following_text):
    return K.plan_hole(list(constraints), following_text), K._conjuncts(list(constraints))


def value_of(constraints, following_text, token_ids, tokenizer) -> str | None:
    """The hole's value if ``token_ids`` is a complete generation of it (ignoring constraints), else None."""
    plan = _plan(tuple(constraints), following_text)[0]
    term = plan.terminator
    specials = tokenizer.special_ids
    ids = list(token_ids)
    if term.kind == "eos":
        if not ids or ids[-1] not in tokenizer.eos_ids:
            return None
        ids = ids[:-1]
    if any(i in specials for i in ids):
        return None
    data = b"".join(tokenizer.token_bytes[i] for i in ids)
    if term.kind == "text":
        t = term.text.encode()
        if data.find(t) != len(data) - len(t) or len(data) < len(t):
            return None
        if not term.keep:
            data = data[: len(data) - len(t)]
    elif term.kind == "fixed":
        if len(ids) != plan.bounds.lo[0]:
            return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def complete(constraints, following_text, token_ids, tokenizer) -> bool:
    value = value_of(constraints, following_text, token_ids, tokenizer)
    if value is None:
        return False
    cs = _plan(tuple(constraints), following_text)[1]
    return all(holds(c, value, len(token_ids)) for c in cs)


def brute_force_completion(constraints, following_text, prefix, tokenizer, alphabet, depth):
    """A continuation (over ``alphabet`` token ids, up to ``depth`` tokens, then the terminator spelt with
    single-byte tokens or EOS) that completes the hole, or None."""
    plan = _plan(tuple(constraints), following_text)[0]
    term = plan.terminator
    if term.kind == "text":
        tail = [tokenizer.encode(chr(b))[0] if b < 128 else None for b in term.text.encode()]
        tails = [[]] + ([tail] if None not in tail else [])
        # the terminator may already be partly generated: also try its suffixes
        tails += [tail[k:] for k in range(1, len(tail))] if None not in tail else []
    elif term.kind == "eos":
        tails = [[tokenizer.eos_ids[0]]]
    else:
        tails = [[]]
    for n in range(depth + 1):
        for middle in iproduct(alphabet, repeat=n):
            for tail in tails:
                seq = list(prefix) + list(middle) + tail
                if complete(constraints, following_text, seq, tokenizer):
                    return seq
    return None
