"""Name and layout maps between our parameter tree and the two checkpoint formats.

Each `Entry` ties one of our parameters to one PyTorch tensor (per layer for stacked block parameters):
  kind "copy"    same layout (embeddings, norm scales)
  kind "linear"  torch [out, in] -> our kernel = W.T reshaped; `n_in` leading kernel dims are inputs
  kind "bias"    torch [out] -> our bias reshaped
  kind "prefix"  THUDM's P-tuning v2 prefix embedding [pre_seq_len, L*2*groups*hd] -> [L, 2, pre_seq_len, G, D]
`rows` selects a row block of a fused torch tensor (THUDM's query_key_value).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from glm_jax.config import GLMConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # our parameter path
    torch_name: str  # may contain {i} for the layer index
    kind: str = "copy"
    n_in: int = 1
    rows: tuple[int, int] | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch_name

    def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One torch tensor (one layer's) -> our layout of `shape` (without the layer axis)."""
        if self.rows is not None:
            w = w[self.rows[0]:self.rows[1]]
        if self.kind == "linear":
            w = w.T
        if self.kind == "prefix":  # [P, L*2*G*D] -> [L, 2, P, G, D] (THUDM: view(P, L*2, G, D), layer i = rows 2i, 2i+1)
            l, two, p, g, d = shape
            return w.reshape(p, l, two, g, d).transpose(1, 2, 0, 3, 4)
        return w.reshape(shape)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            n_in = math.prod(x.shape[: self.n_in])
            return x.reshape(n_in, -1).T
        if self.kind == "bias":
            return x.reshape(-1)
        if self.kind == "prefix":
            return x.transpose(2, 0, 1, 3, 4).reshape(x.shape[2], -1)
        return x

    def torch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Expected torch shape (of the row block, if any) for our per-layer `shape`."""
        if self.kind == "linear":
            return (math.prod(shape[self.n_in:]), math.prod(shape[: self.n_in]))
        if self.kind == "bias":
            return (math.prod(shape),)
        if self.kind == "prefix":
            return (shape[2], math.prod(shape) // shape[2])
        return tuple(shape)


QUANTIZABLE = ("query_key_value", "self_attention.dense", "dense_h_to_4h", "dense_4h_to_h")


def thudm_entries(cfg: GLMConfig) -> list[Entry]:
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


def transformers_entries(cfg: GLMConfig) -> list[Entry]:
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


ENTRIES = {"thudm": thudm_entries, "transformers": transformers_entries}
# Tensors present in real checkpoints that carry no parameters.
IGNORED_TORCH_NAMES = ("transformer.rotary_pos_emb.inv_freq",)
HEADS = (("lm_head",), ("score",))
