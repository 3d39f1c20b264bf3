"""The host matcher: context-free holes (a recursive ``$ref``, a recursive grammar) behind the constraint protocol.

A hole whose language is context-free but not regular cannot be a token automaton. Its constraint runs on the
host, in llguidance (an Earley parser with a lexer, over the tokenizer's token trie), behind the same protocol as
the device table (:class:`~lmprog.automata.protocol.HoleConstraints`): :class:`HostTable` wraps the run's
:class:`~lmprog.automata.table.TokenTable` (every regular hole, untouched) and answers for the host holes'
particles through ``jax.pure_callback`` inside the jitted hole loop.

Host states. A host particle's constraint state (``Particles.auto``) is ``base + 2 i + done``: ``i`` indexes an
entry of the run's :class:`HostPool`, a list of *immutable* matcher snapshots (an entry is never changed after it
is made; stepping entry ``i`` by token ``t`` makes a new entry from a copy of it, memoised on ``(i, t)``), and
``done`` says the hole has ended there. So the kernels' resampling (which copies states with the particles) forks
matchers for free, MCMC moves restore a recorded state from the trace as they do for automata, and particles with
equal states share one mask (computed once per entry, for all particles of a step in one batched call, on
llguidance's thread pool). The matchers and masks of states no particle uses any more are freed as the run goes and
rebuilt from the state's lineage if it comes back (:class:`HostPool`, "Memory"), so a long run's pool stays the
size of what its particles use. ``base`` is the device table's state count: states below it are automaton states.
``counts[:, TOKENS]`` counts a host hole's tokens (the other counters stay zero).

What the mask is (docs/constraints.md, "The host path"): a token is allowed iff the hole's bytes after it are a
prefix of some complete hole — a sentence of the grammar followed by the terminator, the hole ending at the
terminator's first occurrence — which llguidance decides exactly for its reading of the grammar (forced-token
shortcuts are switched off: every tokenization is allowed, as on the device). The token budget ``max_tokens`` is
applied as "at most N tokens, and the N-th token must end the hole"; llguidance cannot know whether a completion
exists *within* the remaining budget, so earlier tokens may lead into prefixes that cannot finish in time. Such
particles die (weight 0): importance sampling and SMC stay properly weighted for the budgeted target (every
sequence of the target has all its tokens allowed), with more variance than an exact mask would give.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.automata.kmp import kmp_table

from lmprog.automata.counters import TOKENS
from lmprog.automata.table import DISALLOWED, TokenTable

__all__ = ["HostPool", "HostSpec", "HostTable", "ll_tokenizer"]

#: Bit ``j`` of word ``w`` of a packed mask row is token ``32 w + j``.
WORD = 32


@dataclass(frozen=True)
class HostSpec:
    """One host hole's constraint: an llguidance grammar (the value, and a text terminator when it is not kept)
    and how the hole ends.

    Attributes:
        grammar: llguidance grammar text (Lark syntax with llguidance's extensions).
        kind: ``"eos"`` (the hole ends at one of ``end_ids``, allowed where the grammar accepts) or ``"text"``
            (it ends at the first occurrence of ``text`` in the hole's bytes; ``keep``: ``text`` is part of the
            value, which the grammar covers; else the grammar is the value followed by ``text``).
        text, keep, end_ids: see ``kind``.
        label: what the hole is (messages).
    """

    grammar: str
    kind: str
    text: bytes = b""
    keep: bool = False
    end_ids: tuple = ()
    label: str = ""


# ------------------------------------------------------------------------------------------------ tokenizer


_LL_TOKENIZERS: dict = {}
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer):
    """The ``llguidance.LLTokenizer`` of a :class:`~lmprog.backends.tokenizer.Tokenizer` (cached per fingerprint):
    its token bytes as they are, special tokens written ``\\xff[name]`` (llguidance's convention: they never match
    grammar text), its EOS tokens. Built through ``llguidance.TokenizerWrapper`` (no ``transformers``)."""
    import llguidance as llg

    fp = tokenizer.fingerprint
    with _LOCK:
        hit = _LL_TOKENIZERS.get(fp)
        if hit is not None:
            return hit

        class _Wrapped:
            def __init__(self):
                self.eos_token_id = int(tokenizer.eos_ids[0]) if tokenizer.eos_ids else None
                self.bos_token_id = tokenizer.bos_id
                toks = []
                for i, b in enumerate(tokenizer.token_bytes):
                    if i in tokenizer.special_ids:
                        name = tokenizer.hf.id_to_token(i) if tokenizer.hf is not None else None
                        b = b"\xff[" + (name or f"special_{i}").encode("utf-8") + b"]"
                    toks.append(bytes(b))
                self.tokens = toks
                self.special_token_ids = sorted(int(i) for i in tokenizer.special_ids)

            def __call__(self, s):
                if isinstance(s, bytes):
                    s = s.decode("utf-8", errors="replace")
                return tokenizer.encode(s, add_bos=False)

        eos = [int(e) for e in tokenizer.eos_ids] or None
        lt = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped()), n_vocab=len(tokenizer.token_bytes), eos_token=eos)
        _LL_TOKENIZERS[fp] = lt
        return lt


def _terminator_tables(token_bytes: Sequence[bytes], special: frozenset, t: bytes):
    """Per KMP state ``k`` (``k`` bytes of ``t`` pending at the end of the hole's bytes) and token: ``past [m, V]``
    (the token's bytes complete ``t`` before their last byte: the hole would end inside the token), ``ends [m, V]``
    (they complete ``t`` exactly at their last byte: the hole ends with this token) and ``after [m, V]`` (the
    pending bytes after the token otherwise). Vectorised over tokens, byte position by byte position."""
    m, v = len(t), len(token_bytes)
    kmp = kmp_table(t).astype(np.int64)
    lens = np.array([0 if i in special else len(b) for i, b in enumerate(token_bytes)], np.int64)
    width = int(lens.max(initial=1))
    arr = np.zeros((v, width), np.int64)
    for i, b in enumerate(token_bytes):
        if i not in special and b:
            arr[i, : len(b)] = np.frombuffer(b, np.uint8)
    past = np.zeros((m, v), bool)
    ends = np.zeros((m, v), bool)
    after = np.zeros((m, v), np.int64)
    for k0 in range(m):
        k = np.full(v, k0, np.int64)
        hit_at = np.full(v, -1, np.int64)  # byte index where t first completes
        for j in range(width):
            live = (j < lens) & (hit_at < 0)
            nk = kmp[np.minimum(k, m - 1), arr[:, j]]
            k = np.where(live, nk, k)
            hit_at = np.where(live & (k == m), j, hit_at)
        past[k0] = (hit_at >= 0) & (hit_at < lens - 1)
        ends[k0] = (hit_at >= 0) & (hit_at == lens - 1)
        after[k0] = np.where(hit_at >= 0, m, k)
    return past, ends, after


# ------------------------------------------------------------------------------------------------ the pool


#: Light per-state record of the pool (kept for every state ever made, 13 bytes): the state it was stepped from
#: and the token (``parent`` -1: a hole's start), its hole spec, pending terminator bytes, and whether it is done.
_LINEAGE = np.dtype([("parent", np.int32), ("token", np.int32), ("spec", np.int16), ("k", np.int16),
                     ("done", np.bool_)])

_POOLS: "weakref.WeakValueDictionary[int, HostPool]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _bit(row: np.ndarray, t: int) -> bool:
    return bool((row[t >> 3] >> (t & 7)) & 1)


class HostPool:
    """The host states of one run: immutable matcher snapshots (see the module docstring). Entry ``i`` is the
    start of host hole ``i`` for ``i < len(specs)``. Masks are computed once per entry; children once per
    ``(entry, token)``. Registered under :attr:`handle` (weakly: the pool lives while its run holds it).

    Memory. A state's index is never reused or renumbered (MCMC traces and particles hold indices), but only the
    states some particle may still use keep their heavy parts: the llguidance matcher, the packed masks and the
    children memo. Whenever more than ``max(HOLD_MIN, 2 x live)`` states hold them, a mask call (the states it is
    given are every particle's current state; with those of the few calls before it, ``live``) frees the others'
    (:meth:`_collect`). Every state keeps its lineage (:data:`_LINEAGE`: parent and token), so a freed state that is used again — a trace restored by an MCMC move,
    an enumeration revisiting a prefix — is rebuilt exactly by replaying its tokens from its nearest ancestor that
    still has a matcher (a hole's start at worst: starts are never freed). Results do not depend on when states
    are freed."""

    #: Fewest states that keep their matchers and masks before the pool frees any (``2 x`` the live ones beyond).
    HOLD_MIN = 256
    #: The states of this many of the latest mask calls are kept when the pool frees the others.
    RECENT = 4

    def __init__(self, specs: Sequence[HostSpec], tokenizer, vocab: int, base: int, threads: int | None = None):
        import llguidance as llg

        self.specs = tuple(specs)
        self.tokenizer = tokenizer
        self.vocab = int(vocab)
        self.words = -(-self.vocab // WORD)
        self.base = int(base)
        self.lt = ll_tokenizer(tokenizer)
        self.executor = llg.LLExecutor(threads)
        self.lineage = np.zeros(max(64, 2 * len(self.specs)), _LINEAGE)
        self.recent: collections.deque = collections.deque(maxlen=self.RECENT)
        self.size = 0
        self.matchers: dict[int, object] = {}  # entry -> llguidance.LLMatcher (not done, held)
        self.children: dict[int, dict[int, int]] = {}  # entry -> {token: child entry or -1}
        self.allowed: dict[int, np.ndarray] = {}  # entry -> packed [V] bits (no budget)
        self.ending: dict[int, np.ndarray] = {}  # entry -> packed [V] bits: allowed tokens that end the hole
        self.ll_eos = np.array(sorted(set(int(e) for e in self.lt.eos_tokens) | set(int(e) for e in tokenizer.eos_ids)),
                               np.int64)
        self.term = {}
        self.stats = {"mask_calls": 0, "masks": 0, "mask_s": 0.0, "step_calls": 0, "steps": 0, "step_s": 0.0,
                      "held": 0, "held_max": 0, "freed": 0, "rebuilt": 0}
        self.lock = threading.Lock()
        for i, spec in enumerate(self.specs):
            matcher = llg.LLMatcher(self.lt, spec.grammar, log_level=0)
            if matcher.is_error():
                raise ValueError(f"{spec.label or 'host hole'}: {matcher.get_error()}")
            self.matchers[self._new(-1, -1, i, 0, False)] = matcher
            if spec.kind == "text" and spec.text not in self.term:
                key = (tokenizer.fingerprint, spec.text)
                tab = _TERM_CACHE.get(key)
                if tab is None:
                    tab = _TERM_CACHE[key] = _terminator_tables(tokenizer.token_bytes, tokenizer.special_ids, spec.text)
                self.term[spec.text] = tab
        self.handle = next(_HANDLES)
        _POOLS[self.handle] = self

    def __len__(self) -> int:
        """The number of states made so far (their lineage is kept; :attr:`held` of them have matchers)."""
        return self.size

    @property
    def held(self) -> int:
        """States that hold a matcher or masks now."""
        return len(set(self.matchers) | set(self.allowed))

    def start(self, hole: int) -> int:
        """The global start state of host hole ``hole``."""
        return self.base + 2 * hole

    def _new(self, parent: int, token: int, spec: int, k: int, done: bool) -> int:
        if self.size == self.lineage.shape[0]:
            self.lineage = np.concatenate([self.lineage, np.zeros_like(self.lineage)])
        self.lineage[self.size] = (parent, token, spec, k, done)
        self.size += 1
        return self.size - 1

    def _matcher(self, i: int):
        """Entry ``i``'s matcher (not done): held, or rebuilt from the nearest ancestor that holds one."""
        m = self.matchers.get(i)
        if m is not None:
            return m
        path, j = [], i
        while j not in self.matchers:
            path.append(int(self.lineage[j]["token"]))
            j = int(self.lineage[j]["parent"])
        m = self.matchers[j].deep_copy()
        for t in reversed(path):
            if not m.consume_token(t):  # (it did when the state was made)
                raise AssertionError(f"host state {i} cannot be rebuilt")
        self.matchers[i] = m
        self.stats["rebuilt"] += 1
        return m

    def _collect(self, live) -> None:
        """Free the matchers, masks and children memos of every state but the starts and those given to the last
        :data:`RECENT` mask calls (``live``: this one's; several calls, in case a sharded run asks per shard), once
        more than ``max(HOLD_MIN, 2 x kept)`` states hold them (amortised: a collection frees at least half of what
        is held, so its cost is spread over as many new states)."""
        self.recent.append(set(live))
        held = set(self.matchers) | set(self.allowed)
        keep = set().union(*self.recent) | set(range(len(self.specs)))
        if len(held) <= max(self.HOLD_MIN, 2 * len(keep)):
            return
        for d in (self.matchers, self.allowed, self.ending, self.children):
            for i in [i for i in d if i not in keep]:
                del d[i]
        self.stats["freed"] += len(held - keep)

    # -- masks ---------------------------------------------------------------------------------------

    def _fill(self, idx: list[int]) -> None:
        """Masks (and ending tokens) of the entries ``idx`` that have none yet: one parallel llguidance call."""
        import llguidance.numpy as llnp

        todo = [i for i in dict.fromkeys(idx) if i not in self.allowed]
        if not todo:
            return
        done = self.lineage["done"]
        live = [i for i in todo if not done[i]]
        for i in todo:
            if done[i]:
                self.allowed[i] = self.ending[i] = np.zeros(self.words * 4, np.uint8)
        if not live:
            return
        buf = np.zeros((len(live), self.words), np.int32)
        llnp.fill_next_token_bitmask_par(self.executor, [(self._matcher(i), r) for r, i in enumerate(live)], buf)
        bits = np.unpackbits(buf.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab].astype(bool)
        for r, i in enumerate(live):
            e = self.lineage[i]
            spec = self.specs[int(e["spec"])]
            ok = bits[r]
            ok[self.ll_eos[self.ll_eos < self.vocab]] = False  # the hole's own end rule decides end tokens
            ends = np.zeros(self.vocab, bool)
            if spec.kind == "eos":
                if self._matcher(i).is_accepting():
                    ends[list(spec.end_ids)] = True
                    ok = ok | ends
            else:
                past, end_at, _ = self.term[spec.text]
                k = int(e["k"])
                ok = ok & ~past[k]
                for t in np.flatnonzero(ok & end_at[k]):  # the hole ends with t: the value must be complete
                    c = self._matcher(i).deep_copy()
                    if c.consume_token(int(t)) and c.is_accepting():
                        ends[t] = True
                    else:
                        ok[t] = False
            self.allowed[i] = self._pack(ok)
            self.ending[i] = self._pack(ends)

    def _pack(self, row: np.ndarray) -> np.ndarray:
        out = np.zeros(self.words * 4, np.uint8)
        packed = np.packbits(row, bitorder="little")
        out[: packed.shape[0]] = packed
        return out

    def masks(self, states: np.ndarray, ntok: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """``[B, W] int32`` packed masks of the host states (rows with a state ``< base`` or done: empty): the
        allowed tokens; none when the budget is spent; only tokens that end the hole on the last budgeted token.
        The states given are taken to be every state in use (the pool may free the others: :meth:`_collect`)."""
        import time

        t0 = time.perf_counter()
        states = np.asarray(states, np.int64).reshape(-1)
        ntok = np.asarray(ntok, np.int64).reshape(-1)
        budget = np.asarray(budget, np.int64).reshape(-1)
        out = np.zeros((states.shape[0], self.words * 4), np.uint8)
        host = np.flatnonzero(states >= self.base)
        with self.lock:
            idx = (states[host] - self.base) // 2
            self._collect(np.unique(idx).tolist())
            left = np.clip(budget[host] - ntok[host], 0, 2)  # 0: spent, 1: the last token, 2: more
            keys, inverse = np.unique(idx * 3 + left, return_inverse=True)
            self._fill([int(k) // 3 for k in keys])
            packed = np.zeros((keys.shape[0], self.words * 4), np.uint8)
            for u, key in enumerate(keys):
                i, rule = divmod(int(key), 3)
                if rule:
                    packed[u] = self.ending[i] if rule == 1 else self.allowed[i]
            out[host] = packed[inverse.reshape(-1)]
            self.stats["mask_calls"] += 1
            self.stats["masks"] += int(keys.shape[0])
            self.stats["mask_s"] += time.perf_counter() - t0
            self._held_stats()
        return out.view(np.int32)

    def _held_stats(self) -> None:
        self.stats["held"] = held = self.held
        self.stats["held_max"] = max(self.stats["held_max"], held)

    # -- steps ---------------------------------------------------------------------------------------

    def step(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """``[B] int32`` states after each row's token (rows not in a host state: ``-1``; a token the state does
        not allow: ``-1``)."""
        import time

        t0 = time.perf_counter()
        states = np.asarray(states, np.int64).reshape(-1)
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        out = np.full(states.shape, DISALLOWED, np.int32)
        host = np.flatnonzero(states >= self.base)
        with self.lock:
            idx = (states[host] - self.base) // 2
            pairs, inverse = np.unique(np.stack([idx, tokens[host]], axis=1), axis=0, return_inverse=True)
            new = np.full(pairs.shape[0], DISALLOWED, np.int32)
            for u, (i, t) in enumerate(pairs.tolist()):
                memo = self.children.setdefault(i, {})
                child = memo.get(t)
                if child is None:
                    child = memo[t] = self._child(i, t)
                if child >= 0:
                    new[u] = self.base + 2 * child + int(self.lineage[child]["done"])
            out[host] = new[inverse.reshape(-1)]
            self.stats["step_calls"] += 1
            self.stats["step_s"] += time.perf_counter() - t0
            self._held_stats()
        return out

    def _child(self, i: int, t: int) -> int:
        e = self.lineage[i]
        if e["done"] or not 0 <= t < self.vocab:
            return DISALLOWED
        self._fill([i])
        if not _bit(self.allowed[i], t):
            return DISALLOWED
        self.stats["steps"] += 1
        spec, k = int(e["spec"]), int(e["k"])
        if _bit(self.ending[i], t):
            return self._new(i, t, spec, k, True)
        c = self._matcher(i).deep_copy()
        if not c.consume_token(t):  # (the mask allowed it: llguidance agrees)
            return DISALLOWED
        text = self.specs[spec]
        k = int(self.term[text.text][2][k, t]) if text.kind == "text" else 0
        child = self._new(i, t, spec, k, False)
        self.matchers[child] = c
        return child

    def check(self, states) -> None:
        states = np.asarray(states).reshape(-1)
        bad = states[(states >= self.base) & ((states - self.base) // 2 >= self.size)]
        if bad.size:
            raise ValueError(f"host states {bad[:4].tolist()} are not in this run's pool")


_TERM_CACHE: dict = {}


def _pool(handle) -> HostPool:
    pool = _POOLS.get(int(np.asarray(handle)))
    if pool is None:
        raise RuntimeError("a host-matcher hole ran without its run's matcher pool (HostTable.bind)")
    return pool


def _mask_cb(handle, states, ntok, budget):
    return _pool(handle).masks(states, ntok, budget)


def _step_cb(handle, states, tokens):
    return _pool(handle).step(states, tokens)


# ------------------------------------------------------------------------------------------------ the table


@jax.tree_util.register_pytree_node_class
class HostTable:
    """The constraint runtime of a run with host holes: the device :class:`TokenTable` for the regular holes and
    llguidance (through ``jax.pure_callback``) for states ``>= base`` (see the module docstring). Implements
    :class:`~lmprog.automata.protocol.HoleConstraints`; a pytree (``handle``: the run's pool, a traced scalar, so
    every run uses the same compiled kernels). A program's table is unbound (``handle`` -1);
    :meth:`bind` gives a run its own pool.

    Programs without host holes never see this class: their kernels are exactly the device path's."""

    def __init__(self, table: TokenTable, handle, specs: tuple = (), tokenizer=None, slack: int = 0):
        self.table = table
        self.handle = handle
        self.specs = tuple(specs)
        self.tokenizer = tokenizer
        self.slack = int(slack)

    def tree_flatten(self):
        return (self.table, self.handle), (self.slack,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], (), None, aux[0])

    # -- shapes and host helpers -----------------------------------------------------------------------

    @property
    def base(self) -> int:
        return self.table.num_states

    @property
    def vocab_size(self) -> int:
        return self.table.vocab_size

    @property
    def num_states(self) -> int:
        """Every valid state id is below this (host states are allocated as the run goes)."""
        return (1 << 31) - 1

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def max_pending(self) -> int:
        return max(self.table.max_pending(), self.slack)

    def start(self, hole: int) -> int:
        """The start state of host hole ``hole`` (its index in ``specs``)."""
        return self.base + 2 * hole

    def bind(self) -> tuple["HostTable", HostPool]:
        """A fresh pool for one run, and this table pointing at it (keep the pool alive while the run runs)."""
        pool = HostPool(self.specs, self.tokenizer, self.vocab_size, self.base)
        return HostTable(self.table, jnp.asarray(pool.handle, jnp.int32), self.specs, self.tokenizer, self.slack), pool

    # -- the protocol ----------------------------------------------------------------------------------

    def _split(self, states):
        host = states >= self.base
        return host, jnp.where(host, DISALLOWED, states)

    def _host_mask(self, states, counts, max_tokens):
        b, v = states.shape[0], self.vocab_size
        words = -(-v // WORD)
        host = states >= self.base
        budget = jnp.broadcast_to(jnp.asarray((1 << 30) if max_tokens is None else max_tokens, jnp.int32), (b,))

        def call(_):
            return jax.pure_callback(_mask_cb, jax.ShapeDtypeStruct((b, words), jnp.int32), self.handle,
                                     jnp.where(host, states, DISALLOWED), counts[:, TOKENS], budget)

        packed = jax.lax.cond(jnp.any(host), call, lambda _: jnp.zeros((b, words), jnp.int32), None)
        bits = (packed[:, :, None] >> jnp.arange(WORD, dtype=jnp.int32)[None, None, :]) & 1
        return bits.reshape(b, words * WORD)[:, :v].astype(bool)

    def _device(self, fn, states, shape, fill):
        """``fn()`` (a device-table call over every row) only when some row is in an automaton state."""
        return jax.lax.cond(jnp.any((states >= 0) & (states < self.base)), lambda _: fn(),
                            lambda _: jnp.full(shape, fill), None)

    def mask(self, states, counts, max_tokens=None):
        host, dev_states = self._split(states)
        shape = (states.shape[0], self.vocab_size)
        dev = self._device(lambda: self.table.mask(dev_states, counts, max_tokens), states, shape, False)
        return jnp.where(host[:, None], self._host_mask(states, counts, max_tokens), dev)

    def next_states(self, states):
        host, dev_states = self._split(states)
        shape = (states.shape[0], self.vocab_size)
        dev = self._device(lambda: self.table.next_states(dev_states), states, shape, DISALLOWED)
        counts = jnp.zeros((states.shape[0], 3), jnp.int32)
        return jnp.where(host[:, None], jnp.where(self._host_mask(states, counts, None), 0, DISALLOWED), dev)

    def step(self, states, counts, tokens):
        host, dev_states = self._split(states)
        d_states, d_counts = self.table.step(dev_states, counts, tokens)

        def call(_):
            return jax.pure_callback(_step_cb, jax.ShapeDtypeStruct(states.shape, jnp.int32), self.handle,
                                     jnp.where(host, states, DISALLOWED), tokens)

        h_states = jax.lax.cond(jnp.any(host), call, lambda _: jnp.full(states.shape, DISALLOWED, jnp.int32), None)
        h_counts = counts.at[:, TOKENS].add(1)
        return (jnp.where(host, h_states, d_states), jnp.where(host[:, None], h_counts, d_counts))

    def done(self, states, counts):
        host, dev_states = self._split(states)
        return jnp.where(host, ((states - self.base) & 1) == 1, self.table.done(dev_states, counts))

    def value_counts(self, states, counts):
        host, dev_states = self._split(states)
        return jnp.where(host[:, None], counts, self.table.value_counts(dev_states, counts))

    @staticmethod
    def init_counts(batch: int):
        return TokenTable.init_counts(batch)

    def __repr__(self) -> str:
        return f"HostTable(device states={self.base}, host holes={len(self.specs)})"


def json_options() -> dict:
    """llguidance's JSON options for host-path ``json()`` holes: ``json.dumps`` separators, no other whitespace."""
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_grammar(schema, terminator: bytes | None) -> str:
    """The llguidance grammar of a JSON Schema hole (the value, then ``terminator`` when given)."""
    doc = {"x-guidance": json_options()} if schema is True else dict(schema, **{"x-guidance": json_options()})
    tail = f" {_lark_literal(terminator)}" if terminator else ""
    return ('%llguidance {"no_forcing": true}\n'
            f"start: lmprog_value{tail}\nlmprog_value: %json {json.dumps(doc)}\n")


def lark_grammar(text: str, terminator: bytes | None) -> str:
    """The llguidance grammar of a Lark grammar hole: the user's grammar as a nested grammar, then ``terminator``."""
    inner = '%llguidance {"no_forcing": true}\n' + text
    tail = f" {_lark_literal(terminator)}" if terminator else ""
    return json.dumps({"grammars": [
        {"name": "lmprog_hole", "lark_grammar": '%llguidance {"no_forcing": true}\n' + f"start: @lmprog_value{tail}\n"},
        {"name": "lmprog_value", "lark_grammar": inner},
    ]})


def _lark_literal(b: bytes) -> str:
    return json.dumps(b.decode("utf-8"))
