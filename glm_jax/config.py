"""GLMConfig: one frozen dataclass describing a GLM v2 model (ChatGLM2/3, GLM-4).

It reads and writes the two config.json dialects found in the wild: THUDM's ``model_type: "chatglm"``
(shipped with the official checkpoints) and transformers' ``model_type: "glm"`` / ``"glm4"``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The one list of each option: GLMConfig, the train config schema, the model and the scripts all read these.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")  # glm_jax/model/glm.py maps them to jax policies
DTYPES = ("float32", "bfloat16", "float16")


def read_json_object(file: str | Path) -> dict[str, Any]:
    """The JSON object in `file` (a checkpoint's config.json). A file that cannot be read or parsed raises one
    ValueError naming it and the position of the JSON error (FileNotFoundError if it does not exist)."""
    file = Path(file)
    try:
        raw = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{file}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{file}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


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
        def fail(msg):
            raise ValueError(f"GLMConfig: {msg}")

        for f in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, f)) <= 0:
                fail(f"{f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            fail(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            fail(f"rotary_fraction={self.rotary_fraction} gives an invalid rotary dim for head_dim={self.head_dim}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail(f"attention_impl={self.attention_impl!r}, expected one of {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            fail(f"remat_policy={self.remat_policy!r}, expected one of {REMAT_POLICIES}")
        if not 1 <= int(self.scan_unroll):
            fail(f"scan_unroll={self.scan_unroll}, expected a positive number of blocks per scan iteration")
        if self.quantization_bit not in (0, 4, 8):
            fail(f"quantization_bit={self.quantization_bit}, expected 0, 4 or 8")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                fail(f"{f}={getattr(self, f)!r}, expected float32, bfloat16 or float16")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "GLMConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embedding: bool = True) -> int:
        h, f, l = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + (q + 2 * kv) * self.qkv_bias + q * h
        block = attn + 3 * h * f + h * (4 if self.sandwich_norm else 2)
        emb = 2 * self.vocab_size * h if include_embedding else 0
        return l * block + h + emb

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style: 6*N plus attention.

        N excludes the input embedding (a gather, not a matmul) but includes the output projection.
        Attention adds 12 * L * seq * heads * head_dim (QK^T and PV, forward+backward, full causal square
        counted like PaLM / MaxText do).
        """
        n = self.num_params(include_embedding=False) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_layers * seq_len * self.num_heads * self.head_dim
        return 6 * n + attn

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
        model_type = raw.get("model_type")

        def need(key):
            if key not in raw:
                raise KeyError(f"{source}: missing key {key!r} for model_type {model_type!r}")
            return raw[key]

        eos = raw.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else (2,))
        dtype = {"float16": "float16", "bfloat16": "bfloat16"}.get(raw.get("torch_dtype") or raw.get("dtype"), "float32")
        if model_type == "chatglm":
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
            kw = dict(
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
                eos_token_ids=eos,
                dtype=dtype,
                param_dtype=dtype,
                num_labels=raw.get("num_labels", 2),
            )
        elif model_type in ("glm", "glm4"):
            rope = raw.get("rope_parameters") or {}
            theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
            fraction = raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
            if raw.get("tie_word_embeddings"):
                raise ValueError(f"{source}: tie_word_embeddings=true is not a GLM layout")
            heads = need("num_attention_heads")
            kw = dict(
                vocab_size=need("vocab_size"),
                hidden_size=need("hidden_size"),
                ffn_hidden_size=need("intermediate_size"),
                num_layers=need("num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or need("hidden_size") // heads,
                rotary_fraction=float(fraction),
                rope_theta=float(theta),
                norm_eps=raw.get("rms_norm_eps", 1e-5),
                max_seq_len=raw.get("max_position_embeddings", 8192),
                qkv_bias=bool(raw.get("attention_bias", True)),
                sandwich_norm=model_type == "glm4",
                pad_token_id=raw.get("pad_token_id"),
                eos_token_ids=eos,
                dtype=dtype,
                param_dtype=dtype,
                num_labels=raw.get("num_labels", len(raw.get("id2label") or {}) or 2),
            )
        else:
            raise ValueError(f"{source}: unknown model_type {model_type!r} (expected 'chatglm', 'glm' or 'glm4')")
        return cls(**{**kw, **overrides})

    def to_hf_dict(self, format: str = "transformers") -> dict[str, Any]:
        """config.json contents for `format` "thudm" (model_type chatglm) or "transformers" (glm / glm4)."""
        torch_dtype = self.param_dtype
        if format == "thudm":
            if self.sandwich_norm:
                raise ValueError("the THUDM chatglm format has no sandwich norms; save glm4 models as format='transformers'")
            if self.rotary_fraction != 0.5:
                raise ValueError("the THUDM chatglm format fixes rotary_fraction at 0.5")
            rope_ratio = self.rope_position_divisor if self.rope_position_divisor != 1.0 else self.rope_theta / 10000.0
            return {
                "model_type": "chatglm",
                "architectures": ["ChatGLMModel"],
                # chatglm2 in the name selects the position-dividing rope_ratio meaning on reload.
                "_name_or_path": "chatglm2-6b-32k" if self.rope_position_divisor != 1.0 else (self.name or "glm_jax"),
                "add_bias_linear": False,
                "add_qkv_bias": self.qkv_bias,
                "apply_query_key_layer_scaling": True,
                "apply_residual_connection_post_layernorm": False,
                "attention_dropout": 0.0,
                "attention_softmax_in_fp32": True,
                "bias_dropout_fusion": True,
                "ffn_hidden_size": self.ffn_hidden_size,
                "fp32_residual_connection": False,
                "hidden_dropout": 0.0,
                "hidden_size": self.hidden_size,
                "kv_channels": self.head_dim,
                "layernorm_epsilon": self.norm_eps,
                "multi_query_attention": self.num_kv_heads != self.num_heads,
                "multi_query_group_num": self.num_kv_heads,
                "num_attention_heads": self.num_heads,
                "num_layers": self.num_layers,
                "original_rope": True,
                "padded_vocab_size": self.vocab_size,
                "post_layer_norm": True,
                "rmsnorm": True,
                "rope_ratio": rope_ratio,
                "pre_seq_len": self.pre_seq_len or None,
                "prefix_projection": False,
                "seq_length": self.max_seq_len,
                "use_cache": True,
                "torch_dtype": torch_dtype,
                "pad_token_id": self.pad_token_id,
                "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
                "tie_word_embeddings": False,
            }
        if format == "transformers":
            if self.rope_position_divisor != 1.0:
                raise ValueError("transformers' glm has no position-dividing rope (ChatGLM2-32K); save as format='thudm'")
            if self.pre_seq_len:
                raise ValueError("transformers' glm has no P-tuning prefix; save as format='thudm'")
            return {
                "model_type": "glm4" if self.sandwich_norm else "glm",
                "architectures": ["Glm4ForCausalLM" if self.sandwich_norm else "GlmForCausalLM"],
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.ffn_hidden_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "partial_rotary_factor": self.rotary_fraction,
                "rope_theta": self.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                    "partial_rotary_factor": self.rotary_fraction},
                "rms_norm_eps": self.norm_eps,
                "max_position_embeddings": self.max_seq_len,
                "attention_bias": self.qkv_bias,
                "attention_dropout": 0.0,
                "tie_word_embeddings": False,
                "pad_token_id": self.pad_token_id,
                "eos_token_id": list(self.eos_token_ids),
                "num_labels": self.num_labels,
                "torch_dtype": torch_dtype,
            }
        raise ValueError(f"unknown checkpoint format {format!r} (expected 'thudm' or 'transformers')")


_CHATGLM = dict(vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_heads=32,
                num_kv_heads=2, head_dim=128, norm_eps=1e-5, pad_token_id=0, dtype="bfloat16", param_dtype="bfloat16")
_GLM4 = dict(_CHATGLM, vocab_size=151552, num_layers=40, norm_eps=1.5625e-7, rope_theta=5e6, max_seq_len=131072,
             pad_token_id=151329, eos_token_ids=(151329, 151336, 151338))

PRESETS: dict[str, dict[str, Any]] = {
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
}
