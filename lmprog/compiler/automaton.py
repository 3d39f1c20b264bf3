"""Token automata: constraints as arrays the jitted inference step gathers from.

A constraint on a hole is a deterministic automaton over *token ids*: from state ``s`` token ``v`` is
allowed iff ``next_state[s, v] >= 0``, and then the automaton moves to ``next_state[s, v]``. A state is
``final`` when the hole is complete there (its terminator has been produced). The whole constraint
state of a particle is one int32.

All automata of a program (or of a batch of programs) live in one :class:`TokenTable` with *global*
state ids (each automaton's states are offset into the shared table), so particles working on
different holes, or different programs, use the same compiled kernel: switching constraint is a
different integer, never a recompilation.

Storage is dense (``[S, V] int32``) here; the table's methods are the only way kernels read it, so a
sparse layout can replace the dense one without touching the kernels.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DISALLOWED = -1


class Automaton(NamedTuple):
    """One constraint, host side (numpy), with local state ids ``0 .. S-1``.

    Attributes:
        next_state: ``[S, V] int32``; ``-1`` where the token is not allowed.
        final: ``[S] bool``; the hole is complete in this state.
        start: the initial state.
    """

    next_state: np.ndarray
    final: np.ndarray
    start: int = 0

    @property
    def num_states(self) -> int:
        return int(self.next_state.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.next_state.nbytes + self.final.nbytes)


class TokenTable(NamedTuple):
    """Every automaton of a run, concatenated; a pytree of device arrays usable inside ``jit``.

    Attributes:
        next_state: ``[S_total, V] int32`` global transition table (``-1`` = not allowed).
        final: ``[S_total] bool``.
    """

    next_state: jax.Array
    final: jax.Array

    def allowed(self, states: jax.Array) -> jax.Array:
        """``[B] int32`` states -> ``[B, V] bool`` allowed-token mask."""
        return self.next_state[states] >= 0

    def advance(self, states: jax.Array, tokens: jax.Array) -> jax.Array:
        """The states after each row's token (``-1`` if the token was not allowed)."""
        return self.next_state[states, tokens]

    def is_final(self, states: jax.Array) -> jax.Array:
        return self.final[jnp.maximum(states, 0)] & (states >= 0)

    @property
    def nbytes(self) -> int:
        return int(self.next_state.size * 4 + self.final.size)


def stack_automata(automata: Sequence[Automaton]) -> tuple[TokenTable, list[int]]:
    """Concatenate automata into one :class:`TokenTable`.

    Returns the table and, for each automaton, the offset of its states, so that automaton ``i``'s local
    state ``s`` is global state ``offsets[i] + s`` (its start is ``offsets[i] + automata[i].start``).
    """
    if not automata:
        raise ValueError("stack_automata needs at least one automaton")
    vocab = {a.next_state.shape[1] for a in automata}
    if len(vocab) != 1:
        raise ValueError(f"automata disagree on the vocabulary size: {sorted(vocab)}")
    offsets, tables, finals, total = [], [], [], 0
    for a in automata:
        offsets.append(total)
        shifted = np.where(a.next_state >= 0, a.next_state + total, DISALLOWED).astype(np.int32)
        tables.append(shifted)
        finals.append(np.asarray(a.final, dtype=bool))
        total += a.num_states
    table = TokenTable(jnp.asarray(np.concatenate(tables)), jnp.asarray(np.concatenate(finals)))
    return table, offsets
