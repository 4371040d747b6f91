"""GLMConfig: one frozen dataclass describing a GLM model of any family: the dense line (ChatGLM2/3, GLM-4,
GLM-4-0414), the mixture-of-experts line (GLM-4.5 / 4.5-Air / 4.6), MLA (GLM-4.7-Flash) and DSA (GLM-5): its
fields, their validation, the presets and the sizes derived from them (parameters, FLOPs).

The config.json dialects it reads and writes (`from_hf_dict` / `to_hf_dict`) are one reader / writer pair per
model_type in glm_jax/config_dialects.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from glm_jax import config_dialects

log = logging.getLogger(__name__)

# The one list of each option: GLMConfig, the train config schema, the model and the scripts all read these.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")  # glm_jax/model/glm.py maps them to jax policies
DTYPES = ("float32", "bfloat16", "float16")
# Routed experts (glm_jax/model/layers/moe.py): "ragged" = tokens sorted by expert, one grouped matmul
# (jax.lax.ragged_dot); "gather" = each (token, expert) pair multiplies its expert's gathered weights (reads only
# the chosen experts: decoding); "auto" = gather when tokens * top-k < experts, else ragged; "dense" = every expert
# on every token, a test reference only.
MOE_IMPLS = ("auto", "ragged", "gather", "dense")
# Attention (GLMConfig.attention_type): "gqa" = grouped-query attention (glm_jax/model/layers/attention.py);
# "mla" = multi-head latent attention of glm4_moe_lite / GLM-4.7-Flash (glm_jax/model/layers/mla.py, docs/mla.md).
ATTENTION_TYPES = ("gqa", "mla")


def read_json(file: str | Path, what: str | None = None) -> Any:
    """The JSON value in `file`. A file that cannot be read or parsed raises one ValueError naming it (as given)
    and the position of the JSON error; `what` names the content in the cannot-read message. A missing file
    raises FileNotFoundError."""
    try:
        return json.loads(Path(file).read_bytes())
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{file}: cannot read{f' {what}' if what else ''} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{file}: not valid JSON (nested too deeply)") from None


def read_json_object(file: str | Path) -> dict[str, Any]:
    """The JSON object in `file` (a checkpoint's config.json), read by `read_json`."""
    file = Path(file)
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


def _fail(msg: str):
    """A GLMConfig validation error (GLMConfig.__post_init__ and its _check_* helpers)."""
    raise ValueError(f"GLMConfig: {msg}")


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    num_layers: int = 28
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 128
    # Rotary embedding covers the first `rotary_fraction` of each head (0.5 in every GLM v2 model).
    rotary_fraction: float = 0.5
    # Effective base: 10000 * rope_ratio for ChatGLM3-32K/128K and GLM-4.
    rope_theta: float = 10000.0
    # ChatGLM2-6B-32K divides positions by its rope_ratio instead of scaling the base.
    rope_position_divisor: float = 1.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    qkv_bias: bool = True
    # GLM-4-0414 ("glm4"): extra RMSNorm on each sublayer's output before the residual add.
    sandwich_norm: bool = False
    # glm4_moe (GLM-4.5, GLM-4.6): RMSNorm over head_dim on every query and key head, before the rotary.
    use_qk_norm: bool = False
    # Rotary layout of the first rotary_dim dims of a head: True = GLM's interleaved pairs (2i, 2i+1) (ChatGLM2/3,
    # GLM-4, glm / glm4); False = the split-half NeoX layout (i, i + rotary_dim / 2) of glm4_moe.
    rope_interleaved: bool = True
    # ChatGLM-6B, the first ChatGLM (docs/glm-objective.md): True selects its whole block: LayerNorm (with bias),
    # a GeLU MLP and an output projection with biases, the residual sqrt(2 * 28) * LN(x) + f(LN(x)), and 2D
    # rotary positions (each head's first half rotated by the position, its second by the block position, both
    # NeoX-style, inv_freq rounded through float16 as THUDM's code does), positions and the mask derived from
    # the ids: [MASK] / [gMASK] (mask_token_id / gmask_token_id) and <sop> (bos_token_id) start the generated part.
    position_encoding_2d: bool = False
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    bos_token_id: int = 130004
    # Mixture of experts (glm4_moe). n_routed_experts = 0: a dense model, and the fields up to moe_impl are unused.
    # Layers first_k_dense_replace.. are MoE blocks: a sigmoid router with a correction bias that only chooses,
    # group-limited top-k (n_group groups, the best topk_group of them by the sum of their top-2 scores),
    # num_experts_per_tok routed experts of moe_intermediate_size, plus n_shared_experts always-on experts.
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_impl: str = "auto"  # MOE_IMPLS
    # Multi-token-prediction layers of the checkpoint (config.json num_nextn_predict_layers), kept in the parameter
    # tree (model/mtp) so that they load and save; the forward pass and generation do not use them yet.
    num_mtp_layers: int = 0
    # Multi-head latent attention (attention_type "mla", glm4_moe_lite; docs/mla.md): queries through a q_lora_rank
    # bottleneck with its RMSNorm (0 = one plain query projection), keys and values up-projected from one
    # kv_lora_rank latent per token (RMS-normed) plus one rotary key of qk_rope_head_dim shared by all heads; per
    # head qk_nope_head_dim + qk_rope_head_dim query/key dims and v_head_dim value dims. An MLA config sets
    # head_dim = qk_nope_head_dim + qk_rope_head_dim and num_kv_heads = num_heads itself; the rotary covers
    # qk_rope_head_dim * rotary_fraction dims; the decode cache holds the latent and the rotary key per token.
    attention_type: str = "gqa"  # ATTENTION_TYPES
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # YaRN rope scaling of an MLA model: transformers' rope_parameters for rope_type "yarn" (factor,
    # original_max_position_embeddings, beta_fast / beta_slow, mscale / mscale_all_dim, attention_factor, truncate)
    # as sorted (key, value) pairs; () = the default rope. It changes the rotary frequencies, scales cos / sin, and
    # multiplies the softmax scale by mscale(factor, mscale_all_dim)^2 (docs/mla.md "Rope scaling").
    rope_scaling: tuple = ()
    # DeepSeek sparse attention (glm_moe_dsa, GLM-5; docs/dsa.md): index_topk > 0 gives every MLA layer an indexer
    # of index_n_heads heads of index_head_dim that picks the index_topk keys each query attends to.
    # indexer_types: per layer "full" (its own indexer) or "shared" (reuses the previous layer's choice and has no
    # indexer in the checkpoint; transformers' indexer_types), () = all full. dsa_block: queries per block of the
    # blockwise sparse attention.
    index_topk: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0
    indexer_types: tuple[str, ...] = ()
    dsa_block: int = 128
    # GLM-5.3-Flash (glm5_next; docs/glm5-next.md): layer_types names each layer "linear_attention" (Kimi delta
    # attention, glm_jax/model/layers/kda.py: linear_num_heads heads of linear_head_dim, a causal depthwise
    # convolution of linear_conv_kernel taps, a forget gate bounded below by linear_lower_bound (None: the
    # softplus gate), chunked in kda_chunk_size tokens) or "indexed_attention" (MLA + DSA without rope); () = every
    # layer is attention_type's (the other families). hc_mult >= 1: that many hyper-connection residual streams
    # (glm_jax/model/layers/hyper.py; 0 = the plain residual of the other families), mixed by weights Sinkhorn-
    # normalised in hc_sinkhorn_iters steps with floor hc_eps. index_kpool > 1: the DSA indexer scores pools of that
    # many keys (index_kpool_tail: the incomplete last pool is always attended). swiglu_limit > 0 clamps the
    # SwiGLU gate (above) and up (both sides) projections of every MLP and expert.
    layer_types: tuple[str, ...] = ()
    linear_num_heads: int = 0
    linear_head_dim: int = 0
    linear_conv_kernel: int = 4
    linear_lower_bound: float | None = -5.0
    kda_chunk_size: int = 64
    hc_mult: int = 0
    hc_eps: float = 1e-6
    hc_sinkhorn_iters: int = 20
    index_kpool: int = 1
    index_kpool_tail: bool = True
    swiglu_limit: float = 0.0
    num_labels: int = 2
    pad_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (2,)
    # Numerics: activations / matmul inputs in `dtype`, parameters stored in `param_dtype`.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    # cuDNN attention on segment ids (packed rows): up to this many documents per row run in cuDNN's packed
    # layout (no [S, S] mask); rows with more fall back to the mask. 0 = always the mask.
    max_segments: int = 0
    remat_policy: str = "none"
    # Decoder blocks per iteration of the layer scan: 1 = one compiled block (compile time independent of depth),
    # num_layers = straight-line code (longer compile; XLA may schedule and fuse across layers).
    scan_unroll: int = 1
    # False: one module per block ("layers_0", ...) with its own weight buffers instead of one stack sliced per
    # layer: an inference layout (load_hf(..., scan_layers=False) / glm_jax.model.unstack_layers); training,
    # LoRA and the converters' tensor maps use the stacked layout.
    scan_layers: bool = True
    # Weight-only int8 / int4 block linears (q, k, v, out, wi, wo), dequantized on the fly; 0 = off.
    quantization_bit: int = 0
    # P-tuning v2: number of learned prefix key/value slots per layer (0 = off).
    pre_seq_len: int = 0
    name: str = ""

    def __post_init__(self):
        # The checks run in this order: the first failure is the message a user sees.
        if self.attention_type not in ATTENTION_TYPES:
            _fail(f"attention_type={self.attention_type!r}, expected one of {ATTENTION_TYPES}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.is_mla:
            self._check_mla()
        if self.is_dsa:
            self._check_dsa()
        if self.is_glm5_next:
            self._check_glm5_next()
        self._check_shapes()
        self._check_options()
        if self.rope_scaling and not self.is_mla:
            _fail("rope_scaling (YaRN) is implemented for attention_type='mla' only")
        object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in dict(self.rope_scaling).items())))
        self._check_moe()
        if self.position_encoding_2d:
            self._check_chatglm_v1()
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    def _check_chatglm_v1(self):
        """ChatGLM-6B's block: multi-head attention, the head split in two rotary halves; none of the later
        lines' features."""
        if self.num_kv_heads != self.num_heads or self.head_dim % 4:
            _fail("position_encoding_2d (ChatGLM-6B) needs num_kv_heads == num_heads and head_dim divisible by 4")
        if self.is_moe or self.is_mla or self.is_glm5_next or self.sandwich_norm or self.use_qk_norm:
            _fail("position_encoding_2d (ChatGLM-6B) is a dense multi-head model without sandwich or q/k norms")

    def _check_shapes(self):
        """Sizes: positive, query heads in whole KV groups, an even rotary part that fits the head."""
        for f in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, f)) <= 0:
                _fail(f"{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            _fail(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim and not self.is_glm5_next:
            _fail(f"rotary_fraction={self.rotary_fraction} gives an invalid rotary dim for head_dim={self.head_dim}")

    def _check_options(self):
        """Implementation choices: attention kernel, remat policy, scan unroll, quantization, dtypes."""
        if self.attention_impl not in ATTENTION_IMPLS:
            _fail(f"attention_impl={self.attention_impl!r}, expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            _fail(f"remat_policy={self.remat_policy!r}, expected one of {REMAT_POLICIES}")
        if not 1 <= int(self.scan_unroll):
            _fail(f"scan_unroll={self.scan_unroll}, expected a positive number of blocks per scan iteration")
        if self.quantization_bit not in (0, 4, 8):
            _fail(f"quantization_bit={self.quantization_bit}, expected 0, 4 or 8")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                _fail(f"{f}={getattr(self, f)!r}, expected float32, bfloat16 or float16")

    def _check_moe(self):
        """MoE fields (docs/moe.md): expert counts, group-limited routing that can fill top-k, MTP layers; the
        features a MoE model lacks."""
        if self.moe_impl not in MOE_IMPLS:
            _fail(f"moe_impl={self.moe_impl!r}, expected one of {MOE_IMPLS}")
        if self.n_routed_experts < 0 or self.num_mtp_layers < 0:
            _fail("n_routed_experts and num_mtp_layers must be >= 0")
        if not self.is_moe:
            if self.num_mtp_layers:
                _fail("num_mtp_layers needs a MoE model (the MTP layer is a glm4_moe block)")
            return
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if not 1 <= k <= e:
            _fail(f"num_experts_per_tok={k} must be between 1 and n_routed_experts={e}")
        if self.moe_intermediate_size <= 0 or self.n_shared_experts < 0:
            _fail("a MoE model needs moe_intermediate_size > 0 and n_shared_experts >= 0")
        if not 0 <= self.first_k_dense_replace <= self.num_layers:
            _fail(f"first_k_dense_replace={self.first_k_dense_replace} must be between 0 and num_layers")
        if self.n_group < 1 or e % self.n_group:
            _fail(f"n_group={self.n_group} must divide n_routed_experts={e}")
        if not 1 <= self.topk_group <= self.n_group:
            _fail(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
        if self.n_group > 1 and e // self.n_group < 2:
            _fail("group-limited routing ranks groups by their top-2 scores: each group needs >= 2 experts")
        if self.topk_group * (e // self.n_group) < k:
            _fail(f"topk_group={self.topk_group} groups of {e // self.n_group} experts cannot hold "
                  f"num_experts_per_tok={k} experts")
        if self.quantization_bit:
            _fail("weight-only quantization (quantization_bit) is not implemented for MoE models")
        if self.pre_seq_len:
            _fail("P-tuning v2 (pre_seq_len) is not implemented for MoE models")
        if self.sandwich_norm:
            _fail("sandwich_norm (glm4) and MoE blocks (glm4_moe) are different model lines")

    def _check_mla(self):
        """MLA fields; derives head_dim (the query/key head) and num_kv_heads (every head has its own keys)."""
        for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if int(getattr(self, f)) <= 0 and not (f == "qk_rope_head_dim" and self.is_glm5_next):  # NoPE
                _fail(f"attention_type='mla' needs {f} > 0, got {getattr(self, f)}")
        if self.q_lora_rank < 0:
            _fail(f"q_lora_rank={self.q_lora_rank}, expected >= 0 (0 = a plain query projection)")
        if not self.is_moe:
            _fail("attention_type='mla' is glm4_moe_lite's attention: it needs a MoE config (n_routed_experts > 0)")
        if self.quantization_bit or self.pre_seq_len or self.use_qk_norm or self.sandwich_norm:
            _fail("attention_type='mla' has no quantization, P-tuning prefix, qk norm or sandwich norms")
        object.__setattr__(self, "head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)
        scaling = self.rope_scaling_params
        if scaling and (scaling.get("rope_type") != "yarn" or "original_max_position_embeddings" not in scaling):
            _fail(f"rope_scaling={scaling}: only rope_type 'yarn' with original_max_position_embeddings is supported")
        object.__setattr__(self, "num_kv_heads", self.num_heads)

    @property
    def rope_scaling_params(self) -> dict[str, Any]:
        """rope_scaling as a dict ({} = the default rope)."""
        return dict(self.rope_scaling)

    @property
    def is_mla(self) -> bool:
        return self.attention_type == "mla"

    @property
    def is_dsa(self) -> bool:
        return self.index_topk > 0

    @property
    def is_glm5_next(self) -> bool:
        """GLM-5.3-Flash's hybrid: per-layer KDA / MLA+DSA attention, hyper-connections (docs/glm5-next.md)."""
        return bool(self.layer_types)

    def is_kda_layer(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def num_kda_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)

    def _check_glm5_next(self):
        """glm5_next fields (transformers' Glm5NextTextConfig): layer types, KDA sizes, hyper-connections, the pooled
        indexer; a "shared" indexer layer must directly follow a "full" indexed layer (transformers hands the
        selection on to the next layer only)."""
        types, kinds = self.layer_types, ("linear_attention", "indexed_attention")
        if len(types) != self.num_layers or set(types) - set(kinds):
            _fail(f"layer_types must name one of {kinds} for each of the {self.num_layers} layers, got {types}")
        if not self.is_dsa:
            _fail("glm5_next's indexed_attention layers are MLA + DSA: index_topk must be > 0")
        if self.num_kda_layers and (self.linear_num_heads <= 0 or self.linear_head_dim <= 0
                                    or self.linear_conv_kernel < 1 or self.kda_chunk_size < 1):
            _fail("linear_attention layers need linear_num_heads, linear_head_dim, linear_conv_kernel and "
                  "kda_chunk_size > 0")
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            _fail(f"glm5_next needs hc_mult >= 1 and hc_sinkhorn_iters >= 1, got {self.hc_mult}, "
                  f"{self.hc_sinkhorn_iters}")
        if self.index_kpool < 1 or self.index_topk % self.index_kpool:
            _fail(f"index_topk={self.index_topk} must be a multiple of index_kpool={self.index_kpool} (>= 1)")
        if self.qk_rope_head_dim:
            _fail("glm5_next's MLA has no rope: qk_rope_head_dim must be 0")
        if self.num_mtp_layers:
            _fail("glm5_next's MTP layer is not implemented: num_mtp_layers must be 0")
        # a linear_attention layer has no indexer: its entry is irrelevant (transformers ignores it) and kept "full"
        full = [t == "full" or k != "indexed_attention" for t, k in zip(self.indexer_types or ["full"] * len(types),
                                                                          types)]
        object.__setattr__(self, "indexer_types", () if all(full) else tuple("full" if f else "shared" for f in full))
        for i, t in enumerate(types):
            if t == "indexed_attention" and not full[i] and not (i and types[i - 1] == t and full[i - 1]):
                _fail(f"indexer_types: layer {i} is 'shared' but layer {i - 1} is not a 'full' indexed_attention "
                      "layer whose selection it could reuse")

    def _check_dsa(self):
        """DSA fields (transformers' glm_moe_dsa: MLA with a query bottleneck, interleaved rotary over the whole
        qk_rope_head_dim, which the indexer's first dims share)."""
        if not self.is_mla or not self.q_lora_rank:
            _fail("index_topk > 0 (DSA) needs attention_type='mla' with q_lora_rank > 0 (the indexer reads its latent)")
        if self.index_n_heads <= 0 or self.index_head_dim < self.qk_rope_head_dim:
            _fail(f"DSA needs index_n_heads > 0 and index_head_dim >= qk_rope_head_dim, got {self.index_n_heads}, "
                  f"{self.index_head_dim}")
        if not self.rope_interleaved or self.rotary_fraction != 1.0:
            _fail("glm_moe_dsa rotates all qk_rope_head_dim dims in interleaved pairs (rope_interleaved=True, "
                  "rotary_fraction=1.0)")
        types = tuple(self.indexer_types)
        if types and (len(types) != self.num_layers or set(types) - {"full", "shared"}):
            _fail(f"indexer_types must name 'full' / 'shared' for each of the {self.num_layers} layers, got {types}")
        if types and types[0] != "full" and not self.layer_types:  # transformers: "Shared DSA layers require top-k indices from a previous..."
            _fail(f"indexer_types: layer 0 is {types[0]!r}, but a 'shared' layer reuses the previous layer's top-k: "
                  "the first layer must be 'full'")
        object.__setattr__(self, "indexer_types", () if set(types) <= {"full"} else types)

    @property
    def rotary_dim(self) -> int:
        if self.is_mla:  # only the shared rotary part of an MLA head is rotated
            return int(self.qk_rope_head_dim * self.rotary_fraction)
        return int(self.head_dim * self.rotary_fraction)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def num_dense_layers(self) -> int:
        """Blocks with a dense MLP: all of them in a dense model, the first first_k_dense_replace in a MoE one."""
        return self.first_k_dense_replace if self.is_moe else self.num_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def model_type(self) -> str:
        """transformers' model_type of this architecture."""
        if self.is_glm5_next:
            return "glm5_next"
        if self.is_dsa:
            return "glm_moe_dsa"
        if self.is_mla:
            return "glm4_moe_lite"
        return "glm4_moe" if self.is_moe else "glm4" if self.sandwich_norm else "glm"

    def replace(self, **kw) -> "GLMConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameters of the model. MoE: the MTP layers count (they are in the tree); `active=True` counts what one
        token uses instead: num_experts_per_tok of the routed experts (the router's scores cover them all), no MTP."""
        if self.is_glm5_next:
            return self._glm5_next_params(include_embedding, active)
        h, f, l = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + (q + 2 * kv) * self.qkv_bias + q * h
        if self.use_qk_norm:
            attn += 2 * self.head_dim
        if self.is_mla:
            attn = self._mla_attention_params()
        if self.is_dsa:  # the indexer: wq_b, wk, k_norm (scale, bias), weights_proj
            ih, d = self.index_n_heads, self.index_head_dim
            attn += self.q_lora_rank * ih * d + h * d + 2 * d + h * ih
        block = attn + 3 * h * f + h * (4 if self.sandwich_norm else 2)
        emb = 2 * self.vocab_size * h if include_embedding else 0
        if self.position_encoding_2d:  # ChatGLM-6B: GeLU MLP and output projection with biases, LayerNorms
            block = attn + h + (2 * h * f + f + h) + 4 * h
            return l * block + 2 * h + emb
        if not self.is_moe:
            return l * block + h + emb
        e, i = self.n_routed_experts, self.moe_intermediate_size
        experts = self.num_experts_per_tok if active else e
        moe_block = attn + h * 2 + (h * e + e) + 3 * h * i * (experts + self.n_shared_experts)
        mtp = 0 if active else self.num_mtp_layers * (moe_block + 3 * h + 2 * h * h)
        return self.num_dense_layers * block + self.num_moe_layers * moe_block + mtp + h + emb

    def _glm5_next_params(self, include_embedding: bool, active: bool) -> int:
        """num_params of glm5_next: per layer its attention (KDA, or MLA with its indexer: every MLA layer holds one
        in the tree, a "shared" layer's unused), two hyper-connections, two norms and its FFN."""
        h, n, hd, nh = self.hidden_size, self.hc_mult, self.linear_head_dim, self.linear_num_heads
        qkv = nh * hd
        kda = 4 * h * qkv + 3 * self.linear_conv_kernel * qkv + 2 * (h * hd + hd * qkv) + qkv + nh + h * nh + hd
        ih, d = self.index_n_heads, self.index_head_dim
        mla = self._mla_attention_params() + self.q_lora_rank * ih * d + h * d + 2 * d + h * ih
        if self.index_kpool > 1:
            mla += h * d + self.index_kpool * d
        hc = 2 * (n * h * (2 + n) * n + (2 + n) * n + 3)
        e, i = self.n_routed_experts, self.moe_intermediate_size
        moe = h * e + e + 3 * h * i * ((self.num_experts_per_tok if active else e) + self.n_shared_experts)
        total = sum((kda if self.is_kda_layer(j) else mla) + hc + 2 * h
                    + (3 * h * self.ffn_hidden_size if j < self.num_dense_layers else moe)
                    for j in range(self.num_layers))
        return total + h + (2 * self.vocab_size * h if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style: 6*N plus attention.

        N excludes the input embedding (a gather, not a matmul) but includes the output projection; for a MoE model
        it counts the active parameters (num_params(active=True)).
        Attention adds 12 * L * seq * heads * head_dim (QK^T and PV, forward+backward, full causal square
        counted like PaLM / MaxText do).
        """
        n = self.num_params(include_embedding=False, active=True) + self.vocab_size * self.hidden_size
        if self.is_glm5_next:
            return 6 * n + self._glm5_next_attention_flops(seq_len)
        attn = 12 * self.num_layers * seq_len * self.num_heads * self.head_dim
        if self.is_mla:  # q.k over the query/key head, p.v over the value head
            attn = 6 * self.num_layers * seq_len * self.num_heads * (self.head_dim + self.v_head_dim)
        if self.is_dsa:  # docs/dsa.md: each query attends to at most index_topk keys, in the absorbed (latent) form,
            # and the indexer scores every key, forward only (it receives no gradient)
            keys, lat = min(seq_len, self.index_topk), self.kv_lora_rank
            attn = 6 * self.num_layers * keys * self.num_heads * (2 * lat + self.qk_rope_head_dim)
            indexers = self.indexer_types.count("full") if self.indexer_types else self.num_layers  # "shared": none
            attn += 2 * indexers * seq_len * self.index_n_heads * self.index_head_dim
        return 6 * n + attn

    def _glm5_next_attention_flops(self, seq_len: int) -> float:
        """Training FLOPs per token of glm5_next's attention beyond its projections (docs/glm5-next.md): MLA layers
        attend to at most index_topk (+ the pool tail) keys in the latent form, full indexers score seq / kpool
        pools (forward only); a KDA head per token, chunked (C = min(chunk, seq)): the intra-chunk products
        2 C Dk (keys) + C Dk (queries) + C Dv (values) and three [Dk, Dv] state products."""
        mla_layers = self.num_layers - self.num_kda_layers
        full = sum(t != "linear_attention" and (not self.indexer_types or self.indexer_types[i] == "full")
                   for i, t in enumerate(self.layer_types))
        keys = min(seq_len, self.index_topk + self.index_kpool - 1)
        attn = 6 * mla_layers * keys * self.num_heads * 2 * self.kv_lora_rank
        attn += 2 * full * seq_len / self.index_kpool * self.index_n_heads * self.index_head_dim
        c, d = min(self.kda_chunk_size, seq_len), self.linear_head_dim
        return attn + 6 * self.num_kda_layers * self.linear_num_heads * 2 * (3 * c * d + c * d + 3 * d * d)

    def _mla_attention_params(self) -> int:
        """Parameters of one MLA layer (glm_jax/model/layers/mla.py), biases when qkv_bias (attention_bias)."""
        h, n, b = self.hidden_size, self.num_heads, int(self.qkv_bias)
        ql, kl, rope = self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim
        q = h * ql + ql * b + ql + ql * n * self.head_dim if ql else h * n * self.head_dim
        kv = h * (kl + rope) + (kl + rope) * b + kl + kl * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + n * self.v_head_dim * h + h * b

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown GLM preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    # ------------------------------------------------------------------ HF configs
    @classmethod
    def from_hf(cls, path: str | Path, **overrides) -> "GLMConfig":
        """Reads a checkpoint directory's config.json (or the file itself), THUDM or transformers dialect."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no config.json")
        return cls.from_hf_dict(read_json_object(file), source=str(file), **overrides)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json", **overrides) -> "GLMConfig":
        """The GLMConfig of a config.json's contents, read by its model_type's dialect (glm_jax/config_dialects.py;
        a missing key takes that dialect's default); `overrides` replace fields; `source` names the file in
        errors."""
        return cls(**{**config_dialects.read_fields(raw, source), **overrides})

    def to_hf_dict(self, format: str = "transformers") -> dict[str, Any]:
        """config.json contents for `format` "thudm" (model_type chatglm) or "transformers" (this config's
        model_type: glm / glm4, glm4_moe, glm4_moe_lite or glm_moe_dsa), written by its dialect."""
        return config_dialects.write_json(self, format)


_CHATGLM = dict(vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_heads=32,
                num_kv_heads=2, head_dim=128, norm_eps=1e-5, pad_token_id=0, dtype="bfloat16", param_dtype="bfloat16")
_GLM4 = dict(_CHATGLM, vocab_size=151552, num_layers=40, norm_eps=1.5625e-7, rope_theta=5e6, max_seq_len=131072,
             pad_token_id=151329, eos_token_ids=(151329, 151336, 151338))

_GLM45 = dict(vocab_size=151552, hidden_size=5120, ffn_hidden_size=12288, num_layers=92, num_heads=96, num_kv_heads=8,
              head_dim=128, rotary_fraction=0.5, rope_theta=1e6, rope_interleaved=False, norm_eps=1e-5,
              max_seq_len=131072, qkv_bias=True, use_qk_norm=True, n_routed_experts=160, num_experts_per_tok=8,
              n_shared_experts=1, moe_intermediate_size=1536, first_k_dense_replace=3, n_group=1, topk_group=1,
              norm_topk_prob=True, routed_scaling_factor=2.5, num_mtp_layers=1, pad_token_id=151329,
              eos_token_ids=(151329, 151336, 151338), dtype="bfloat16", param_dtype="bfloat16")

PRESETS: dict[str, dict[str, Any]] = {
    # THUDM/chatglm-6b's config.json (the last revision: no image-token offset, so bos <sop> = 130004)
    "chatglm-6b": dict(vocab_size=130528, hidden_size=4096, ffn_hidden_size=16384, num_layers=28, num_heads=32,
                       num_kv_heads=32, head_dim=128, max_seq_len=2048, position_encoding_2d=True,
                       mask_token_id=130000, gmask_token_id=130001, bos_token_id=130004, pad_token_id=3,
                       eos_token_ids=(130005,)),
    "chatglm2-6b": dict(_CHATGLM, max_seq_len=32768),
    "chatglm2-6b-32k": dict(_CHATGLM, max_seq_len=32768, rope_position_divisor=16.0),
    "chatglm3-6b": dict(_CHATGLM, max_seq_len=8192),
    "chatglm3-6b-32k": dict(_CHATGLM, max_seq_len=32768, rope_theta=5e5),
    "chatglm3-6b-128k": dict(_CHATGLM, max_seq_len=131072, rope_theta=5e6),
    "glm-4-9b": dict(_GLM4),
    "glm-4-9b-chat": dict(_GLM4),
    # From the released config.json of THUDM/glm-4-9b-chat-1m: 4 KV groups, rope_ratio 10000, 1M positions.
    "glm-4-9b-chat-1m": dict(_GLM4, num_kv_heads=4, rope_theta=1e8, max_seq_len=1048576),
    # Small models for tests and the CPU default training run (vocab covers the shipped tokenizer).
    "glm-test": dict(vocab_size=512, hidden_size=64, ffn_hidden_size=160, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_seq_len=256),
    "glm-tiny": dict(vocab_size=8192, hidden_size=256, ffn_hidden_size=688, num_layers=4, num_heads=8,
                     num_kv_heads=2, head_dim=32, max_seq_len=512),
    # ChatGLM-6B's architecture at glm-tiny's size, on the shipped ChatGLM-6B-style vocabulary
    # (glm_jax/assets/chatglm6b: [MASK] 84, [gMASK] 85, <sop> 88, <eop> 89, <pad> 92)
    "chatglm-6b-tiny": dict(vocab_size=8000, hidden_size=256, ffn_hidden_size=1024, num_layers=4, num_heads=8,
                            num_kv_heads=8, head_dim=32, max_seq_len=512, position_encoding_2d=True,
                            mask_token_id=84, gmask_token_id=85, bos_token_id=88, pad_token_id=92,
                            eos_token_ids=(89,)),
    # Mixture of experts (glm4_moe). Values of the published config.json files:
    # glm-4.5-air: zai-org/GLM-4.5-Air config.json as ms-swift prints it (Glm4MoeConfig, transformers 4.54.1),
    #   which the Megatron arguments of THUDM's slime (glm4.5-106B-A12B) repeat.
    # glm-4.5: zai-org/GLM-4.5, from slime's scripts/models/glm4.5-355B-A32B.sh (the Megatron arguments converted
    #   from that config.json: 92 layers of which 3 dense, 160 experts, top-8, scaling 2.5, qk-norm, qkv bias,
    #   rotary 0.5 at base 1e6) and NVIDIA Megatron-Bridge's GLM 4.5 page (131072 positions, MTP with 1 layer).
    # glm-4.6: zai-org/GLM-4.6: GLM-4.5's architecture with max_position_embeddings 202752 (its config.json as
    #   quoted in andreidhoang/stanford-ai's GLM-4.6 notes; xinference's GLM-4.6 page gives the same context).
    # Shared by all three: vocab 151552, 96 heads, 8 KV heads, head_dim 128, rms_norm_eps 1e-5, n_group 1,
    # topk_group 1, norm_topk_prob true, 1 shared expert, pad 151329, eos [151329, 151336, 151338], bfloat16.
    "glm-4.5": dict(_GLM45),
    "glm-4.5-air": dict(_GLM45, hidden_size=4096, ffn_hidden_size=10944, num_layers=46, use_qk_norm=False,
                        n_routed_experts=128, moe_intermediate_size=1408, first_k_dense_replace=1,
                        routed_scaling_factor=1.0),
    "glm-4.6": dict(_GLM45, max_seq_len=202752),
    # A small MoE for tests: group-limited routing, shared expert, qk norm, one dense layer first.
    "glm-moe-test": dict(vocab_size=512, hidden_size=64, ffn_hidden_size=160, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=256, rope_interleaved=False, use_qk_norm=True,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5),
    # glm-4.7-flash: zai-org/GLM-4.7-Flash (transformers glm4_moe_lite; MLA + MoE, 30B total / 3B active). Values of
    #   its config.json as vLLM's glm4_moe_lite config unit test copies it (_glm4_moe_lite_min_config: 47 layers, hidden
    #   2048, 20 heads, q_lora_rank 768, kv_lora_rank 512, qk_nope 192 + qk_rope 64, v 256, rope_theta 1e6,
    #   partial_rotary_factor 1.0, no rope scaling, 64 experts top-4 + 1 shared of 1536, first_k_dense_replace 1,
    #   scaling 1.8, pad 154820, eos [154820, 154827, 154829], bfloat16), which are also transformers'
    #   Glm4MoeLiteConfig defaults; one MTP layer (num_nextn_predict_layers 1, the layer transformers skips as
    #   model.layers.47). rope_interleave is absent there: transformers' default, true.
    "glm-4.7-flash": dict(vocab_size=154880, hidden_size=2048, ffn_hidden_size=10240, num_layers=47, num_heads=20,
                          num_kv_heads=20, attention_type="mla", q_lora_rank=768, kv_lora_rank=512,
                          qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, rotary_fraction=1.0,
                          rope_theta=1e6, rope_interleaved=True, norm_eps=1e-5, max_seq_len=202752, qkv_bias=False,
                          n_routed_experts=64, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=1536,
                          first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                          routed_scaling_factor=1.8, num_mtp_layers=1, pad_token_id=154820,
                          eos_token_ids=(154820, 154827, 154829), dtype="bfloat16", param_dtype="bfloat16"),
    # A small MLA model for tests (glm4_moe_lite's layout: q bottleneck, latent KV, interleaved rotary, MoE).
    "glm-mla-test": dict(vocab_size=512, hidden_size=64, ffn_hidden_size=160, num_layers=3, num_heads=4,
                         attention_type="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16, rotary_fraction=1.0, max_seq_len=256, qkv_bias=False,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5),
    # configs/moe-tiny.yaml: a small MoE trained from scratch on CPU (glm-tiny's vocabulary, hidden 192; one
    # dense layer, then 3 MoE layers of 8 experts, top-2, one shared expert; 5.8M parameters, 4.5M active).
    "glm-moe-tiny": dict(vocab_size=8192, hidden_size=192, ffn_hidden_size=512, num_layers=4, num_heads=6,
                         num_kv_heads=2, head_dim=32, max_seq_len=512, rope_interleaved=False, use_qk_norm=True,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
                         first_k_dense_replace=1),
    # glm-5: zai-org/GLM-5 (transformers glm_moe_dsa; MLA + DSA + MoE, 744B total / 40B active). Values of its
    #   config.json as two public copies reproduce it (PrimeIntellect-ai/prime-rl
    #   scripts/glm5_weight_transfer/create_small_glm5.py, "exact GLM-5 dimensions" with fewer layers, and Omni-Infer's
    #   GLM-5 deployment guide): hidden 6144, 78 layers (3 dense), 64 heads, q_lora_rank 2048, kv_lora_rank 512,
    #   qk_nope 192 + qk_rope 64, v 256, index_n_heads 32, index_head_dim 128, index_topk 2048, no indexer_types /
    #   index_topk_freq (every layer runs its indexer), rope_theta 1e6 (default rope), 256 experts top-8 + 1 shared
    #   of 2048, intermediate 12288, scaling 2.5, n_group 1, vocab 154880, max_position_embeddings 202752, eps 1e-5,
    #   one MTP layer, pad 154820, eos [154820, 154827, 154829], bfloat16; also transformers' GlmMoeDsaConfig
    #   defaults (except rope_theta).
    "glm-5": dict(vocab_size=154880, hidden_size=6144, ffn_hidden_size=12288, num_layers=78, num_heads=64,
                  num_kv_heads=64, attention_type="mla", q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192,
                  qk_rope_head_dim=64, v_head_dim=256, rotary_fraction=1.0, rope_theta=1e6, rope_interleaved=True,
                  norm_eps=1e-5, max_seq_len=202752, qkv_bias=False, n_routed_experts=256, num_experts_per_tok=8,
                  n_shared_experts=1, moe_intermediate_size=2048, first_k_dense_replace=3, n_group=1, topk_group=1,
                  norm_topk_prob=True, routed_scaling_factor=2.5, num_mtp_layers=1, index_topk=2048,
                  index_n_heads=32, index_head_dim=128, pad_token_id=154820, eos_token_ids=(154820, 154827, 154829),
                  dtype="bfloat16", param_dtype="bfloat16"),
    # glm-5.3-flash: zai-org/GLM-5.3-Flash's language model (transformers glm5_next; KDA / MLA + pooled DSA, mHC,
    #   MoE; 313B total / ~17B active). Values of the published config.json's text_config as two public test
    #   fixtures transcribe it (hidden 4096, 45 layers of which 3 dense, 64 MLA heads, q_lora_rank 1536, kv_lora_rank
    #   512, qk_nope 256, qk_rope 0 (mla_use_nope), v 256, 288 experts top-8 + 1 shared of 2048, intermediate 12288,
    #   scaling 2.5, n_group 1, vocab 154880, max_position_embeddings 1048576, eps 1e-5, index_n_heads 32,
    #   index_head_dim 128, index_topk 2048, index_kpool 4 with the tail, indexer_types all "full", KDA 64 heads of
    #   128 with a 4-tap convolution and gate_lower_bound -5, hc_mult 4, 20 Sinkhorn steps, hc_eps 1e-6,
    #   swiglu_limit 10, one MTP layer), which are also transformers' Glm5NextTextConfig defaults except
    #   index_kpool (16 there); layer_types: KDA except every 4th layer from layer 3 (34 KDA, 11 MLA). Token ids as
    #   GLM-5's (the same tokenizer). The MTP layer is not modelled for glm5_next (num_mtp_layers 0).
    "glm-5.3-flash": dict(vocab_size=154880, hidden_size=4096, ffn_hidden_size=12288, num_layers=45, num_heads=64,
                          num_kv_heads=64, attention_type="mla", q_lora_rank=1536, kv_lora_rank=512,
                          qk_nope_head_dim=256, qk_rope_head_dim=0, v_head_dim=256, rotary_fraction=1.0,
                          norm_eps=1e-5, max_seq_len=1048576, qkv_bias=False, n_routed_experts=288,
                          num_experts_per_tok=8, n_shared_experts=1, moe_intermediate_size=2048,
                          first_k_dense_replace=3, n_group=1, topk_group=1, norm_topk_prob=True,
                          routed_scaling_factor=2.5, index_topk=2048, index_n_heads=32, index_head_dim=128,
                          index_kpool=4, layer_types=tuple("indexed_attention" if i % 4 == 3 else "linear_attention"
                                                           for i in range(45)),
                          linear_num_heads=64, linear_head_dim=128, linear_conv_kernel=4, linear_lower_bound=-5.0,
                          hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, pad_token_id=154820,
                          eos_token_ids=(154820, 154827, 154829), dtype="bfloat16", param_dtype="bfloat16"),
    # A small glm5_next for tests: every layer kind (dense and MoE KDA, full and "shared" indexed MLA), pooled
    # indexer keeping 4 pools of 2 keys, 4 hyper-connection streams, KDA chunks of 8 tokens.
    "glm5-next-test": dict(vocab_size=512, hidden_size=64, ffn_hidden_size=160, num_layers=5, num_heads=4,
                           attention_type="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                           qk_rope_head_dim=0, v_head_dim=16, rotary_fraction=1.0, max_seq_len=256, qkv_bias=False,
                           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                           first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                           index_topk=8, index_n_heads=4, index_head_dim=16, index_kpool=2, dsa_block=16,
                           layer_types=("linear_attention", "indexed_attention", "indexed_attention",
                                        "linear_attention", "indexed_attention"),
                           indexer_types=("full", "full", "shared", "full", "full"),
                           linear_num_heads=2, linear_head_dim=16, kda_chunk_size=8, hc_mult=4, swiglu_limit=10.0),
    # A small DSA model for tests: glm-mla-test's layout plus an indexer that keeps 8 keys per query.
    "glm-dsa-test": dict(vocab_size=512, hidden_size=64, ffn_hidden_size=160, num_layers=3, num_heads=4,
                         attention_type="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16, rotary_fraction=1.0, max_seq_len=256, qkv_bias=False,
                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                         index_topk=8, index_n_heads=4, index_head_dim=16, dsa_block=16),
}
