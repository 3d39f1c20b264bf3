"""Plain batched sampling (the raw-decoding baseline and `lmprog generate`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lmprog.backends.generate import sample
from lmprog.backends.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=7, max_context=64)


def test_reported_logprob_is_the_models_logprob_of_the_sampled_tokens(model):
    prompt = model.tokenizer.encode("abc")
    out = sample(model, "abc", n_tokens=5, batch=4, seed=3)
    for row, logprob in zip(out.tokens, out.logprob):
        eos = [i for i, t in enumerate(row) if t in model.eos_ids]
        keep = row[: eos[0] + 1] if eos else row
        full = model.logprobs(prompt + list(keep))
        expected = sum(full[len(prompt) - 1 + i, t] for i, t in enumerate(keep))
        assert logprob == pytest.approx(expected, abs=1e-3)


def test_first_token_frequencies_match_the_model(model):
    """Chi-square goodness of fit of 4000 first tokens against softmax(logits); failure rate 1e-4."""
    n = 4000
    out = sample(model, "xy", n_tokens=1, batch=n, seed=11)
    # float64 and renormalized: scipy's chisquare requires sum(expected) == sum(observed) to ~1e-8 relative,
    # which float32 probabilities miss on some CPUs (AVX-512 reductions round differently)
    probs = np.exp(np.asarray(model.logprobs(model.tokenizer.encode("xy"))[-1], dtype=np.float64))
    probs /= probs.sum()
    counts = np.bincount(out.tokens[:, 0], minlength=len(probs))
    common = probs * n >= 5  # pool rare tokens so the chi-square approximation holds
    observed = np.append(counts[common], counts[~common].sum())
    expected = np.append(probs[common], probs[~common].sum()) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_same_seed_same_samples_and_bad_arguments(model):
    a = sample(model, "q", n_tokens=4, batch=3, seed=5)
    b = sample(model, "q", n_tokens=4, batch=3, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="exceed the model's context"):
        sample(model, "q", n_tokens=100)
    with pytest.raises(ValueError, match="temperature must be positive"):
        sample(model, "q", temperature=0)
