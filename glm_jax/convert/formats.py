"""Name and layout maps between our parameter tree and the two checkpoint formats.

Each `Entry` ties one of our parameters to one PyTorch tensor (per layer for stacked block parameters):
  kind "copy"    same layout (embeddings, norm scales)
  kind "linear"  torch [out, in] -> our kernel = W.T reshaped; `n_in` leading kernel dims are inputs
  kind "bias"    torch [out] -> our bias reshaped
  kind "prefix"  THUDM's P-tuning v2 prefix embedding [pre_seq_len, L*2*groups*hd] -> [L, 2, pre_seq_len, G, D]
  kind "stacked_linear"  torch [E, out, in] (all experts in one tensor) -> our [E, in..., out...]
`rows` selects a row block of a fused torch tensor (THUDM's query_key_value); `part` = (axis, index) selects the
slice of our array that one torch tensor fills (glm4_moe's separate gate_proj / up_proj -> our fused [.., 2, ..]);
`experts` = the torch name holds {e}: one tensor per routed expert, stacked on our (per-layer) axis 0.
Block parameters of stack model/<stack> (see glm_jax.model.glm.layer_stacks; model/mtp for the MTP layers) are
torch layer `offset` + their index in the stack.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glm_jax.config import GLMConfig
from glm_jax.model.glm import layer_stacks


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # our parameter path
    torch_name: str  # may contain {i} for the layer index
    kind: str = "copy"
    n_in: int = 1
    rows: tuple[int, int] | None = None
    part: tuple[int, int] | None = None  # (axis, index) of our per-layer (per-expert) array this tensor fills
    experts: bool = False  # torch_name has {e}: one torch tensor per routed expert
    offset: int = 0  # torch layer index of the stack's first block
    stride: int = 1  # torch layers between consecutive slices of the stack (glm5_next's repeating units)
    dtype: str | None = None  # kept and written in this dtype whatever the model's (the fp32 router bias)
    # torch layers that lack this tensor (the indexer of glm_moe_dsa's "shared" layers): our slice is zeros on load
    # and is not written on save
    absent: frozenset[int] = frozenset()
    # > 0: the fused tensor's rows are grouped per head ([heads, 3, head_dim], ChatGLM-6B's query_key_value);
    # `rows` then index the [3, heads, head_dim] order (`head_major_rows`)
    heads: int = 0

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch_name

    def torch_layer(self, j: int) -> int:
        """The torch layer index of slice j of our stack."""
        return self.offset + j * self.stride

    def index(self, e: int | None) -> tuple:
        """Index of the piece of our per-layer array that the torch tensor of expert `e` (None: the only one) fills."""
        index = (e,) if self.experts else ()
        if self.part is not None:
            axis, k = self.part
            index += (slice(None),) * axis + (k,)
        return index

    def pieces(self, shape: tuple[int, ...]):
        """(expert, index, piece shape) of each piece of our per-layer array of `shape` that one torch tensor
        fills: the whole array, one expert's slice, and/or one `part`."""
        for e in range(shape[0]) if self.experts else [None]:
            sub = shape[1:] if self.experts else shape
            if self.part is not None:
                sub = sub[:self.part[0]] + sub[self.part[0] + 1:]
            yield e, self.index(e), tuple(sub)

    def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One torch tensor (one layer's) -> our layout of `shape` (without the layer axis)."""
        if self.heads:
            w = head_major_rows(w, self.heads)
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        if self.kind == "linear":
            w = w.T
        if self.kind == "stacked_linear":
            w = w.transpose(0, 2, 1)
        if self.kind == "conv":  # torch Conv1d depthwise [C, 1, K] -> [K, ...]
            return w.reshape(w.shape[0], -1).T.reshape(shape)
        if self.kind == "prefix":  # [P, L*2*G*D] -> [L, 2, P, G, D] (THUDM: view(P, L*2, G, D), layer i = rows 2i, 2i+1)
            l, two, p, g, d = shape
            return w.reshape(p, l, two, g, d).transpose(1, 2, 0, 3, 4)
        return w.reshape(shape)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return x.reshape(x.shape[0], -1).T[:, None, :]
        if self.kind == "linear":
            n_in = math.prod(x.shape[: self.n_in])
            return x.reshape(n_in, -1).T
        if self.kind == "bias":
            return x.reshape(-1)
        if self.kind == "prefix":
            return x.transpose(2, 0, 1, 3, 4).reshape(x.shape[2], -1)
        if self.kind == "stacked_linear":
            n_in = math.prod(x.shape[1:1 + self.n_in])
            return x.reshape(x.shape[0], n_in, -1).transpose(0, 2, 1)
        return x

    def torch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Expected torch shape (of the row block, if any) for our per-layer `shape`."""
        if self.kind == "conv":
            return (math.prod(shape[1:]), 1, shape[0])
        if self.kind == "linear":
            return (math.prod(shape[self.n_in:]), math.prod(shape[: self.n_in]))
        if self.kind == "bias":
            return (math.prod(shape),)
        if self.kind == "prefix":
            return (shape[2], math.prod(shape) // shape[2])
        if self.kind == "stacked_linear":
            return (shape[0], math.prod(shape[1 + self.n_in:]), math.prod(shape[1:1 + self.n_in]))
        return tuple(shape)


def head_major_rows(w: np.ndarray, heads: int, inverse: bool = False) -> np.ndarray:
    """Rows [heads, 3, d] (ChatGLM-6B's fused query_key_value) <-> [3, heads, d] (q rows, then k, then v)."""
    rest = w.shape[1:]
    if inverse:
        return w.reshape(3, heads, -1, *rest).swapaxes(0, 1).reshape(w.shape)
    return w.reshape(heads, 3, -1, *rest).swapaxes(0, 1).reshape(w.shape)


QUANTIZABLE = ("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h")  # (self_)attention.dense
# ChatGLM-6B's int4 "qe" checkpoints (config quantization_embeddings: true) quantize the embedding rows and the
# head the same way, per row (THUDM chatglm-6b-int4-qe quantization.py: QuantizedEmbedding; the head a
# QuantizedLinear over the same tensor)
QUANTIZED_EMBEDDINGS = ("transformer.word_embeddings.weight", "lm_head.weight")


def is_quantized(name: str, embeddings: bool = False) -> bool:
    """Whether THUDM's int8/int4 checkpoints store tensor `name` quantized (with `name`_scale)."""
    return (name.endswith(".weight") and any(q in name for q in QUANTIZABLE)) or (
        embeddings and name in QUANTIZED_EMBEDDINGS)


def thudm_entries(cfg: GLMConfig) -> list[Entry]:
    if cfg.position_encoding_2d:
        return chatglm_v1_entries(cfg)
    if cfg.sandwich_norm:
        raise ValueError("the THUDM chatglm format has no sandwich norms (glm4); use the transformers format")
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    blocks = {"query": (0, q), "key": (q, q + kv), "value": (q + kv, q + 2 * kv)}
    layer = "transformer.encoder.layers.{i}."
    e = [
        Entry(("model", "embed", "embedding"), "transformer.embedding.word_embeddings.weight"),
        Entry(("model", "layers", "input_norm", "scale"), layer + "input_layernorm.weight"),
    ]
    for name, rows in blocks.items():
        e.append(Entry(("model", "layers", "attention", name, "kernel"),
                       layer + "self_attention.query_key_value.weight", "linear", 1, rows))
        if cfg.qkv_bias:
            e.append(Entry(("model", "layers", "attention", name, "bias"),
                           layer + "self_attention.query_key_value.bias", "bias", rows=rows))
    e += [
        Entry(("model", "layers", "attention", "out", "kernel"), layer + "self_attention.dense.weight", "linear", 2),
        Entry(("model", "layers", "post_attention_norm", "scale"), layer + "post_attention_layernorm.weight"),
        Entry(("model", "layers", "mlp", "wi", "kernel"), layer + "mlp.dense_h_to_4h.weight", "linear"),
        Entry(("model", "layers", "mlp", "wo", "kernel"), layer + "mlp.dense_4h_to_h.weight", "linear"),
        Entry(("model", "final_norm", "scale"), "transformer.encoder.final_layernorm.weight"),
        Entry(("lm_head", "kernel"), "transformer.output_layer.weight", "linear"),
    ]
    if cfg.pre_seq_len:
        e.append(Entry(("model", "prefix"), "transformer.prefix_encoder.embedding.weight", "prefix"))
    return e


def chatglm_v1_entries(cfg: GLMConfig) -> list[Entry]:
    """ChatGLM-6B's names (transformer.*): LayerNorms with biases, the per-head fused query_key_value, biased
    output and MLP projections, a separate lm_head."""
    d = cfg.num_heads * cfg.head_dim
    layer = "transformer.layers.{i}."
    e = [Entry(("model", "embed", "embedding"), "transformer.word_embeddings.weight")]
    for ours, theirs in (("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm")):
        e += [Entry(("model", "layers", ours, "scale"), layer + theirs + ".weight"),
              Entry(("model", "layers", ours, "bias"), layer + theirs + ".bias")]
    for k, name in enumerate(("query", "key", "value")):
        rows = (k * d, (k + 1) * d)
        e += [Entry(("model", "layers", "attention", name, "kernel"), layer + "attention.query_key_value.weight",
                    "linear", 1, rows, heads=cfg.num_heads),
              Entry(("model", "layers", "attention", name, "bias"), layer + "attention.query_key_value.bias", "bias",
                    rows=rows, heads=cfg.num_heads)]
    e += [
        Entry(("model", "layers", "attention", "out", "kernel"), layer + "attention.dense.weight", "linear", 2),
        Entry(("model", "layers", "attention", "out", "bias"), layer + "attention.dense.bias", "bias"),
        Entry(("model", "layers", "mlp", "wi", "kernel"), layer + "mlp.dense_h_to_4h.weight", "linear"),
        Entry(("model", "layers", "mlp", "wi", "bias"), layer + "mlp.dense_h_to_4h.bias", "bias"),
        Entry(("model", "layers", "mlp", "wo", "kernel"), layer + "mlp.dense_4h_to_h.weight", "linear"),
        Entry(("model", "layers", "mlp", "wo", "bias"), layer + "mlp.dense_4h_to_h.bias", "bias"),
        Entry(("model", "final_norm", "scale"), "transformer.final_layernorm.weight"),
        Entry(("model", "final_norm", "bias"), "transformer.final_layernorm.bias"),
        Entry(("lm_head", "kernel"), "lm_head.weight", "linear"),
    ]
    if cfg.pre_seq_len:  # THUDM's PrefixEncoder: [P, L*2*hidden], viewed (P, L*2, heads, head_dim) as ChatGLM2's
        e.append(Entry(("model", "prefix"), "transformer.prefix_encoder.embedding.weight", "prefix"))
    return e


def transformers_entries(cfg: GLMConfig) -> list[Entry]:
    if cfg.is_glm5_next:
        return glm5_next_entries(cfg)
    if cfg.is_moe:
        return glm4_moe_entries(cfg)
    layer = "model.layers.{i}."
    e = [
        Entry(("model", "embed", "embedding"), "model.embed_tokens.weight"),
        Entry(("model", "layers", "input_norm", "scale"), layer + "input_layernorm.weight"),
    ]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        e.append(Entry(("model", "layers", "attention", ours, "kernel"), layer + f"self_attn.{theirs}.weight", "linear"))
        if cfg.qkv_bias:
            e.append(Entry(("model", "layers", "attention", ours, "bias"), layer + f"self_attn.{theirs}.bias", "bias"))
    e += [
        Entry(("model", "layers", "attention", "out", "kernel"), layer + "self_attn.o_proj.weight", "linear", 2),
        Entry(("model", "layers", "post_attention_norm", "scale"), layer + "post_attention_layernorm.weight"),
        Entry(("model", "layers", "mlp", "wi", "kernel"), layer + "mlp.gate_up_proj.weight", "linear"),
        Entry(("model", "layers", "mlp", "wo", "kernel"), layer + "mlp.down_proj.weight", "linear"),
        Entry(("model", "final_norm", "scale"), "model.norm.weight"),
        Entry(("lm_head", "kernel"), "lm_head.weight", "linear"),
        Entry(("score", "kernel"), "score.weight", "linear"),
    ]
    if cfg.sandwich_norm:
        e += [
            Entry(("model", "layers", "post_self_attn_norm", "scale"), layer + "post_self_attn_layernorm.weight"),
            Entry(("model", "layers", "post_mlp_norm", "scale"), layer + "post_mlp_layernorm.weight"),
        ]
    return e


def _glm4_moe_block(cfg: GLMConfig, path: tuple[str, ...], moe: bool, offset: int,
                    layer: str = "model.layers.{i}.") -> list[Entry]:
    """One stack of glm4_moe decoder blocks at our `path` (model/layers, model/moe_layers, model/mtp/block);
    `layer` = the torch name prefix of a layer's tensors."""
    e = [Entry(path + ("input_norm", "scale"), layer + "input_layernorm.weight", offset=offset)]
    if cfg.is_mla:
        e += _mla_entries(cfg, path + ("attention",), offset, layer)
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")) if not cfg.is_mla else ():
        e.append(Entry(path + ("attention", ours, "kernel"), layer + f"self_attn.{theirs}_proj.weight", "linear",
                       offset=offset))
        if cfg.qkv_bias:
            e.append(Entry(path + ("attention", ours, "bias"), layer + f"self_attn.{theirs}_proj.bias", "bias",
                           offset=offset))
    if cfg.use_qk_norm:
        e += [Entry(path + ("attention", "query_norm", "scale"), layer + "self_attn.q_norm.weight", offset=offset),
              Entry(path + ("attention", "key_norm", "scale"), layer + "self_attn.k_norm.weight", offset=offset)]
    if not cfg.is_mla:
        e.append(Entry(path + ("attention", "out", "kernel"), layer + "self_attn.o_proj.weight", "linear", 2,
                       offset=offset))
    e.append(Entry(path + ("post_attention_norm", "scale"), layer + "post_attention_layernorm.weight", offset=offset))
    mlp = path + ("mlp",)
    if not moe:
        return e + [Entry(p + ("kernel",), n, k, part=part, offset=offset)
                    for p, n, k, part in ((mlp + ("wi",), layer + "mlp.gate_proj.weight", "linear", (1, 0)),
                                          (mlp + ("wi",), layer + "mlp.up_proj.weight", "linear", (1, 1)),
                                          (mlp + ("wo",), layer + "mlp.down_proj.weight", "linear", None))]
    e += [Entry(mlp + ("router", "kernel"), layer + "mlp.gate.weight", "linear", offset=offset),
          Entry(mlp + ("router", "e_score_correction_bias"), layer + "mlp.gate.e_score_correction_bias",
                offset=offset, dtype="float32")]
    expert = layer + "mlp.experts.{e}."
    e += [Entry(mlp + ("experts", "wi"), expert + "gate_proj.weight", "linear", part=(1, 0), experts=True,
                offset=offset),
          Entry(mlp + ("experts", "wi"), expert + "up_proj.weight", "linear", part=(1, 1), experts=True,
                offset=offset),
          Entry(mlp + ("experts", "wo"), expert + "down_proj.weight", "linear", experts=True, offset=offset)]
    if cfg.n_shared_experts:
        shared = layer + "mlp.shared_experts."
        e += [Entry(mlp + ("shared_experts", "wi", "kernel"), shared + "gate_proj.weight", "linear", part=(1, 0),
                    offset=offset),
              Entry(mlp + ("shared_experts", "wi", "kernel"), shared + "up_proj.weight", "linear", part=(1, 1),
                    offset=offset),
              Entry(mlp + ("shared_experts", "wo", "kernel"), shared + "down_proj.weight", "linear", offset=offset)]
    return e


def _mla_entries(cfg: GLMConfig, attn: tuple[str, ...], offset: int, layer: str = "model.layers.{i}.") -> list[Entry]:
    """glm4_moe_lite's attention (glm_jax/model/layers/mla.py) at our `attn` path: transformers'
    Glm4MoeLiteAttention names. kv_a_proj_with_mqa [kv_lora + rope, H] keeps its fused rows (latent, then the
    rotary key), kv_b_proj [N * (nope + v), kv_lora] its per-head interleaving (keys then values of head 0, ...)."""
    sa = layer + "self_attn."
    linears = [("kv_a", "kv_a_proj_with_mqa", 1, cfg.qkv_bias), ("kv_b", "kv_b_proj", 1, False),
               ("out", "o_proj", 2, cfg.qkv_bias)]
    if cfg.q_lora_rank:
        linears += [("q_a", "q_a_proj", 1, cfg.qkv_bias), ("q_b", "q_b_proj", 1, False)]
    else:
        linears.append(("query", "q_proj", 1, False))
    e = []
    for ours, theirs, n_in, bias in linears:
        e.append(Entry(attn + (ours, "kernel"), sa + theirs + ".weight", "linear", n_in, offset=offset))
        if bias:
            e.append(Entry(attn + (ours, "bias"), sa + theirs + ".bias", "bias", offset=offset))
    norms = [("kv_a_norm", "kv_a_layernorm")] + ([("q_a_norm", "q_a_layernorm")] if cfg.q_lora_rank else [])
    if cfg.is_dsa:  # glm_moe_dsa's indexer (glm_jax/model/layers/dsa.py, docs/dsa.md); "shared" layers have none
        ix, ixs = attn + ("indexer",), sa + "indexer."
        no = frozenset(i for i, t in enumerate(cfg.indexer_types) if t == "shared")
        e += [Entry(ix + (ours, "kernel"), ixs + ours + ".weight", "linear", offset=offset, absent=no)
              for ours in ("wq_b", "wk", "weights_proj")]
        e += [Entry(ix + ("k_norm", "scale"), ixs + "k_norm.weight", offset=offset, absent=no),
              Entry(ix + ("k_norm", "bias"), ixs + "k_norm.bias", offset=offset, absent=no)]
        if cfg.index_kpool > 1:  # glm5_next's pooled indexer (layers/dsa.py `pool_keys`)
            e += [Entry(ix + ("compress_gate", "kernel"), ixs + "index_kpool_compress_gate", "linear", offset=offset,
                        absent=no),
                  Entry(ix + ("compress_ape",), ixs + "index_kpool_compress_ape", offset=offset, absent=no)]
    return e + [Entry(attn + (ours, "scale"), sa + theirs + ".weight", offset=offset) for ours, theirs in norms]


def glm4_moe_entries(cfg: GLMConfig) -> list[Entry]:
    """transformers' glm4_moe as published and as transformers 5 saves it: per-expert tensors
    (mlp.experts.N.{gate,up,down}_proj), separate gate / up projections, the router's gate.weight and fp32
    gate.e_score_correction_bias; MTP layers at model.layers.{num_layers + j} (enorm, hnorm, eh_proj,
    shared_head.norm and a MoE block; their embed_tokens / shared_head.head are the model's, see MTP_SHARED)."""
    e = [Entry(("model", "embed", "embedding"), "model.embed_tokens.weight")]
    for name, moe, first, _ in layer_stacks(cfg):
        e += _glm4_moe_block(cfg, ("model", name), moe, first)
    if cfg.num_mtp_layers:
        layer, mtp, off = "model.layers.{i}.", ("model", "mtp"), cfg.num_layers
        e += [Entry(mtp + ("enorm", "scale"), layer + "enorm.weight", offset=off),
              Entry(mtp + ("hnorm", "scale"), layer + "hnorm.weight", offset=off),
              Entry(mtp + ("eh_proj", "kernel"), layer + "eh_proj.weight", "linear", 2, offset=off),
              Entry(mtp + ("shared_head_norm", "scale"), layer + "shared_head.norm.weight", offset=off)]
        e += _glm4_moe_block(cfg, mtp + ("block",), True, off)
    e += [Entry(("model", "final_norm", "scale"), "model.norm.weight"),
          Entry(("lm_head", "kernel"), "lm_head.weight", "linear")]
    return e


GLM5_NEXT_PREFIX = "model.language_model."  # Glm5NextForConditionalGeneration's language model


def _kda_entries(cfg: GLMConfig, attn: tuple[str, ...], layer: str) -> list[Entry]:
    """glm5_next's KDA attention (glm_jax/model/layers/kda.py) as the checkpoint stores it: q/k/v convolutions
    apart (transformers fuses them in memory), the forget gate's f_a / f_b / dt_bias / A_log under self_attn."""
    sa = layer + "self_attn."
    e = [Entry(attn + (ours, "kernel"), sa + f"{theirs}.weight", "linear", n_in)
         for ours, theirs, n_in in (("q", "q_proj", 1), ("k", "k_proj", 1), ("v", "v_proj", 1), ("f_a", "f_a_proj", 1),
                                    ("f_b", "f_b_proj", 1), ("b", "b_proj", 1), ("g_a", "g_a_proj", 1),
                                    ("g_b", "g_b_proj", 1), ("o", "o_proj", 2))]
    e += [Entry(attn + (f"{x}_conv",), sa + f"{x}_conv1d.weight", "conv", dtype="float32") for x in "qkv"]
    return e + [Entry(attn + ("dt_bias",), sa + "dt_bias", "bias", dtype="float32"),
                Entry(attn + ("A_log",), sa + "A_log", dtype="float32"),
                Entry(attn + ("o_norm",), sa + "o_norm.weight")]


def glm5_next_entries(cfg: GLMConfig, prefix: str = GLM5_NEXT_PREFIX) -> list[Entry]:
    """transformers' glm5_next (GLM-5.3-Flash) as published: the language model under `prefix`, each layer's
    hyper-connections (hc_{attn,ffn}_{fn,base,scale}), KDA or MLA + pooled DSA attention, and glm4_moe's MLP /
    MoE tensors; our blocks live in the repeating units of glm_jax.model.glm.hybrid_stacks (slice u of unit block
    j = torch layer first + u * len(unit) + j)."""
    from glm_jax.model.glm import hybrid_stacks  # formats <- model: the unit layout is the model's

    layer = prefix + "layers.{i}."
    e = [Entry(("model", "embed", "embedding"), prefix + "embed_tokens.weight")]
    for name, kinds, first, _ in hybrid_stacks(cfg):
        for j, (linear, moe, _) in enumerate(kinds):
            path = ("model", name, f"block_{j}")
            block = _glm4_moe_block(cfg, path, moe, 0, layer)
            if linear:
                block = [x for x in block if x.path[3] != "attention"] + _kda_entries(cfg, path + ("attention",), layer)
            for hc in ("attn", "ffn"):
                block += [Entry(path + (f"{hc}_hc", "fn"),
                                layer + f"hc_{hc}_fn", "linear"),
                          Entry(path + (f"{hc}_hc", "base"), layer + f"hc_{hc}_base", dtype="float32"),
                          Entry(path + (f"{hc}_hc", "scale"), layer + f"hc_{hc}_scale", dtype="float32")]
            e += [dataclasses.replace(x, offset=first + j, stride=len(kinds)) for x in block]
    return e + [Entry(("model", "final_norm", "scale"), prefix + "norm.weight"),
                Entry(("lm_head", "kernel"), "lm_head.weight", "linear")]


# A transformers 5 state dict holds each layer's routed experts fused (Glm4MoeExperts: gate_up_proj [E, 2*I, H],
# gate rows first; down_proj [E, H, I]); its save_pretrained writes them per expert again, but a fused file is
# read too: our path suffix -> (torch name suffix, the Entry that reads it).
FUSED_EXPERTS = {("mlp", "experts", "wi"): "mlp.experts.gate_up_proj", ("mlp", "experts", "wo"): "mlp.experts.down_proj"}


def fused_experts_entry(per_expert: Entry) -> Entry:
    """The Entry reading the fused layout of the parameter `per_expert` fills (one of FUSED_EXPERTS)."""
    suffix = FUSED_EXPERTS[per_expert.path[-3:]]
    return Entry(per_expert.path, "model.layers.{i}." + suffix, "stacked_linear", offset=per_expert.offset)


# Tensors of a glm4_moe MTP layer that are copies of the model's own embedding / output head (DeepSeek-V3's MTP
# shares them): not loaded; save_hf writes the model's in their place. torch suffix -> (our path, kind).
MTP_SHARED = {"embed_tokens.weight": (("model", "embed", "embedding"), "copy"),
              "shared_head.head.weight": (("lm_head", "kernel"), "linear")}

ENTRIES = {"thudm": thudm_entries, "transformers": transformers_entries}
# Tensors present in real checkpoints that carry no parameters.
IGNORED_TORCH_NAMES = ("transformer.rotary_pos_emb.inv_freq",)
HEADS = (("lm_head",), ("score",))
