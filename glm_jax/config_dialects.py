"""config.json dialects: one reader and one writer per `model_type`, registered in `DIALECTS` (as levanter
registers a Hugging Face converter per model). A reader turns a config.json's contents into GLMConfig fields (a
key the file lacks takes the reference library's default, so that both build the same model from the same
file); a writer turns a GLMConfig into the config.json that library reads. A new family adds one entry.

    chatglm        THUDM's config.json of ChatGLM2/3 and GLM-4 (format "thudm")
    glm, glm4      transformers' GlmConfig / Glm4Config (glm4: the sandwich norms of GLM-4-0414)
    glm4_moe       GLM-4.5 / 4.5-Air / 4.6: the published layout (top-level rope_theta, partial_rotary_factor,
                   num_nextn_predict_layers) and transformers 5's (rope_parameters)
    glm4_moe_lite  GLM-4.7-Flash (MLA): both layouts, YaRN scaling, mlp_layer_types
    glm_moe_dsa    GLM-5 (MLA + DSA indexer): glm4_moe_lite's keys plus the indexer's
    glm5_next      GLM-5.3-Flash (KDA / MLA + pooled DSA, hyper-connections): the text fields nested under
                   text_config (a full checkpoint) or at the top level (a flat one); also glm5_next_text

docs/checkpoints.md, "config.json dialects", lists the keys.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: glm_jax/config.py imports this module
    from glm_jax.config import GLMConfig

log = logging.getLogger("glm_jax.config")


def _needer(raw: dict[str, Any], source: str, model_type: Any):
    """need(key): raw[key], or a KeyError naming the file, the key and the model_type that requires it."""

    def need(key):
        if key not in raw:
            raise KeyError(f"{source}: missing key {key!r} for model_type {model_type!r}")
        return raw[key]

    return need


def _yarn_scaling(ropes, source: str) -> dict[str, Any]:
    """The YaRN parameters among an MLA config.json's rope dicts (rope_parameters, rope_scaling), kept whole
    except the rope base / fraction (read on their own); {} = the default rope; any other rope type is an error."""
    yarn = {}
    for r in ropes:
        kind = r.get("rope_type", r.get("type", "default"))
        if kind == "yarn":
            yarn = {k: v for k, v in r.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
            yarn["rope_type"] = "yarn"
        elif kind != "default":
            raise ValueError(f"{source}: rope scaling {r} is not supported (the default rope or yarn)")
    return yarn


def _dense_layers(raw: dict[str, Any], layers: int, source: str) -> int:
    """How many leading dense-MLP layers a glm4_moe_lite / glm_moe_dsa config.json declares."""
    types = raw.get("mlp_layer_types")
    if not types:
        return int(raw.get("first_k_dense_replace", 1))
    # transformers 5 reads only mlp_layer_types; the published file's first_k_dense_replace says the same
    dense = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if len(types) != layers or any(t != "sparse" for t in types[dense:]):
        raise ValueError(f"{source}: mlp_layer_types must be 'dense' layers then 'sparse' ones, got {types}")
    return dense


# transformers' GlmMoeDsaConfig defaults (its docstring checkpoint is zai-org/GLM-5): what a glm_moe_dsa
# config.json that lacks a key means.
GLM_MOE_DSA_DEFAULTS = dict(vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78,
                            num_attention_heads=64, q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192,
                            qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=256, num_experts_per_tok=8,
                            n_shared_experts=1, moe_intermediate_size=2048, first_k_dense_replace=3,
                            routed_scaling_factor=2.5, max_position_embeddings=202752, index_topk=2048,
                            index_head_dim=128, index_n_heads=32)



# ---------------------------------------------------------------------------------------------- readers

def read_chatglm(raw: dict[str, Any], source: str, need) -> dict[str, Any]:
    """GLMConfig fields of THUDM's chatglm config.json: ChatGLM-6B (told apart by position_encoding_2d /
    inner_hidden_size), ChatGLM2/3, GLM-4."""
    if "position_encoding_2d" in raw or "inner_hidden_size" in raw:
        return read_chatglm_v1(raw, source, need)
    if raw.get("apply_residual_connection_post_layernorm") or raw.get("add_bias_linear"):
        raise ValueError(f"{source}: post-layernorm residuals / linear biases are not GLM v2 (ChatGLM-6B v1?)")
    if raw.get("rmsnorm") is False:
        raise ValueError(f"{source}: rmsnorm=false (LayerNorm) is the ChatGLM-6B v1 layout, not supported")
    heads = need("num_attention_heads")
    head_dim = raw.get("kv_channels") or need("hidden_size") // heads
    rope_ratio = float(raw.get("rope_ratio") or 1.0)
    # ChatGLM2-6B-32K's code divides positions by rope_ratio; ChatGLM3 / GLM-4 multiply the base.
    name = str(raw.get("_name_or_path", "")).lower()
    divides = "chatglm2" in name and rope_ratio != 1.0
    if divides:
        log.info("%s: chatglm2 checkpoint with rope_ratio=%s: positions are divided by it", source, rope_ratio)
    if raw.get("pre_seq_len") and raw.get("prefix_projection"):
        raise ValueError(f"{source}: prefix_projection=true (an MLP-reparametrised P-tuning prefix) is not "
                         "supported; only the plain prefix embedding is")
    return dict(
        pre_seq_len=int(raw.get("pre_seq_len") or 0),
        vocab_size=need("padded_vocab_size"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("ffn_hidden_size"),
        num_layers=need("num_layers"),
        num_heads=heads,
        num_kv_heads=raw.get("multi_query_group_num", heads) if raw.get("multi_query_attention") else heads,
        head_dim=head_dim,
        rope_theta=10000.0 if divides else 10000.0 * rope_ratio,
        rope_position_divisor=rope_ratio if divides else 1.0,
        norm_eps=raw.get("layernorm_epsilon", 1e-5),
        max_seq_len=raw.get("seq_length", 8192),
        qkv_bias=bool(raw.get("add_qkv_bias", True)),
        pad_token_id=raw.get("pad_token_id", 0),
        num_labels=raw.get("num_labels", 2),
    )


def read_chatglm_v1(raw: dict[str, Any], source: str, need) -> dict[str, Any]:
    """GLMConfig fields of ChatGLM-6B's config.json (docs/glm-objective.md): multi-head, 2D positions."""
    if raw.get("position_encoding_2d") is False:
        raise ValueError(f"{source}: position_encoding_2d=false (1D positions in the ChatGLM-6B layout) is not "
                         "supported")
    if raw.get("pre_seq_len") and raw.get("prefix_projection"):
        raise ValueError(f"{source}: prefix_projection=true (an MLP-reparametrised P-tuning prefix) is not "
                         "supported; only the plain prefix embedding is")
    heads, hidden = need("num_attention_heads"), need("hidden_size")
    return dict(
        vocab_size=need("vocab_size"), hidden_size=hidden, ffn_hidden_size=raw.get("inner_hidden_size") or 4 * hidden,
        num_layers=need("num_layers"), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        norm_eps=raw.get("layernorm_epsilon", 1e-5), max_seq_len=raw.get("max_sequence_length", 2048),
        qkv_bias=True, position_encoding_2d=True, mask_token_id=need("mask_token_id"),
        gmask_token_id=need("gmask_token_id"), bos_token_id=need("bos_token_id"),
        pad_token_id=raw.get("pad_token_id", 0), num_labels=raw.get("num_labels", 2),
        pre_seq_len=int(raw.get("pre_seq_len") or 0))


