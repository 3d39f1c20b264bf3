"""Holes compiled for the host matcher (context-free ``json()`` / ``grammar()`` languages), and the stacking of a
run's holes into one constraint runtime.

:func:`lmprog.compiler.constraints.compile_hole` takes this path when the hole's language is context-free (a
recursive ``$ref`` or rule: :func:`lmprog.compiler.structured.is_context_free`), or when asked to
(``path="host"``, tests and benchmarks). The hole becomes a :class:`HostHole`: an llguidance grammar and its
terminator (:class:`~lmprog.automata.host.HostSpec`) instead of a token automaton. :func:`stack_compiled` stacks
the regular holes into the :class:`~lmprog.automata.table.TokenTable` as before and, when there are host holes,
wraps it in a :class:`~lmprog.automata.host.HostTable` (docs/constraints.md, "The host path").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from lmprog.automata.counters import CHARS, INF, TOKENS, WORDS
from lmprog.automata.host import HostSpec, HostTable, lark_grammar, ll_tokenizer, schema_grammar
from lmprog.automata.values import ValueRule
from lmprog.compiler.constraint_ir import ConstraintError, Grammar, JsonSchema

__all__ = ["HostHole", "compile_host_hole", "stack_compiled"]


@dataclass(frozen=True, eq=False)
class HostHole:
    """One hole compiled for the host matcher (what :class:`~lmprog.compiler.constraints.CompiledHole` is for the
    device). ``path`` is ``"host"``; ``reach`` is None (a context-free language has no longest path)."""

    spec: HostSpec
    terminator: object
    plan: object
    tokenizer_fingerprint: str
    compile_s: float = 0.0
    from_cache: bool = False
    reach: int | None = None
    path: str = "host"

    @property
    def value_rule(self) -> ValueRule:
        t = self.terminator
        return ValueRule(stop=t.text.encode("utf-8") if t.kind == "text" and not t.keep else b"")

    def value(self, token_ids: Iterable[int], tokenizer) -> str:
        return self.value_rule.of_tokens(tokenizer, token_ids)


def compile_host_hole(plan, tokenizer, *, name: str = "X", loc=None) -> HostHole:
    """A hole for the host matcher from its normalised constraints (:class:`~lmprog.compiler.constraints.HolePlan`).

    Supported: one ``json()`` or ``grammar()`` constraint on the text, any terminator (following text, ``stop_at``
    / ``stop_before``, EOS or an end-of-turn token) and ``tokens(X) <= N`` (the hole's budget). Other constraints
    on the text, ``len``/``words`` bounds, lower bounds on ``tokens`` and fixed lengths are a ConstraintError."""
    from lmprog.compiler.structured import load_schema

    t0 = time.perf_counter()
    language = list(plan.language)
    if len(language) != 1 or not isinstance(language[0], (JsonSchema, Grammar)):
        raise ConstraintError(
            f"the constraints on {name}: a context-free json()/grammar() language cannot be combined with other "
            "constraints on the text (matches, in, contains, ...): it runs on the host matcher", loc)
    b = plan.bounds
    lo, _hi = b.sets[TOKENS][0] if b.sets[TOKENS] else (0, INF)
    if b.active(CHARS) or b.active(WORDS) or len(b.sets[TOKENS]) != 1 or lo > 0 or plan.terminator.kind == "fixed":
        raise ConstraintError(
            f"the constraints on {name}: a context-free json()/grammar() hole takes only a token budget "
            "tokens(X) <= N (no len/words bounds, lower bounds or fixed length)", loc)
    c = language[0]
    term = plan.terminator
    text = term.text.encode("utf-8") if term.kind == "text" else b""
    tail = text if term.kind == "text" and not term.keep else None
    if isinstance(c, JsonSchema):
        try:
            doc = load_schema(c.text) if c.schema else True
        except ValueError as e:
            raise ConstraintError(f"JSON schema file '{c.schema}' is not valid JSON: {e}", c.loc) from None
        grammar = schema_grammar(doc, tail)
        what = f"JSON schema '{c.schema}'" if c.schema else "json()"
    else:
        grammar = lark_grammar(c.text, tail)
        what = f"grammar '{c.path}'"
    import llguidance as llg

    msg = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))
    if msg and not msg.startswith("WARNING"):
        raise ConstraintError(f"{what}: the host matcher (llguidance) rejects it: {msg.strip().splitlines()[0]}",
                              c.loc or loc)
    end_ids = tuple(int(i) for i in (term.ids or tokenizer.eos_ids)) if term.kind == "eos" else ()
    spec = HostSpec(grammar, "eos" if term.kind == "eos" else "text", text, bool(term.keep), end_ids,
                    label=f"{what} on {name}")
    return HostHole(spec, term, plan, tokenizer.fingerprint, compile_s=time.perf_counter() - t0)


def stack_compiled(compiled: Sequence, tokenizer=None, *, share: bool = True):
    """Every compiled hole of a run in one constraint runtime: ``(table, starts)`` with each hole's global start
    state. Without host holes: :func:`~lmprog.compiler.automaton.stack_holes` (the device table, unchanged). With
    them: a :class:`~lmprog.automata.host.HostTable` around the device holes' table (or a one-state table when all
    holes are host holes); host hole ``i`` starts at ``base + 2 i``."""
    from lmprog.compiler.automaton import Automaton, stack_automata, stack_holes

    device = [c for c in compiled if getattr(c, "path", "device") != "host"]
    host = [c for c in compiled if getattr(c, "path", "device") == "host"]
    if device:
        table, offsets = stack_holes(device, share=share)
        dev_starts = [o + int(c.automaton.start) for o, c in zip(offsets, device)]
    else:
        if tokenizer is None:
            raise ValueError("stack_compiled needs the tokenizer when every hole is a host hole")
        v = len(tokenizer.token_bytes)
        table, _ = stack_automata([Automaton(np.full((1, v), -1, np.int32), np.zeros(1, bool), 0)])
        dev_starts = []
    if not host:
        return table, dev_starts
    tok = tokenizer
    if tok is None:
        raise ValueError("stack_compiled needs the tokenizer for host holes")
    specs = []
    index: dict = {}
    for c in host:
        index.setdefault(c.spec, len(specs))
        if index[c.spec] == len(specs):
            specs.append(c.spec)
    slack = max((len(s.text) for s in specs), default=0)
    ht = HostTable(table, np.int32(-1), tuple(specs), tok, slack)
    starts, d, h = [], iter(dev_starts), 0
    for c in compiled:
        starts.append(ht.start(index[c.spec]) if getattr(c, "path", "device") == "host" else next(d))
        h += 1
    return ht, starts
