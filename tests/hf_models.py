"""Tiny random transformers GLM models (the parity oracle) and THUDM-format helpers written from the spec.

The oracle side uses no glm_jax: these are the independent references the tests compare against. The last
section ("our side") runs glm_jax's public API (load_hf, GLMForCausalLM, generate) on what the oracle wrote, so
that every family's parity test compares the same way.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from glm_jax import GLMForCausalLM, init_cache, load_hf
from glm_jax import generation as G

RTOL = 1e-4  # max |ours - transformers'| / max |transformers'| over the real tokens, fp32 both sides


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


def randomize(model: torch.nn.Module, seed=0, std=0.2, confident=False):
    """Random weights everywhere, biases, norm scales and MoE routers' correction biases (buffers) included, so no
    term is trivially zero or one. confident=True scales projections to ~unit variance (peaked next-token
    distributions, for greedy generation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + std * noise)
            elif not confident or name.endswith("bias"):
                p.copy_(std * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # [.., out, in]: fan-in is the last dim (experts' gate_up_proj [E, 2I, H] included)
                p.copy_(noise * 1.2 / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return model.eval()


def tiny_hf_model(kind="causal", seed=0, **cfg_kw):
    cfg = tiny_hf_config(**cfg_kw)
    glm4 = cfg_kw.get("glm4", False)
    if kind == "causal":
        model = (transformers.Glm4ForCausalLM if glm4 else transformers.GlmForCausalLM)(cfg)
    else:
        model = (transformers.Glm4ForSequenceClassification if glm4 else transformers.GlmForSequenceClassification)(cfg)
    return randomize(model, seed)


# ------------------------------------------------ the MoE families: glm4_moe, glm4_moe_lite (MLA), glm_moe_dsa (DSA)
def tiny_moe_config(**kw):
    """glm4_moe (GLM-4.5): groups, a shared expert, qk norm, partial rotary, one dense layer first. `rope` updates
    rope_parameters."""
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
               attention_bias=True, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
               routed_scaling_factor=1.7, use_qk_norm=True, num_nextn_predict_layers=0, pad_token_id=0,
               eos_token_id=None, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    rope = kw.pop("rope", {})
    cfg["rope_parameters"] = {**cfg["rope_parameters"], **rope}
    cfg.update(kw)
    return transformers.Glm4MoeConfig(**cfg)


def tiny_lite_config(**kw):
    """glm4_moe_lite (GLM-4.7-Flash, latent attention). Distinct sizes everywhere (heads 4, nope 12, rope 8, v 10,
    q_lora 24, kv_lora 20) so that a transposed or mis-split tensor cannot go unnoticed."""
    cfg = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
               v_head_dim=10, max_position_embeddings=256, rms_norm_eps=1e-5, moe_intermediate_size=16,
               n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
               norm_topk_prob=True, routed_scaling_factor=1.8, rope_interleave=True, attention_bias=False,
               pad_token_id=0, eos_token_id=None, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.update(kw)
    return transformers.Glm4MoeLiteConfig(**cfg)


DSA_TOPK = 5  # index_topk of the tiny glm_moe_dsa model: below its test sequences, so the sparsity is active


def tiny_dsa_config(**kw):
    """glm_moe_dsa (GLM-5, sparse attention), eager attention (the mask form the layer tests build)."""
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, index_n_heads=8, index_head_dim=16, index_topk=DSA_TOPK,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                topk_group=1, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                pad_token_id=0, eos_token_id=[2])
    cfg = transformers.GlmMoeDsaConfig(**{**base, **kw})
    cfg._attn_implementation = "eager"
    return cfg


K, M = "linear_attention", "indexed_attention"  # glm5_next's layer kinds: KDA, MLA + pooled DSA
GLM5_NEXT_TOPK = 8  # 4 pools of 2 keys: below the test sequences, so the pooled sparsity is active


def tiny_glm5_next_config(**kw):
    """glm5_next (GLM-5.3-Flash): KDA and MLA layers, a "shared" indexer layer after a full one, pools of 2 keys,
    4 hyper-connection streams, clamped SwiGLU, one dense layer first; a one-block vision tower (unused by text).
    16 indexer heads: a pool's score is exactly 0 (a top-k tie that torch and XLA break differently) only when all
    heads' ReLU are 0."""
    n = kw.get("num_hidden_layers", 5)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=n,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, kv_lora_rank=12, q_lora_rank=16, qk_nope_head_dim=8, v_head_dim=10,
                index_topk=GLM5_NEXT_TOPK, index_head_dim=8, index_n_heads=16, index_kpool=2, linear_head_dim=8,
                linear_num_heads=2, hc_mult=4, swiglu_limit=1.5, mlp_layer_types=["dense"] + ["sparse"] * (n - 1),
                layer_types=[K, M, M, K, M], indexer_types=["full", "full", "shared", "full", "full"],
                routed_scaling_factor=1.5, pad_token_id=0, eos_token_id=None)
    text.update(kw)
    vision = dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=32, intermediate_size=16,
                  projection_intermediate_size=16)
    return transformers.Glm5NextConfig(text_config=text, vision_config=vision)