def _gqa_fields(raw: dict[str, Any], need) -> dict[str, Any]:
    """The grouped-query head keys of transformers' glm / glm4 / glm4_moe config.json: no num_key_value_heads means
    one key head per query head, no head_dim means hidden_size / heads."""
    heads = need("num_attention_heads")
    return dict(num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or need("hidden_size") // heads)


def read_glm(raw: dict[str, Any], source: str, need) -> dict[str, Any]:
    """GLMConfig fields of transformers' glm / glm4 config.json (glm4 adds the sandwich norms); the top-level
    rope_theta / partial_rotary_factor win over rope_parameters'."""
    rope = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    fraction = raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    if raw.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings=true is not a GLM layout")
    return dict(
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        **_gqa_fields(raw, need),
        rotary_fraction=float(fraction),
        rope_theta=float(theta),
        norm_eps=raw.get("rms_norm_eps", 1e-5),
        max_seq_len=raw.get("max_position_embeddings", 8192),
        qkv_bias=bool(raw.get("attention_bias", True)),
        sandwich_norm=raw.get("model_type") == "glm4",
        num_labels=raw.get("num_labels", len(raw.get("id2label") or {}) or 2),
    )


def read_glm4_moe(raw: dict[str, Any], source: str, need) -> dict[str, Any]:
    """GLMConfig fields of a glm4_moe config.json. A key it lacks takes transformers' Glm4MoeConfig default, so
    that both libraries build the same model from the same file. Two layouts: the published one (top-level
    rope_theta, partial_rotary_factor, rope_scaling, num_nextn_predict_layers) and the one transformers 5
    writes (rope_parameters; num_nextn_predict_layers is its name for num_mtp_layers)."""
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(f"{source}: rope scaling {rope or scaling} is not supported (only the default rope)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (glm4_moe uses silu)")
    if raw.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings=true is not a GLM layout")
    # transformers 5 reads rope_parameters when present (it folds the top-level keys into it otherwise)
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    fraction = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
    mtp = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 1))
    return dict(
        vocab_size=raw.get("vocab_size", 151552),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=raw.get("intermediate_size", 10944),
        num_layers=need("num_hidden_layers"),
        **_gqa_fields(raw, need),
        rotary_fraction=float(fraction),
        rope_theta=float(theta),
        rope_interleaved=False,
        norm_eps=raw.get("rms_norm_eps", 1e-5),
        max_seq_len=raw.get("max_position_embeddings", 131072),
        qkv_bias=bool(raw.get("attention_bias", False)),
        use_qk_norm=bool(raw.get("use_qk_norm", False)),
        n_routed_experts=int(raw.get("n_routed_experts", 128)),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 8)),
        n_shared_experts=int(raw.get("n_shared_experts") or 0) if "n_shared_experts" in raw else 1,
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 1408)),
        first_k_dense_replace=int(raw.get("first_k_dense_replace", 1)),
        n_group=int(raw.get("n_group") or 1),
        topk_group=int(raw.get("topk_group") or 1),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        num_mtp_layers=int(mtp or 0),
    )


