"""The contract between a hole's constraint and the inference kernels.

The kernels never look inside a constraint: they hold, per particle, a constraint *state* (``states [B]
int32``) and *counts* (``counts [B, 3] int32``, the raw ``tokens``/``len``/``words`` counters of
:mod:`lmprog.automata.counters`), and call the methods of :class:`HoleConstraints` on the whole batch of
particles at once. :class:`~lmprog.automata.table.TokenTable` (token automata with counters, stacked for every
hole of a run) is the implementation today.

The maths. Let ``L`` be the set of complete token sequences of a hole (the token sequences whose bytes are a
value satisfying the hole's constraints followed by its terminator, each ending at the first point the hole is
complete, with every counter bound met; docs/constraints.md), and ``t_1 .. t_n`` the tokens a particle has
generated in the hole so far, which ``(state, counts)`` summarise. Then, for a particle and a budget ``N``:

* ``mask[v]``  ⇔  some ``u ∈ L`` with at most ``N`` tokens extends ``t_1 .. t_n v`` (``v`` is *completable*);
  an empty mask means no completion exists (the particle is dead);
* ``done``  ⇔  ``t_1 .. t_n ∈ L`` (the hole ends after this token: the kernels stop generating for it);
* ``step`` gives the ``(state, counts)`` of ``t_1 .. t_n v``.

Sampling ``v`` from the LM restricted to ``mask`` and weighting by the mass of ``mask`` (``logsumexp`` of the
allowed logits) is then exactly sequential importance sampling of the LM conditioned on ``L``.

A host-side matcher (a CFG through llguidance, a later issue) implements the same protocol: its ``states`` are
indices into a host-side list of matcher objects, one per particle, and ``mask`` computes the masks of all
particles in one batched call per token (through ``jax.pure_callback``, or between device steps), ``step``
advances every matcher by its token, and resampling forks the state: a particle that copies ancestor ``a``
gets a clone of matcher ``a`` (the kernels reorder ``states`` and ``counts`` with the ancestors; a host matcher
must clone its objects the same way). ``counts`` may be unused by such a matcher (kept zero), and
``next_states`` may return any value ``>= 0`` for an allowed token (only its sign is read).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

__all__ = ["HoleConstraints"]


@runtime_checkable
class HoleConstraints(Protocol):
    """What the inference kernels need from a hole's constraint, batched over ``B`` particles and jittable
    (a pytree that can be a ``jit`` argument; every method traceable, every shape static). See the module
    docstring for the exact meaning."""

    @property
    def vocab_size(self) -> int:
        """``V``: the width of :meth:`mask` (the token ids the constraint covers; static)."""
        ...

    def init_counts(self, batch: int) -> jax.Array:
        """``[batch, 3] int32`` counts at the start of a hole (zeros)."""
        ...

    def next_states(self, states: jax.Array) -> jax.Array:
        """``[B] int32`` states -> ``[B, V] int32``: the successor of every token under the constraint alone
        (no counters, no budget); ``-1`` where the token is not allowed, and for a state ``-1``."""
        ...

    def mask(self, states: jax.Array, counts: jax.Array, max_tokens: jax.Array | int | None = None) -> jax.Array:
        """``[B, V] bool``: exactly the tokens after which the hole can still be completed — constraint,
        terminator, counter bounds, and at most ``max_tokens`` tokens in all when given (a scalar or ``[B]``)."""
        ...

    def step(self, states: jax.Array, counts: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(states, counts)`` after each row's token (``tokens [B] int32``, allowed by :meth:`mask`)."""
        ...

    def done(self, states: jax.Array, counts: jax.Array) -> jax.Array:
        """``[B] bool``: the tokens so far are a complete hole (it ends here)."""
        ...
