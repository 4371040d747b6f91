"""Tiny random transformers GLM models (the parity oracle) and THUDM-format helpers written from the spec.

Nothing here uses glm_jax: these are the independent references the tests compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers


def tiny_hf_config(groups=2, rope_theta=10000.0, glm4=False, num_labels=None, vocab=128, heads=4, layers=2,
                   head_dim=16, hidden=64, ffn=96, eps=1e-5):
    cls = transformers.Glm4Config if glm4 else transformers.GlmConfig
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
              max_position_embeddings=256, rope_theta=rope_theta, rms_norm_eps=eps, pad_token_id=0,
              eos_token_id=[2], attention_bias=True)
    if num_labels:
        kw["num_labels"] = num_labels
    return cls(**kw)


def randomize(model: torch.nn.Module, seed=0, std=0.2):
    """Random weights everywhere, biases and norm scales included, so no term is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if "norm" in name else noise)
    return model.eval()


def tiny_hf_model(kind="causal", seed=0, **cfg_kw):
    cfg = tiny_hf_config(**cfg_kw)
    glm4 = cfg_kw.get("glm4", False)
    if kind == "causal":
        model = (transformers.Glm4ForCausalLM if glm4 else transformers.GlmForCausalLM)(cfg)
    else:
        model = (transformers.Glm4ForSequenceClassification if glm4 else transformers.GlmForSequenceClassification)(cfg)
    return randomize(model, seed)


def left_padded_batch(lengths, seq, vocab, seed=0):
    """ids, attention_mask, position_ids for left-padded rows (positions restart at 0 after the pads)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(len(lengths), seq))
    mask = np.zeros((len(lengths), seq), np.int64)
    for r, n in enumerate(lengths):
        mask[r, seq - n:] = 1
    ids = np.where(mask == 1, ids, 0)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


def thudm_to_transformers_state_dict(thudm: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """docs/checkpoints.md, "Tensor names": rename THUDM chatglm tensors to transformers glm, splitting
    query_key_value by rows."""
    q = cfg["num_attention_heads"] * cfg["kv_channels"]
    kv = cfg["multi_query_group_num"] * cfg["kv_channels"]
    out = {}
    for name, t in thudm.items():
        if name == "transformer.rotary_pos_emb.inv_freq":
            continue
        if name == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name == "transformer.output_layer.weight":
            out["lm_head.weight"] = t
        else:
            prefix = "transformer.encoder.layers."
            assert name.startswith(prefix), name
            i, rest = name[len(prefix):].split(".", 1)
            base = f"model.layers.{i}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                out[base + f"self_attn.q_proj.{kind}"] = t[:q]
                out[base + f"self_attn.k_proj.{kind}"] = t[q:q + kv]
                out[base + f"self_attn.v_proj.{kind}"] = t[q + kv:]
            else:
                out[base + {
                    "input_layernorm.weight": "input_layernorm.weight",
                    "self_attention.dense.weight": "self_attn.o_proj.weight",
                    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
                    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
                }[rest]] = t
    return out


def transformers_to_thudm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse rename, fusing q/k/v rows into query_key_value (THUDM layout)."""
    out = {"transformer.rotary_pos_emb.inv_freq": torch.ones(4)}
    layers = sorted({int(n.split(".")[2]) for n in sd if n.startswith("model.layers.")})
    out["transformer.embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    for i in layers:
        b, t = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[t + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[b + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        out[t + "input_layernorm.weight"] = sd[b + "input_layernorm.weight"]
        out[t + "self_attention.dense.weight"] = sd[b + "self_attn.o_proj.weight"]
        out[t + "post_attention_layernorm.weight"] = sd[b + "post_attention_layernorm.weight"]
        out[t + "mlp.dense_h_to_4h.weight"] = sd[b + "mlp.gate_up_proj.weight"]
        out[t + "mlp.dense_4h_to_h.weight"] = sd[b + "mlp.down_proj.weight"]
    return out


def thudm_config(hf_cfg, rope_ratio=None, quantization_bit=None) -> dict:
    """A THUDM chatglm config.json (keys as in the released ChatGLM3/GLM-4 repos) for a transformers GlmConfig."""
    cfg = {
        "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "ffn_hidden_size": hf_cfg.intermediate_size, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "hidden_size": hf_cfg.hidden_size, "kv_channels": hf_cfg.head_dim,
        "layernorm_epsilon": hf_cfg.rms_norm_eps, "multi_query_attention": True,
        "multi_query_group_num": hf_cfg.num_key_value_heads, "num_attention_heads": hf_cfg.num_attention_heads,
        "num_layers": hf_cfg.num_hidden_layers, "original_rope": True, "padded_vocab_size": hf_cfg.vocab_size,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 256, "use_cache": True, "torch_dtype": "float32",
        "eos_token_id": 2, "pad_token_id": 0,
    }
    if rope_ratio is not None:
        cfg["rope_ratio"] = rope_ratio
    if quantization_bit:
        cfg["quantization_bit"] = quantization_bit
    return cfg


def thudm_quantize(w: torch.Tensor, bits: int):
    """THUDM's per-row symmetric weight quantization (docs/checkpoints.md, "Quantized THUDM
    checkpoints"), written in torch from the spec."""
    scale = w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        hi, lo = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
        q = (((hi << 4) | (lo & 0xF)) & 0xFF).to(torch.uint8).view(torch.int8)
    return q, scale


def write_checkpoint(out: Path, state_dict: dict[str, torch.Tensor], config: dict, fmt="safetensors", shards=1):
    """Writes a state dict as HF does: one file or `shards` files with an index json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    names = list(state_dict)
    chunks = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for k, chunk in enumerate(chunks):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: state_dict[n].contiguous() for n in chunk}
        if fmt == "safetensors":
            save_file(part, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(part, out / file)
        weight_map.update({n: file for n in chunk})
    if shards > 1:
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def quantize_thudm_state_dict(sd: dict[str, torch.Tensor], bits: int):
    """Quantizes the four block linears of a THUDM state dict as the quantized releases store them.

    Returns (state dict with int8 `.weight` + `.weight_scale`, {name: unpacked integer values [out, in]}).
    """
    out, ints = dict(sd), {}
    for name, w in sd.items():
        if "layers" in name and name.endswith(".weight") and any(
                k in name for k in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")):
            q, scale = thudm_quantize(w, bits)
            out[name], out[name + "_scale"] = q, scale
            if bits == 4:  # int8 arithmetic shifts sign-extend each nibble
                q = torch.stack([q >> 4, (q << 4) >> 4], dim=-1).reshape(q.shape[0], -1)
            ints[name] = q
    return out, ints