def read_glm4_moe_lite(raw: dict[str, Any], source: str, need) -> dict[str, Any]:
    """GLMConfig fields of a glm4_moe_lite (GLM-4.7-Flash) config.json; a missing key takes transformers'
    Glm4MoeLiteConfig default. Both layouts: the published one (top-level rope_theta / partial_rotary_factor,
    first_k_dense_replace, num_nextn_predict_layers) and transformers 5's (rope_parameters, mlp_layer_types)."""
    rope = raw.get("rope_parameters") or {}
    yarn = _yarn_scaling((rope, raw.get("rope_scaling") or {}), source)
    if raw.get("hidden_act", "silu") != "silu" or raw.get("tie_word_embeddings"):
        raise ValueError(f"{source}: hidden_act must be silu and tie_word_embeddings false for glm4_moe_lite")
    heads = need("num_attention_heads")
    if raw.get("num_key_value_heads") not in (None, heads):  # transformers' MLA expands keys for every head
        raise ValueError(f"{source}: glm4_moe_lite needs num_key_value_heads == num_attention_heads")
    layers = need("num_hidden_layers")
    dense = _dense_layers(raw, layers, source)
    q_lora = raw.get("q_lora_rank", 768)
    return dict(
        vocab_size=raw.get("vocab_size", 154880),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=raw.get("intermediate_size", 10240),
        num_layers=layers,
        num_heads=heads,
        attention_type="mla",
        q_lora_rank=int(q_lora or 0),
        kv_lora_rank=int(raw.get("kv_lora_rank", 512)),
        qk_nope_head_dim=int(raw.get("qk_nope_head_dim", 192)),
        qk_rope_head_dim=int(raw.get("qk_rope_head_dim", 64)),
        v_head_dim=int(raw.get("v_head_dim", 256)),
        rotary_fraction=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rope_interleaved=bool(raw.get("rope_interleave", True)),
        rope_scaling=tuple(sorted(yarn.items())),
        norm_eps=raw.get("rms_norm_eps", 1e-5),
        max_seq_len=raw.get("max_position_embeddings", 202752),
        qkv_bias=bool(raw.get("attention_bias", False)),
        n_routed_experts=int(raw.get("n_routed_experts", 64)),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 4)),
        n_shared_experts=int(raw.get("n_shared_experts", 1) or 0),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 1536)),
        first_k_dense_replace=dense,
        n_group=int(raw.get("n_group") or 1),
        topk_group=int(raw.get("topk_group") or 1),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.8)),
        num_mtp_layers=int(raw.get("num_nextn_predict_layers") or 0),
    )