ORACLES = {"glm4_moe": (tiny_moe_config, transformers.Glm4MoeForCausalLM),
           "glm4_moe_lite": (tiny_lite_config, transformers.Glm4MoeLiteForCausalLM),
           "glm_moe_dsa": (tiny_dsa_config, transformers.GlmMoeDsaForCausalLM),
           # transformers releases before glm5_next lack it (tests/test_glm5_next.py then skips)
           "glm5_next": (tiny_glm5_next_config, getattr(transformers, "Glm5NextForConditionalGeneration", None))}


def tiny_oracle(family, seed=0, confident=False, **kw):
    """A random fp32 transformers model of `family` (an ORACLES key) from its tiny config updated by `kw`."""
    config, model_cls = ORACLES[family]
    return randomize(model_cls(config(**kw)), seed, confident=confident)


tiny_moe_model = functools.partial(tiny_oracle, "glm4_moe")
tiny_lite_model = functools.partial(tiny_oracle, "glm4_moe_lite")
tiny_dsa_model = functools.partial(tiny_oracle, "glm_moe_dsa")


def saved_oracle(ref, d):
    """transformers writes `ref` (its safetensors names, its config.json) to `d`: (ref, d), for module fixtures."""
    ref.save_pretrained(d)
    return ref, d


def add_mtp_layer(d, ref, seed=0):
    """Appends an MTP layer at model.layers.{L} to a transformers-saved checkpoint, in the published layout
    (enorm, hnorm, eh_proj, shared_head.norm, a copy-shaped last block, copies of the embedding and head)."""
    sd = np_load_file(str(d / "model.safetensors"))
    n, h = ref.config.num_hidden_layers, ref.config.hidden_size
    rng = np.random.RandomState(seed)
    source = f"model.layers.{n - 1}."
    mtp = {k.replace(source, f"model.layers.{n}."): (rng.randn(*v.shape) * 0.2 + ("norm" in k)).astype(v.dtype)
           for k, v in sd.items() if k.startswith(source)}
    mtp.update({f"model.layers.{n}.{k}": (rng.randn(*s) * 0.2 + ("norm" in k)).astype(np.float32) for k, s in
                (("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                 ("shared_head.norm.weight", (h,)))})
    mtp[f"model.layers.{n}.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
    mtp[f"model.layers.{n}.shared_head.head.weight"] = sd["lm_head.weight"]
    np_save_file({**sd, **mtp}, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return mtp


def mtp_checkpoint(family, d, seed=0, layers=3, **kw):
    """A transformers checkpoint of `layers - 1` layers plus one MTP layer at model.layers.{layers - 1}, whose
    decoder block is transformers' own layer of a `layers`-layer model: (main oracle, MTP block oracle, the MTP
    layer's other tensors by name)."""
    big = tiny_oracle(family, seed=seed, confident=True, num_hidden_layers=layers, **kw)
    big.save_pretrained(d)
    n = layers - 1
    def fewer_layers(config):  # per-layer lists (layer_types, mlp_layer_types, indexer_types) lose the last layer
        return {**{k: (v[:n] if isinstance(v, list) and len(v) == layers else v) for k, v in config.items()},
                "num_hidden_layers": n}

    config = fewer_layers(json.loads((d / "config.json").read_text()))
    (d / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    sd = np_load_file(str(d / "model.safetensors"))
    h = big.config.hidden_size
    rng = np.random.RandomState(seed + 1)
    extra = {f"model.layers.{n}.{k}": (rng.randn(*s) * 0.2 + ("norm" in k)).astype(np.float32) for k, s in
             (("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
              ("shared_head.norm.weight", (h,)))}
    extra[f"model.layers.{n}.eh_proj.weight"] *= 2.0 / np.sqrt(2 * h)
    copies = {f"model.layers.{n}.embed_tokens.weight": sd["model.embed_tokens.weight"],
              f"model.layers.{n}.shared_head.head.weight": sd["lm_head.weight"]}
    np_save_file({**sd, **extra, **copies}, str(d / "model.safetensors"), metadata={"format": "pt"})
    config_cls, model_cls = ORACLES[family]
    main = model_cls(config_cls(**fewer_layers(big.config.to_diff_dict()))).eval()
    main.load_state_dict({k: v for k, v in big.state_dict().items() if not k.startswith(f"model.layers.{n}.")})
    main.config._attn_implementation = big.config._attn_implementation
    return main, big.model.layers[n], {k.split(f"layers.{n}.")[1]: torch.tensor(v) for k, v in extra.items()}


def torch_logits(model, ids, mask=None, pos=None):
    """The oracle's fp32 logits; with a mask, the position ids restart after left padding (left_padded_batch)."""
    with torch.no_grad():
        kw = {} if mask is None else dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
        return model(torch.tensor(ids), **kw).logits.numpy()


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


# ------------------------------------------------------------------------------------------------ our side
def rel_err(ours, ref):
    """max |ours - ref| / max |ref|, in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_same_params(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def save_and_load(ref, d, **load_kw):
    """transformers saves `ref` to `d`; load_hf reads it: (our config, our params)."""
    ref.save_pretrained(d)
    return load_hf(d, **load_kw)


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
    return jax.jit(lambda params, ids, mask, segments: GLMForCausalLM(cfg).apply(
        {"params": params}, ids, attention_mask=mask, segment_ids=segments))


def forward(cfg, params, ids, mask=None, segment_ids=None, **kw):
    """Logits of GLMForCausalLM(cfg with `kw`), one compiled program per config and shape (shared by the test
    modules: equal configs reuse it)."""
    as_array = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return np.asarray(_jitted_apply(cfg.replace(**kw))(params, jnp.asarray(ids), as_array(mask), as_array(segment_ids)))


class OracleLogits(NamedTuple):
    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray
    real: np.ndarray  # bool [B, S]: the tokens that are not left padding
    ours: np.ndarray
    theirs: np.ndarray


def assert_decode_matches_forward(cfg, params, ids, mask, *, prompt: int, cache_len: int, steps=None,
                                  prefill: bool = False, atol=1e-4):
    """Cached decoding equals the full forward: the first `prompt` tokens of the left-padded rows go into a fresh
    cache of `cache_len` slots (with `prefill`: the first-call form), then the rest in `steps` (token counts per
    call, default one at a time) against the cache; every real position's logits equal `forward`'s. Returns the
    final cache variables."""
    model = GLMForCausalLM(cfg)
    full = forward(cfg, params, ids, mask)

    def step(cache, x, m, first):
        return model.apply({"params": params, "cache": cache}, x, attention_mask=m, decode=True,
                           prefill=first and prefill, mutable=["cache"])

    apply = jax.jit(step, static_argnums=3)
    out, v = apply(init_cache(model, ids.shape[0], cache_len), jnp.asarray(ids[:, :prompt]),
                   jnp.asarray(mask[:, :prompt]), True)
    real = mask[:, :prompt] == 1
    np.testing.assert_allclose(np.asarray(out)[real], full[:, :prompt][real], atol=atol, rtol=atol)
    t = prompt
    for n in steps or [1] * (ids.shape[1] - prompt):
        out, v = apply(v["cache"], jnp.asarray(ids[:, t:t + n]), None, False)
        np.testing.assert_allclose(np.asarray(out), full[:, t:t + n], atol=atol, rtol=atol)
        t += n
    return v["cache"]


def assert_matches_oracle(ref, cfg, params, lengths, seed, rtol=RTOL, **kw) -> OracleLogits:
    """Our logits (cfg with `kw`, e.g. a dsa_block) against transformers' `ref` on a left-padded batch (rows of
    `lengths` real tokens, as long as the longest, ids from `seed`): rel_err over the real tokens < rtol."""
    ids, mask, pos = left_padded_batch(lengths, max(lengths), cfg.vocab_size, seed=seed)
    out = OracleLogits(ids, mask, pos, mask.astype(bool), forward(cfg, params, ids, mask, **kw),
                       torch_logits(ref, ids, mask, pos))
    err = rel_err(out.ours[out.real], out.theirs[out.real])
    assert err < rtol, err
    return out


def assert_greedy_matches_oracle(ref, model, params, lengths, new_tokens, rng):
    """Greedy generation from left-padded prompts (rows of `lengths` tokens drawn from `rng`): our tokens equal
    transformers' generate(), whose new tokens are not degenerate (more than 6 distinct)."""
    ids, mask = np.zeros((len(lengths), max(lengths)), np.int64), np.zeros((len(lengths), max(lengths)), np.int64)
    for r, n in enumerate(lengths):
        ids[r, -n:], mask[r, -n:] = rng.randint(3, model.cfg.vocab_size, n), 1
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0).numpy()
    ours = G.generate(model, params, ids, mask, max_new_tokens=new_tokens, stop_ids=())
    assert theirs.shape == ours.shape and len(set(theirs[:, -new_tokens:].ravel().tolist())) > 6  # not degenerate
    np.testing.assert_array_equal(ours, theirs)
