"""The segment program: what the inference engine executes.

A compiled ``.lmp`` program is lowered to a :class:`SegmentProgram`: a flat sequence of segments over one
token stream, plus the token automata of its holes (one :class:`~lmprog.automata.table.TokenTable`
with global state ids and the holes' ``tokens``/``len``/``words`` counters). The engine runs the segments in order for all
particles at once:

* :class:`Text`   forced tokens; the prompt: conditioned on, **not** scored.
* :class:`Observe` forced tokens, scored: ``log_weight += log p_LM(tokens | context)``.
* :class:`Hole`   generated tokens under an automaton (with its counters and a token budget);
  ``log_weight += log(allowed mass)`` per token for properly weighted strategies.
* :class:`Host`   host-side work at a segment boundary (``condition``/``factor``/Python predicates on
  complete values): one batched Python call for all particles, returning log-weight increments.

Leading ``Text``/``Observe`` segments with static tokens form the *shared prefix*: it is prefilled once
with batch 1 and its cache broadcast to every particle.

``Text``/``Observe`` tokens and a ``Hole``'s start state may also be computed per particle at run time
(``render``/``start`` callables receiving a :class:`HostView`), e.g. text that interpolates an earlier
hole's value or a branch that skips a hole (start ``-1``).

Every segment carries a ``label`` (source location and constraint text, e.g.
``"capital.lmp:7:9: answer matches r'[A-Z][a-z]+' and tokens(answer) <= 8"``); it names the culprit when
every particle dies there (:class:`InferenceError`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, Union

import numpy as np

from lmprog.automata.table import TokenTable
from lmprog.automata.values import ValueRule

__all__ = [
    "Cause",
    "Hole",
    "Host",
    "HostView",
    "InferenceError",
    "Observe",
    "Segment",
    "SegmentProgram",
    "Text",
    "hole_value",
]


class Cause(enum.IntEnum):
    """Why a particle died (``0``: alive). Recorded per particle; used in :class:`InferenceError`."""

    ALIVE = 0
    CONSTRAINT = 1  # the constraint admits no token (or only tokens the LM gives probability 0)
    COUNTER = 2  # the automaton allows tokens but a tokens/len/words bound excludes all of them
    BUDGET = 3  # the token budget (max_tokens) leaves no way to reach the terminator
    OBSERVE = 4  # observed text has probability 0
    HOST = 5  # a host condition/factor gave weight 0
    UNUSED = 6  # beam search: an initial duplicate beam, never a real candidate
    DEAD = 7  # (transient) died in the current hole; the engine refines it into one of the above


CAUSE_TEXT = {
    Cause.CONSTRAINT: "the constraint allowed no token",
    Cause.COUNTER: "a length/count bound excluded every allowed token",
    Cause.BUDGET: "the token budget (max_tokens) ran out before the hole's terminator",
    Cause.OBSERVE: "the observed text had probability 0",
    Cause.HOST: "a condition or factor gave weight 0",
}


class InferenceError(RuntimeError):
    """Every particle died. ``label`` names the segment (constraint and source location) responsible."""

    def __init__(self, message: str, *, label: str = "", segment: int = -1, causes: dict | None = None):
        super().__init__(message)
        self.label = label
        self.segment = segment
        self.causes = dict(causes or {})


# --------------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------------

Render = Callable[["HostView"], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class _Forced:
    """Forced tokens: either static ``tokens`` (the same for every particle) or ``render(view) -> one token list
    per particle`` (then ``max_tokens`` bounds their length, for buffer sizing)."""

    tokens: tuple[int, ...] | None = None
    render: Render | None = None
    max_tokens: int | None = None
    label: str = ""

    def __post_init__(self):
        if (self.tokens is None) == (self.render is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of tokens= and render=")
        if self.tokens is not None:
            object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        elif self.max_tokens is None or self.max_tokens < 0:
            raise ValueError(f"{type(self).__name__}(render=...) needs max_tokens (an upper bound on its length)")


@dataclass(frozen=True)
class Text(_Forced):
    """Forced tokens, conditioned on and not scored (prompt text)."""


@dataclass(frozen=True)
class Observe(_Forced):
    """Forced tokens whose LM log-probability is added to the log-weight (``observe "text"``)."""


@dataclass(frozen=True)
class Hole:
    """A generated span.

    The hole's constraint is an automaton in ``SegmentProgram.table`` (with its counters: ``tokens``/``len``/
    ``words`` bounds, fixed length). Each step allows exactly ``table.mask(state, counts, max_tokens)``; the
    hole ends on the first token after which ``table.done(state, counts)`` holds (its terminator — following
    text, ``stop_at`` string or EOS — is part of the automaton, so tokens may straddle the hole's end).

    Attributes:
        name: the hole's name (``answer``, ``item[2]``); its value is reported under this name.
        start: global start state in ``SegmentProgram.table`` (``offsets[i] + automaton.start``), or a
            callable ``view -> [P] int`` of per-particle start states (``-1``: the particle skips the hole).
        max_tokens: the token budget ``tokens(X) <= N`` passed to ``table.mask``; ``None``: the strategy's
            ``max_tokens``. A particle that cannot finish within it dies.
        value: which generated bytes are the value (:class:`~lmprog.automata.values.ValueRule`: a healed
            space before it, a terminator after it that is not kept: ``CompiledHole.value_rule``).
        label: source location and constraint text.
        prefix_check: optional ``view -> [P] bool`` for ``h.pred(X, prefix=true)``: called after every token
            of the hole (``view.spans[i][name]`` covers the tokens generated so far); ``False`` kills the
            particle (cause ``HOST``). It returns ``True`` for particles that are dead, not in this hole, or
            whose partial value cannot be judged yet. The lowering also checks the complete value (every
            prefix of it) in a ``Host`` segment after the hole, so this is an early kill, not the only check.
        reach: sizing only: an upper bound on the decode steps any particle can take in this hole under the
            mask, from any start state it uses (``CompiledHole.reach``: the longest path of a finite
            language, terminator included); buffers and the KV cache reserve ``min(budget + slack, reach)``
            slots for the hole instead of ``budget + slack``. It never changes the mask, the budget or the
            hard cap (same seed, same result). ``None``: unknown (size by the budget).
        path: where the hole's constraint runs: ``"device"`` (its token automaton in the table) or ``"host"``
            (the host matcher, :mod:`lmprog.automata.host`: ``start`` is a host state of the HostTable). Reported
            in ``stats["constraint_paths"]``.
    """

    name: str
    start: Union[int, Callable[["HostView"], Any]] = 0
    max_tokens: int | None = None
    value: ValueRule = ValueRule()
    label: str = ""
    prefix_check: Callable[["HostView"], np.ndarray] | None = None
    reach: int | None = None
    path: str = "device"

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"hole {self.name!r}: max_tokens must be >= 1")
        if self.reach is not None and self.reach < 1:
            raise ValueError(f"hole {self.name!r}: reach must be >= 1")


@dataclass(frozen=True)
class Host:
    """Host-side work at a segment boundary: ``fn(view) -> [P] log-weight increments`` (or ``None``).

    ``-inf`` kills a particle (``condition`` false); finite values are ``factor``s. ``fn`` may also write
    per-particle data into ``view.data[i]`` (a dict per particle that follows the particle through
    resampling), e.g. ``let`` values.
    """

    fn: Callable[["HostView"], Any]
    label: str = ""


Segment = Union[Text, Observe, Hole, Host]


@dataclass(frozen=True)
class SegmentProgram:
    """A program for the engine.

    Attributes:
        segments: run in order.
        table: every hole's automaton with its counters, stacked (``stack_holes``/``stack_automata``);
            ``Hole.start`` values are global state ids in it.
    """

    segments: tuple
    table: TokenTable

    def __post_init__(self):
        object.__setattr__(self, "segments", tuple(self.segments))
        for seg in self.segments:
            if not isinstance(seg, (Text, Observe, Hole, Host)):
                raise TypeError(f"not a segment: {seg!r}")
        names = [s.name for s in self.segments if isinstance(s, Hole)]
        if len(set(names)) != len(names):
            raise ValueError(f"hole names must be unique, got {names}")

    @property
    def holes(self) -> list[Hole]:
        return [s for s in self.segments if isinstance(s, Hole)]

    def hole_index(self, name: str) -> int:
        """The index of hole ``name`` among :attr:`holes` (its column in spans and per-hole arrays)."""
        for h, hole in enumerate(self.holes):
            if hole.name == name:
                return h
        raise KeyError(f"no hole named {name!r}")

    @property
    def vocab(self) -> int:
        return self.table.vocab_size

    @property
    def num_states(self) -> int:
        return self.table.num_states


# --------------------------------------------------------------------------------------------------
# Host-side view of the particles
# --------------------------------------------------------------------------------------------------


def hole_value(tokenizer, hole: Hole, token_ids: Sequence[int]) -> str:
    """The value of the complete ``hole`` from its generated token ids (``hole.value``'s rule)."""
    return hole.value.of_tokens(tokenizer, token_ids)


@dataclass
class HostView:
    """What host callables (``Host.fn``, ``Text.render``, ``Hole.start``) see: every particle's tokens so far
    (after the shared prefix), hole spans, liveness and host data. Index ``i`` is particle ``i``.

    Attributes:
        tokens: per particle, the token ids after the shared prefix.
        spans: per particle, ``{hole name: (start, end)}`` into ``tokens`` for the holes completed so far.
        alive: ``[P] bool``.
        data: per particle, a dict the program may use (follows the particle through resampling).
        tokenizer, holes: to decode values.
        prefix_text: the shared prompt text.
        hole_logprobs: ``[P, H]`` LM log-probability (tempered) of each hole's tokens so far, columns in the
            order of ``holes``; follows resampling like the rest (None: not provided).
        key: for ``Host`` steps, a fresh JAX PRNG key split from the run's key (random choices such as
            ``sample`` draw from it, so every execution of the step, e.g. an MCMC move, draws anew).
    """

    tokens: list[list[int]]
    spans: list[dict[str, tuple[int, int]]]
    alive: np.ndarray
    data: list[dict]
    tokenizer: Any
    holes: dict[str, Hole]
    prefix_text: str = ""
    hole_logprobs: Any = None
    key: Any = None
    _values: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, a: int, b: int) -> "HostView":
        """The view of particles ``a:b`` (one group of a batch); the ``data`` dicts are shared, so writes go
        through to this view's particles."""
        return replace(self, tokens=self.tokens[a:b], spans=self.spans[a:b], alive=self.alive[a:b],
                       data=self.data[a:b], _values=None,
                       hole_logprobs=None if self.hole_logprobs is None else self.hole_logprobs[a:b])

    @property
    def values(self) -> list[dict[str, str]]:
        """Per particle, ``{hole name: value}`` for the holes completed so far."""
        if self._values is None:
            self._values = [
                {
                    name: hole_value(self.tokenizer, self.holes[name], toks[a:b])
                    for name, (a, b) in spans.items()
                }
                for toks, spans in zip(self.tokens, self.spans)
            ]
        return self._values

    @property
    def logprobs(self) -> dict[str, np.ndarray]:
        """``{hole name: [P] float64}``: the LM log-probability of each hole completed by some particle
        (NaN for the particles that have not completed it)."""
        if self.hole_logprobs is None:
            return {}
        lp = np.asarray(self.hole_logprobs, np.float64)
        out = {}
        for h, name in enumerate(self.holes):
            done = np.array([name in s for s in self.spans], bool)
            if done.any():
                out[name] = np.where(done, lp[:, h], np.nan)
        return out

    def text(self, i: int) -> str:
        return self.prefix_text + self.tokenizer.decode(self.tokens[i], skip_special=True)