def read_glm_moe_dsa(raw: dict[str, Any], source: str, need=None) -> dict[str, Any]:
    """GLMConfig fields of a glm_moe_dsa (GLM-5) config.json: glm4_moe_lite's keys (MLA + MoE, both layouts)
    with GlmMoeDsaConfig's defaults, plus the indexer. Which layers run their own indexer follows transformers:
    indexer_types, else index_topk_pattern ("F" / "S" per layer), else index_topk_freq /
    index_skip_topk_offset (absent: every layer). `need` is unused: the defaults fill the missing keys."""
    raw = {**GLM_MOE_DSA_DEFAULTS, **raw}
    kw = read_glm4_moe_lite(raw, source, _needer(raw, source, "glm_moe_dsa"))
    types = raw.get("indexer_types")
    if types is None and raw.get("index_topk_pattern") is not None:
        pattern = raw["index_topk_pattern"]
        types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    elif types is None:
        freq, offset = max(int(raw.get("index_topk_freq", 1)), 1), int(raw.get("index_skip_topk_offset", 2))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(kw["num_layers"])]
    # glm_moe_dsa always rotates in interleaved pairs over the whole rope head (no partial_rotary_factor)
    kw.update(rope_interleaved=True, rotary_fraction=1.0, index_topk=int(raw["index_topk"]),
              index_n_heads=int(raw["index_n_heads"]), index_head_dim=int(raw["index_head_dim"]),
              indexer_types=tuple(types))
    return kw


# transformers' Glm5NextTextConfig defaults (its docstring checkpoint is zai-org/GLM-5.3-Flash): what a glm5_next
# config.json that lacks a key means.
GLM5_NEXT_DEFAULTS = dict(vocab_size=154880, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=2048,
                          num_hidden_layers=45, num_attention_heads=64, n_shared_experts=1, n_routed_experts=288,
                          routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=0,
                          v_head_dim=256, qk_nope_head_dim=256, num_experts_per_tok=8, max_position_embeddings=1048576,
                          index_topk=2048, index_head_dim=128, index_n_heads=32, index_kpool=16,
                          index_kpool_always_select_tail=True, swiglu_limit=10.0, linear_head_dim=128,
                          linear_num_heads=64, linear_conv_kernel_dim=4, linear_lower_bound=-5.0, hc_mult=4,
                          hc_eps=1e-6, hc_sinkhorn_iters=20)
# layer_types spellings of an MLA + DSA layer (transformers maps full_attention; released files say
# deepseek_sparse_attention)
INDEXED_LAYER_NAMES = ("indexed_attention", "full_attention", "deepseek_sparse_attention")


