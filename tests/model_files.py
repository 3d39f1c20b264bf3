"""Write tiny random Llama-family models to disk as GGUF files and Hugging Face folders, the way
llama.cpp's converter and transformers' ``save_pretrained`` lay them out, so loaders can be tested."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

from lmprog.backends.llama import LlamaConfig, LlamaWeights
from lmprog.backends.tokenizer import Tokenizer, bytes_to_unicode


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(config: LlamaConfig, weights: LlamaWeights) -> dict[str, np.ndarray]:
    """The weights under HF names, linear maps as ``[out, in]``."""
    sd = {"model.embed_tokens.weight": np.asarray(weights.embed), "model.norm.weight": np.asarray(weights.final_norm)}
    if weights.lm_head is not None:
        sd["lm_head.weight"] = np.asarray(weights.lm_head).T
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        layer = weights.layers[i]
        sd[p + "input_layernorm.weight"] = np.asarray(layer.attn_norm)
        sd[p + "post_attention_layernorm.weight"] = np.asarray(layer.ffn_norm)
        for name, key in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            sd[p + f"self_attn.{name}_proj.weight"] = np.asarray(getattr(layer, key)).T
        if config.qkv_bias:
            for name, key in (("q", "bq"), ("k", "bk"), ("v", "bv")):
                sd[p + f"self_attn.{name}_proj.bias"] = np.asarray(getattr(layer, key))
        for name, key in (("gate", "w_gate"), ("up", "w_up"), ("down", "w_down")):
            sd[p + f"mlp.{name}_proj.weight"] = np.asarray(getattr(layer, key)).T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def write_hf_folder(folder: Path, config: LlamaConfig, weights: LlamaWeights, tokenizer: Tokenizer, model_type="llama"):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(config, weights), str(folder / "model.safetensors"))
    cfg = {
        "model_type": model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": config.qkv_bias,
        "max_position_embeddings": config.max_context, "eos_token_id": tokenizer.eos_ids[0],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    tokenizer.hf.save(str(folder / "tokenizer.json"))
    eos = tokenizer.token_bytes[tokenizer.eos_ids[0]].decode()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "add_bos_token": False}))


def write_gguf(
    path: Path,
    config: LlamaConfig,
    weights: LlamaWeights,
    tokenizer: Tokenizer,
    arch: str = "llama",
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
):
    """Write a GGUF file as llama.cpp's converter would (Q/K permuted for ``llama``; 1-D tensors in F32)."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_context)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_vocab_size(config.vocab_size)
    alias = bytes_to_unicode()
    tokens = [
        tokenizer.token_bytes[i].decode() if i in tokenizer.special_ids else "".join(alias[b] for b in tokenizer.token_bytes[i])
        for i in range(len(tokenizer))
    ]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in tokenizer.special_ids else 1 for i in range(len(tokens))])
    w.add_token_merges([])
    w.add_eos_token_id(tokenizer.eos_ids[0])
    w.add_add_bos_token(False)

    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }  # fmt: skip
    for name, array in hf_state_dict(config, weights).items():
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            out = f"blk.{layer}.{gguf_names[rest]}"
        else:
            out = gguf_names[name]
        if arch == "llama" and (".attn_q." in out or ".attn_k." in out):
            array = llama_cpp_permute(array, config.n_heads if ".attn_q." in out else config.n_kv_heads)
        if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
            w.add_tensor(out, array)
        else:
            w.add_tensor(out, quants.quantize(array, qtype), raw_dtype=qtype)  # shape from the byte shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
