"""Plain batched ancestral sampling from a LanguageModel: the raw-decoding baseline and the demo.

The prompt is prefilled once (one row) and broadcast to every row of the batch; the token loop is a
``lax.scan`` inside one jitted call, so nothing returns to the host between tokens.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.backends.base import LanguageModel
from lmprog.inference.kernel import sample_masked


class Samples(NamedTuple):
    tokens: np.ndarray  # [batch, n_tokens] sampled ids (after EOS: EOS repeated)
    logprob: np.ndarray  # [batch] log-probability of each row's tokens under the (tempered) model
    texts: list[str]  # decoded rows, up to and excluding the first EOS


def prefill(lm: LanguageModel, prompt_ids, max_len: int, batch: int):
    """Run the prompt once and broadcast its cache to ``batch`` rows. Returns ``(last_logits [V], cache)``."""
    ids = jnp.asarray([list(prompt_ids)], jnp.int32)
    cache = lm.init_cache(1, max_len)
    logits, cache = _apply(lm, lm.params, cache, ids, jnp.zeros(1, jnp.int32))
    return logits[0, -1], lm.broadcast(cache, batch)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _apply(lm, params, cache, tokens, positions):
    return lm.apply(params, cache, tokens, positions)


@partial(jax.jit, static_argnames=("lm", "batch", "n_tokens", "temperature"))
def _sample_loop(lm, params, cache, first_logits, start, key, batch: int, n_tokens: int, temperature: float):
    eos = jnp.asarray(lm.eos_ids, jnp.int32)

    def step(carry, key_t):
        logits, cache, pos, done, total = carry
        scaled = logits / temperature
        tok, log_norm = sample_masked(key_t, scaled)  # one uniform per row, not a Gumbel per vocabulary entry
        tok = jnp.where(done, eos[0], tok)
        logp_tok = jnp.take_along_axis(scaled, tok[:, None], axis=1)[:, 0] - log_norm
        total = total + jnp.where(done, 0.0, logp_tok)
        done = done | jnp.isin(tok, eos)
        new_logits, cache = lm.apply(params, cache, tok[:, None], pos)
        return (new_logits[:, 0], cache, pos + 1, done, total), tok

    logits = jnp.broadcast_to(first_logits, (batch, first_logits.shape[-1]))
    pos = jnp.full((batch,), start, jnp.int32)
    init = (logits, cache, pos, jnp.zeros(batch, bool), jnp.zeros(batch, jnp.float32))
    (_, cache, _, _, total), toks = jax.lax.scan(step, init, jax.random.split(key, n_tokens))
    return toks.T, total


def sample(
    lm: LanguageModel, prompt: str, n_tokens: int = 32, batch: int = 1, temperature: float = 1.0, seed: int = 0
) -> Samples:
    """Draw ``batch`` continuations of ``prompt`` of up to ``n_tokens`` tokens (stopping at EOS)."""
    if n_tokens < 1 or batch < 1:
        raise ValueError("n_tokens and batch must be positive")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    prompt_ids = lm.tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    max_len = len(prompt_ids) + n_tokens
    if max_len > lm.max_context:
        raise ValueError(f"prompt + {n_tokens} tokens exceed the model's context of {lm.max_context}")
    first, cache = prefill(lm, prompt_ids, max_len, batch)
    toks, total = _sample_loop(
        lm, lm.params, cache, first, len(prompt_ids), jax.random.key(seed), batch, n_tokens, float(temperature)
    )
    toks = np.asarray(toks)
    texts = []
    for row in toks:
        ends = [i for i, t in enumerate(row) if t in lm.eos_ids]
        texts.append(lm.tokenizer.decode(row[: ends[0]] if ends else row))
    return Samples(toks, np.asarray(total), texts)