def read_glm5_next(raw: dict[str, Any], source: str, need=None) -> dict[str, Any]:
    """GLMConfig fields of a glm5_next / glm5_next_text config.json (GLM-5.3-Flash): the text config (nested under
    text_config, or the file itself) with Glm5NextTextConfig's defaults. layer_types, else linear_attn_config's
    kda_layers (0-based), else transformers' default (every 4th layer, from layer 3, is MLA). The checkpoint's MTP
    layer is not loaded (num_mtp_layers 0: glm5_next's MTP is not implemented)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    linear = text.get("linear_attn_config") or {}
    text = {**GLM5_NEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k == "linear_lower_bound"}}
    layers = int(text["num_hidden_layers"])
    types = text.get("layer_types")
    if types is None and linear.get("kda_layers") is not None:
        kda = set(linear["kda_layers"])
        types = ["linear_attention" if i in kda else "indexed_attention" for i in range(layers)]
    elif types is None:
        types = ["linear_attention" if i % 4 != 3 else "indexed_attention" for i in range(layers)]
    unknown = set(types) - {"linear_attention", *INDEXED_LAYER_NAMES}
    if unknown:
        raise ValueError(f"{source}: layer_types {sorted(unknown)} unknown (expected linear_attention or "
                         f"{' / '.join(INDEXED_LAYER_NAMES)})")
    dsa = {**text, "model_type": "glm_moe_dsa", "num_nextn_predict_layers": 0, "rope_interleave": True}
    if "mlp_layer_types" not in text and "first_k_dense_replace" not in text:  # transformers' default
        dsa["mlp_layer_types"] = ["dense"] * min(3, layers) + ["sparse"] * (layers - 3)
    kw = read_glm_moe_dsa(dsa, source)
    lower = linear.get("gate_lower_bound", text["linear_lower_bound"])
    if lower is None and linear.get("safe_gate", True) and linear:
        lower = -5.0  # transformers: a linear_attn_config with safe_gate and no bound means -5
    kw.update(
        layer_types=tuple("linear_attention" if t == "linear_attention" else "indexed_attention" for t in types),
        linear_num_heads=int(linear.get("num_heads", text["linear_num_heads"])),
        linear_head_dim=int(linear.get("head_dim", text["linear_head_dim"])),
        linear_conv_kernel=int(linear.get("short_conv_kernel_size", text["linear_conv_kernel_dim"])),
        linear_lower_bound=None if lower is None else float(lower),
        hc_mult=int(text["hc_mult"]), hc_eps=float(text["hc_eps"]), hc_sinkhorn_iters=int(text["hc_sinkhorn_iters"]),
        index_kpool=int(text["index_kpool"]), index_kpool_tail=bool(text["index_kpool_always_select_tail"]),
        swiglu_limit=float(text["swiglu_limit"] or 0.0),
        pad_token_id=text.get("pad_token_id", 154820),
    )
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={text['hidden_act']!r} is not supported (glm5_next uses silu)")
    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    if eos is not None:
        kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    dtype = {"float16": "float16", "bfloat16": "bfloat16"}.get(text.get("torch_dtype") or text.get("dtype")
                                                               or raw.get("torch_dtype") or raw.get("dtype"))
    if dtype:
        kw.update(dtype=dtype, param_dtype=dtype)
    return kw


# ---------------------------------------------------------------------------------------------- writers

def write_chatglm(cfg) -> dict[str, Any]:
    """config.json of THUDM's chatglm (ChatGLM-6B, dense GLM v2 models)."""
    if cfg.position_encoding_2d:
        return write_chatglm_v1(cfg)
    if cfg.is_moe or cfg.use_qk_norm or not cfg.rope_interleaved:
        raise ValueError("the THUDM chatglm format holds dense GLM v2 models only; save glm4_moe models as "
                         "format='transformers'")
    if cfg.sandwich_norm:
        raise ValueError("the THUDM chatglm format has no sandwich norms; save glm4 models as format='transformers'")
    if cfg.rotary_fraction != 0.5:
        raise ValueError("the THUDM chatglm format fixes rotary_fraction at 0.5")
    divides = cfg.rope_position_divisor != 1.0
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        # chatglm2 in the name selects the position-dividing rope_ratio meaning on reload.
        "_name_or_path": "chatglm2-6b-32k" if divides else (cfg.name or "glm_jax"),
        "add_bias_linear": False,
        "add_qkv_bias": cfg.qkv_bias,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": cfg.hidden_size,
        "kv_channels": cfg.head_dim,
        "layernorm_epsilon": cfg.norm_eps,
        "multi_query_attention": cfg.num_kv_heads != cfg.num_heads,
        "multi_query_group_num": cfg.num_kv_heads,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "original_rope": True,
        "padded_vocab_size": cfg.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": cfg.rope_position_divisor if divides else cfg.rope_theta / 10000.0,
        "pre_seq_len": cfg.pre_seq_len or None,
        "prefix_projection": False,
        "seq_length": cfg.max_seq_len,
        "use_cache": True,
        "torch_dtype": cfg.param_dtype,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0],
        "tie_word_embeddings": False,
    }


def write_chatglm_v1(cfg) -> dict[str, Any]:
    """config.json of ChatGLM-6B (THUDM's keys)."""
    return {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "_name_or_path": cfg.name or "glm_jax",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "inner_hidden_size": cfg.ffn_hidden_size,
        "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "layernorm_epsilon": cfg.norm_eps,
        "max_sequence_length": cfg.max_seq_len, "position_encoding_2d": True, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0], "mask_token_id": cfg.mask_token_id,
        "gmask_token_id": cfg.gmask_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": cfg.param_dtype,
        "pre_seq_len": cfg.pre_seq_len or None, "prefix_projection": False,
    }


