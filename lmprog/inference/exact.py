"""Exact inference by enumeration, for small models and short programs (tests, debugging).

Walks every token sequence the program allows, depth first, with plain Python and float64, and returns
the unnormalized target ``gamma(x) = prod p_LM^(1/T)(generated and observed tokens) x factors`` of every
complete sequence and the normalizing constant ``Z = sum_x gamma(x)``. It reimplements the segment
semantics of :mod:`lmprog.inference.segments` independently of the jitted kernels, so the kernels can be
checked against it. Holes follow the constraint compiler's contract: at every step exactly the tokens of
``table.mask(state, counts, max_tokens)`` are allowed, and the hole ends when ``table.done`` holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.inference.holes import slack as hole_slack
from lmprog.inference.segments import Hole, Host, HostView, Observe, SegmentProgram, Text, hole_value

__all__ = ["ExactPath", "ExactPosterior", "enumerate_program"]


@dataclass
class ExactPath:
    tokens: tuple[int, ...]  # after the shared prefix (the engine's convention)
    values: dict[str, str]
    log_prob: float  # log gamma(x)
    data: dict = field(default_factory=dict)


@dataclass
class ExactPosterior:
    paths: list[ExactPath]
    log_z: float
    prefix: list[int]

    @property
    def z(self) -> float:
        return math.exp(self.log_z)

    def probs(self) -> dict[tuple[int, ...], float]:
        """Posterior probability of every complete token sequence (after the prefix)."""
        out: dict = {}
        for p in self.paths:
            out[p.tokens] = out.get(p.tokens, 0.0) + math.exp(p.log_prob - self.log_z)
        return out

    def marginal(self, key: Callable[[ExactPath], Hashable]) -> dict:
        out: dict = {}
        for p in self.paths:
            k = key(p)
            out[k] = out.get(k, 0.0) + math.exp(p.log_prob - self.log_z)
        return out

    def best(self) -> ExactPath:
        return max(self.paths, key=lambda p: p.log_prob)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x)
    with np.errstate(divide="ignore"):
        return x - (m + np.log(np.sum(np.exp(x - m))))


def enumerate_program(
    lm, program: SegmentProgram, *, temperature: float = 1.0, max_tokens: int = 256, limit: int = 1_000_000
) -> ExactPosterior:
    """Every complete sequence of ``program`` with its unnormalized target probability.

    Args:
        lm: a LanguageModel; ``lm.host_logits(history)`` is used when present (toy LMs), else ``lm.apply``
            on one row (slow: only for tiny models).
        temperature: the base LM becomes ``p^(1/T)`` (locally normalized), as in the engine.
        max_tokens: budget of holes that set none.
        limit: maximum number of LM evaluations (guards against exponential blow-up).
    """
    tok = lm.tokenizer
    v = program.vocab
    table = program.table
    if hasattr(table, "bind"):  # host-matcher holes: a pool of matcher states for this enumeration
        table, _pool = table.bind()
    slack = hole_slack(table)  # the engine's hard cap: budget + slack tokens per hole

    @jax.jit
    def expand(state, counts, budget):
        """For one (state, counts): the allowed tokens, and every token's successor state, counts and done."""
        ok = table.mask(state[None], counts[None], budget)[0]
        states = jnp.full((v,), state, jnp.int32)
        nxt, cnt = table.step(states, jnp.broadcast_to(counts, (v, counts.shape[0])), jnp.arange(v, dtype=jnp.int32))
        return ok, nxt, cnt, table.done(nxt, cnt)

    holes = program.holes
    hole_by_name = {h.name: h for h in holes}
    calls = [0]
    memo: dict = {}

    def logp(history: tuple[int, ...]) -> np.ndarray:
        if history in memo:
            return memo[history]
        calls[0] += 1
        if calls[0] > limit:
            raise RuntimeError(f"enumeration needs more than {limit} LM evaluations")
        if hasattr(lm, "host_logits"):
            logits = np.asarray(lm.host_logits(history), np.float64)
        else:  # pragma: no cover - generic, slow path
            cache = lm.init_cache(1, len(history) + 1)
            out, _ = lm.apply(lm.params, cache, jnp.asarray([history], jnp.int32), jnp.zeros((1,), jnp.int32))
            logits = np.asarray(out[0, -1], np.float64)
        res = _log_softmax(logits[:v] / temperature)
        memo[history] = res
        return res

    # shared prefix (same rule as the engine: BOS is prepended when nothing precedes the first scored token)
    segs = program.segments
    i0 = 0
    prefix: list[int] = []
    observed: list[bool] = []
    while i0 < len(segs) and isinstance(segs[i0], (Text, Observe)) and segs[i0].tokens is not None:
        prefix += list(segs[i0].tokens)
        observed += [isinstance(segs[i0], Observe)] * len(segs[i0].tokens)
        i0 += 1
    if not prefix or observed[0]:
        prefix = [int(tok.bos_id)] + prefix
        observed = [False] + observed
    lw0 = 0.0
    for t in range(1, len(prefix)):
        if observed[t]:
            lw0 += float(logp(tuple(prefix[:t]))[prefix[t]])
    prefix_text = tok.decode(prefix, skip_special=True)
    paths: list[ExactPath] = []

    def view(post, spans, data, hlp) -> HostView:
        return HostView(
            tokens=[list(post)],
            spans=[dict(spans)],
            alive=np.ones((1,), bool),
            data=[data],
            tokenizer=tok,
            holes=hole_by_name,
            prefix_text=prefix_text,
            hole_logprobs=np.array([[hlp.get(h.name, 0.0) for h in holes]], np.float64),
        )

    def walk(j: int, post: tuple[int, ...], spans: dict, lw: float, data: dict, hlp: dict):
        """``hlp``: the LM log-probability of each completed hole (what host views report)."""
        if lw == -math.inf:
            return
        if j == len(segs):
            values = {name: hole_value(tok, hole_by_name[name], post[a:b]) for name, (a, b) in spans.items()}
            paths.append(ExactPath(post, values, lw, data))
            return
        seg = segs[j]
        history = tuple(prefix) + post
        if isinstance(seg, (Text, Observe)):
            toks = list(seg.tokens) if seg.tokens is not None else list(seg.render(view(post, spans, data, hlp))[0])
            add = 0.0
            if isinstance(seg, Observe):
                h = history
                for t in toks:
                    add += float(logp(h)[t])
                    h = h + (t,)
            walk(j + 1, post + tuple(toks), spans, lw + add, data, hlp)
        elif isinstance(seg, Host):
            d = dict(data)
            out = seg.fn(view(post, spans, d, hlp))
            add = 0.0 if out is None else float(np.asarray(out, np.float64).reshape(-1)[0])
            walk(j + 1, post, spans, lw + add, d, hlp)
        else:
            hole: Hole = seg
            start = hole.start if not callable(hole.start) else int(np.asarray(hole.start(view(post, spans, data, hlp))).reshape(-1)[0])
            if start < 0:
                walk(j + 1, post, spans, lw, data, hlp)
                return
            budget = int(hole.max_tokens if hole.max_tokens is not None else max_tokens)
            begin, lw_begin = len(post), lw

            def gen(state: int, counts: np.ndarray, n: int, post: tuple[int, ...], lw: float):
                if n >= budget + slack:
                    return
                lp = logp(tuple(prefix) + post)
                ok, nxt, cnt, done = jax.device_get(expand(jnp.int32(state), jnp.asarray(counts), jnp.int32(budget)))
                for t in np.flatnonzero(ok):
                    t = int(t)
                    if lp[t] == -math.inf:
                        continue
                    p2 = post + (t,)
                    if done[t]:
                        lw_done = lw + float(lp[t])
                        walk(j + 1, p2, {**spans, hole.name: (begin, len(p2))}, lw_done, data,
                             {**hlp, hole.name: lw_done - lw_begin})
                    else:
                        gen(int(nxt[t]), cnt[t], n + 1, p2, lw + float(lp[t]))

            gen(int(start), np.asarray(table.init_counts(1))[0], 0, post, lw)

    walk(i0, (), {}, lw0, {}, {})
    if not paths:
        return ExactPosterior([], -math.inf, prefix)
    lws = np.array([p.log_prob for p in paths])
    m = lws.max()
    return ExactPosterior(paths, float(m + np.log(np.sum(np.exp(lws - m)))), prefix)
