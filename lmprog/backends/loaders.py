"""Load Llama-family weights from a GGUF file or a Hugging Face folder into :class:`LlamaModel`.

GGUF: metadata under ``{arch}.*`` gives the config; tensors are dequantized with ``gguf`` (F32, F16,
BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants). llama.cpp's converter permutes the rows of the Q and K
projections of ``llama``-architecture models so that each head's rotary pairs are adjacent
(interleaved RoPE); we undo that permutation so that both formats share the rotate-half RoPE of
:mod:`lmprog.backends.llama`. Qwen2 files are stored unpermuted.

HF folder: ``config.json`` + ``*.safetensors`` (sharded or not) + ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lmprog.backends.gguf_file import GGUFError, GGUFFile
from lmprog.backends.llama import LayerWeights, LlamaConfig, LlamaModel, LlamaWeights, rope_inv_freq
from lmprog.backends.tokenizer import tokenizer_from_gguf_fields, tokenizer_from_hf_folder

GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelLoadError(ValueError):
    """A model file or folder could not be loaded."""


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half layout).

    llama.cpp maps HF rows with ``w.reshape(n_heads, 2, D/2, -1).swapaxes(1, 2)``; this is the inverse.
    Works for weights ``[out, in]`` and biases ``[out]``.
    """
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: LlamaConfig, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's ``rope_type = "llama3"`` scaling (as in the HF config)."""
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    inv = rope_inv_freq(config).astype(np.float64)
    wavelen = 2 * np.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(
        wavelen < original / high,
        inv,
        np.where(wavelen > original / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv),
    )
    return (inv / scaled).astype(np.float32)


def _assemble_weights(config: LlamaConfig, get, names: dict, has_output: bool, freq_factors) -> LlamaWeights:
    """Assemble :class:`LlamaWeights` from ``get(key) -> np.ndarray`` (linear maps ``[out, in]``) and a name map."""

    def linear(key, i):
        return jnp.asarray(np.ascontiguousarray(get(names[key].format(i=i)).T, dtype=np.float32))

    def vector(key, i):
        return jnp.asarray(get(names[key].format(i=i)).astype(np.float32))

    def layer(i):
        bias = {k: vector(k, i) if config.qkv_bias else None for k in ("bq", "bk", "bv")}
        return LayerWeights(
            attn_norm=vector("attn_norm", i), wq=linear("wq", i), wk=linear("wk", i), wv=linear("wv", i),
            wo=linear("wo", i), ffn_norm=vector("ffn_norm", i), w_gate=linear("w_gate", i),
            w_up=linear("w_up", i), w_down=linear("w_down", i), **bias,
        )  # fmt: skip

    return LlamaWeights(
        embed=jnp.asarray(get(names["embed"]).astype(np.float32)),
        layers=tuple(layer(i) for i in range(config.n_layers)),
        final_norm=jnp.asarray(get(names["final_norm"]).astype(np.float32)),
        lm_head=None if config.tie_embeddings or not has_output else linear("lm_head", 0),
        rope_inv_freq=jnp.asarray(rope_inv_freq(config, freq_factors)),
    )


# --------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}


def gguf_config(meta: dict, tensor_names) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata {arch}.{name} is missing")
        return value

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // n_heads),
        rope_theta=float(f"{float(key('rope.freq_base', 10000.0)):.7g}"),
        # stored as float32: 1e-5 reads back as 9.99999974e-06; keep the value the model was trained with
        rms_eps=float(f"{float(key('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        max_context=int(key("context_length", 2048)),
    )


def load_gguf(path: str | Path, name: str | None = None) -> LlamaModel:
    """Load a ``.gguf`` Llama/Mistral/Qwen2 model (weights dequantized to float32)."""
    path = Path(path)
    try:
        gguf = GGUFFile(path)
        meta = gguf.metadata
        config = gguf_config(meta, set(gguf.tensor_names))
        tokenizer = tokenizer_from_gguf_fields(meta)
        permute = meta.get("general.architecture") in ("llama", "mistral")

        def get(tensor_name: str) -> np.ndarray:
            w = gguf.tensor(tensor_name)
            if permute and (".attn_q." in tensor_name or ".attn_k." in tensor_name):
                heads = config.n_heads if ".attn_q." in tensor_name else config.n_kv_heads
                w = unpermute_rope_rows(w, heads)
            return w

        freq = gguf.tensor("rope_freqs.weight") if "rope_freqs.weight" in gguf else None
        weights = _assemble_weights(config, get, _GGUF_NAMES, "output.weight" in gguf, freq)
    except (GGUFError, ValueError, KeyError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: {exc}") from exc
    return LlamaModel(name or path.name, config, weights, tokenizer)


# --------------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------------

_HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_config(cfg: dict) -> tuple[LlamaConfig, dict | None]:
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}")
    n_heads = int(cfg["num_attention_heads"])
    config = LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type != "qwen2")),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        max_context=int(cfg.get("max_position_embeddings", 2048)),
    )
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in ("llama3", "default"):
        raise ModelLoadError(f"unsupported rope_scaling {scaling!r}; supported: llama3")
    return config, scaling if scaling and (scaling.get("rope_type") or scaling.get("type")) == "llama3" else None


def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    tensors = {}
    for file in files:
        # The flax reader handles bfloat16, which plain numpy cannot represent.
        with safe_open(str(file), framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
    return tensors


def load_hf_folder(folder: str | Path, name: str | None = None) -> LlamaModel:
    """Load a Hugging Face model folder (``config.json``, ``*.safetensors``, ``tokenizer.json``)."""
    folder = Path(folder)
    try:
        config, scaling = hf_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{folder}: cannot read config.json ({exc})") from exc
    tensors = _read_safetensors(folder)

    def get(tensor_name: str) -> np.ndarray:
        if tensor_name not in tensors:
            raise ModelLoadError(f"{folder}: tensor {tensor_name!r} is missing")
        return tensors[tensor_name]

    tie = config.tie_embeddings or "lm_head.weight" not in tensors
    if tie != config.tie_embeddings:
        config = LlamaConfig(**{**config.__dict__, "tie_embeddings": True})
    freq = llama3_rope_factors(config, scaling) if scaling else None
    weights = _assemble_weights(config, get, _HF_NAMES, not tie, freq)
    return LlamaModel(name or folder.name, config, weights, tokenizer_from_hf_folder(folder))