def write_glm(cfg) -> dict[str, Any]:
    """config.json of transformers' glm, or glm4 (sandwich norms)."""
    if cfg.use_qk_norm or not cfg.rope_interleaved:
        raise ValueError("transformers' glm / glm4 have no qk norm and GLM's interleaved rotary only")
    if cfg.rope_position_divisor != 1.0:
        raise ValueError("transformers' glm has no position-dividing rope (ChatGLM2-32K); save as format='thudm'")
    if cfg.pre_seq_len:
        raise ValueError("transformers' glm has no P-tuning prefix; save as format='thudm'")
    glm4 = cfg.sandwich_norm
    return {
        **_base_json(cfg, "glm4" if glm4 else "glm", "Glm4ForCausalLM" if glm4 else "GlmForCausalLM",
                     _gqa_json(cfg)),
        "tie_word_embeddings": False,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "num_labels": cfg.num_labels,
        "torch_dtype": cfg.param_dtype,
    }


def _base_json(cfg, model_type: str, architecture: str, attention: dict[str, Any],
                  rope_scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keys that transformers' glm, glm4, glm4_moe and glm4_moe_lite config.json files share, in their
    order; `attention` = the attention keys after num_attention_heads, `rope_scaling` = extra rope_parameters.
    rope_parameters is what transformers 5 reads; the top-level rope_theta / partial_rotary_factor keep the
    published layout for older readers."""
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        **attention,
        "hidden_act": "silu",
        "partial_rotary_factor": cfg.rotary_fraction,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": cfg.rotary_fraction, **(rope_scaling or {})},
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
    }


def _gqa_json(cfg) -> dict[str, Any]:
    """The attention keys of a grouped-query config.json (glm, glm4, glm4_moe)."""
    return {"num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}


def _mla_json(cfg) -> dict[str, Any]:
    """The attention keys of an MLA config.json (glm4_moe_lite, glm_moe_dsa): every head has its own keys."""
    return {
        "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_interleave": cfg.rope_interleaved,
    }


def _moe_json(cfg) -> dict[str, Any]:
    """The MoE, MTP and token keys every MoE config.json (glm4_moe, glm4_moe_lite, glm_moe_dsa) writes alike."""
    return {
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "first_k_dense_replace": cfg.num_dense_layers,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_nextn_predict_layers": cfg.num_mtp_layers,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "torch_dtype": cfg.param_dtype,
    }


def write_glm4_moe(cfg) -> dict[str, Any]:
    """config.json of transformers' glm4_moe: the shared keys (both rope layouts), qk norm, the MoE keys."""
    if cfg.rope_position_divisor != 1.0 or cfg.rope_interleaved:
        raise ValueError("glm4_moe uses the split-half (NeoX) rotary without position division")
    return {
        **_base_json(cfg, "glm4_moe", "Glm4MoeForCausalLM", _gqa_json(cfg)),
        "use_qk_norm": cfg.use_qk_norm,
        **_moe_json(cfg),
    }


def write_glm4_moe_lite(cfg) -> dict[str, Any]:
    """config.json of transformers' glm4_moe_lite: transformers 5's keys (rope_parameters with any YaRN
    scaling, mlp_layer_types) plus the published file's (rope_theta, partial_rotary_factor,
    first_k_dense_replace, num_nextn_predict_layers)."""
    if cfg.rope_position_divisor != 1.0:
        raise ValueError("glm4_moe_lite has no position-dividing rope")
    dense = cfg.num_dense_layers
    return {
        **_base_json(cfg, "glm4_moe_lite", "Glm4MoeLiteForCausalLM", _mla_json(cfg), cfg.rope_scaling_params),
        "mlp_layer_types": ["dense"] * dense + ["sparse"] * (cfg.num_layers - dense),
        **_moe_json(cfg),
    }


def write_glm_moe_dsa(cfg) -> dict[str, Any]:
    """config.json of transformers' glm_moe_dsa: glm4_moe_lite's keys (both layouts) plus the indexer's."""
    d = write_glm4_moe_lite(cfg)
    d.pop("partial_rotary_factor")
    d.update(model_type="glm_moe_dsa", architectures=["GlmMoeDsaForCausalLM"],
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, **cfg.rope_scaling_params},
             index_topk=cfg.index_topk, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
             indexer_types=list(cfg.indexer_types or ["full"] * cfg.num_layers), indexer_rope_interleave=True)
    return d


def write_glm5_next(cfg) -> dict[str, Any]:
    """config.json of transformers' glm5_next as Glm5NextForConditionalGeneration saves it: the text fields under
    text_config (model_type glm5_next_text). No vision_config: glm_jax holds the text model only (transformers
    then builds its default vision tower, which this checkpoint does not fill)."""
    d = write_glm_moe_dsa(cfg)
    for key in ("architectures", "rope_parameters", "rope_theta", "rope_interleave", "indexer_rope_interleave",
                "num_nextn_predict_layers", "first_k_dense_replace"):
        d.pop(key, None)
    d.update(model_type="glm5_next_text", qk_rope_head_dim=0, layer_types=list(cfg.layer_types),
             linear_num_heads=cfg.linear_num_heads, linear_head_dim=cfg.linear_head_dim,
             linear_conv_kernel_dim=cfg.linear_conv_kernel, linear_lower_bound=cfg.linear_lower_bound,
             hc_mult=cfg.hc_mult, hc_eps=cfg.hc_eps, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
             index_kpool=cfg.index_kpool, index_kpool_always_select_tail=cfg.index_kpool_tail,
             swiglu_limit=cfg.swiglu_limit)
    return {"model_type": "glm5_next", "architectures": ["Glm5NextForConditionalGeneration"], "text_config": d,
            "tie_word_embeddings": False, "torch_dtype": cfg.param_dtype}


# ---------------------------------------------------------------------------------------------- the registry

@dataclasses.dataclass(frozen=True)
class Dialect:
    """How one config.json model_type maps onto GLMConfig."""
    read: Callable[[dict[str, Any], str, Callable[[str], Any]], dict[str, Any]]  # (raw, source, need) -> fields
    write: Callable[["GLMConfig"], dict[str, Any]]  # GLMConfig -> config.json contents


DIALECTS: dict[str, Dialect] = {
    "chatglm": Dialect(read_chatglm, write_chatglm),
    "glm": Dialect(read_glm, write_glm),
    "glm4": Dialect(read_glm, write_glm),
    "glm4_moe": Dialect(read_glm4_moe, write_glm4_moe),
    "glm4_moe_lite": Dialect(read_glm4_moe_lite, write_glm4_moe_lite),
    "glm_moe_dsa": Dialect(read_glm_moe_dsa, write_glm_moe_dsa),
    "glm5_next": Dialect(read_glm5_next, write_glm5_next),
    "glm5_next_text": Dialect(read_glm5_next, write_glm5_next),
}


def read_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """GLMConfig fields of a config.json's contents, by its model_type's reader; `source` names the file in
    errors. The token ids and dtype read the same in every dialect; a reader may replace them (chatglm's pad)."""
    model_type = raw.get("model_type")
    dialect = DIALECTS.get(model_type) if isinstance(model_type, str) else None
    if dialect is None:
        raise ValueError(f"{source}: unknown model_type {model_type!r} (expected one of {', '.join(DIALECTS)})")
    eos = raw.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else (2,))
    dtype = {"float16": "float16", "bfloat16": "bfloat16"}.get(raw.get("torch_dtype") or raw.get("dtype"), "float32")
    fields = dict(pad_token_id=raw.get("pad_token_id"), eos_token_ids=eos, dtype=dtype, param_dtype=dtype)
    fields.update(dialect.read(raw, source, _needer(raw, source, model_type)))
    return fields


def write_json(cfg: "GLMConfig", format: str = "transformers") -> dict[str, Any]:
    """config.json contents of `cfg` for `format` "thudm" (chatglm) or "transformers" (cfg.model_type's)."""
    if format == "thudm":
        return write_chatglm(cfg)
    if format != "transformers":
        raise ValueError(f"unknown checkpoint format {format!r} (expected 'thudm' or 'transformers')")
    return DIALECTS[cfg.model_type].write(cfg)
