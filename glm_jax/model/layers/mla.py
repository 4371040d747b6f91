"""Multi-head latent attention (MLA) of glm4_moe_lite (GLM-4.7-Flash; DeepSeek-V2/V3's attention), computing what
transformers' `Glm4MoeLiteAttention` computes. The design is described in docs/mla.md.

    queries   q = q_b(RMSNorm(q_a(x)))      [B, S, N, nope + rope]    (q_lora_rank = 0: q = query(x))
    latent    c ; k_r = kv_a(x)             [B, S, kv_lora] ; [B, S, rope]   c = RMSNorm(c), k_r rotated
    keys      k_n = c @ kv_b[:, :, :nope]   per head, plus the ONE rotary key k_r shared by every head
    values    v = c @ kv_b[:, :, nope:]     [B, T, N, v_head_dim]
    output    out(softmax(q . [k_n ; k_r] * scale) v)        out kernel [N, v_head_dim, embed]

Only the last `rope` dims of each query / key head are rotated (cfg.rope_interleaved: adjacent pairs, transformers'
`rope_interleave=True`; else split halves). scale = (nope + rope) ** -0.5, times YaRN's mscale(factor,
mscale_all_dim)^2 when the config scales the rope that way (`softmax_scale`, `yarn_rope`).

Two equal ways to evaluate it (`expanded_attention`, `absorbed_attention`):
  expanded   keys and values of every head are built from the latents, then any attention kernel runs
             (training, scoring and the prefill of an empty cache: the cuDNN / splash kernels apply).
  absorbed   kv_b's key half is folded into the query (q_lat = q_n @ W_UK^T, [N, kv_lora] per query) and its value
             half into the output, so attention runs over ONE shared key/value head per token: the cached
             [c ; k_r] of kv_lora + rope dims. A decode step reads the cache once and never builds per-head keys
             or values for the T cached tokens.

Decode cache (glm_jax/model/glm.py): `cached_latent` [L, B, max_len, kv_lora + rope] in `dtype`: per token the
normed latent c followed by the rotated k_r. Nothing per head is stored.

Parameters (logical axes; glm_jax/sharding.py maps them):
    q_a/kernel, q_a/bias        [embed, q_lora], [q_lora]            (q_lora_rank > 0; bias when use_bias)
    q_a_norm/scale              [q_lora]
    q_b/kernel                  [q_lora, N, nope + rope]             (q_lora, q_heads, head_dim)
    query/kernel                [embed, N, nope + rope]              (q_lora_rank = 0 instead of q_a / q_b)
    kv_a/kernel, kv_a/bias      [embed, kv_lora + rope]              (embed, kv_lora): latent, then rotary key
    kv_a_norm/scale             [kv_lora]
    kv_b/kernel                 [kv_lora, N, nope + v_head_dim]      (kv_lora, q_heads, head_dim): keys, then values
    out/kernel, out/bias        [N, v_head_dim, embed], [embed]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from glm_jax.model.layers import kv_cache as kv_cache_lib
from glm_jax.model.layers.attention import dot_product_attention, make_mask
from glm_jax.model.layers.dsa import mla_dsa
from glm_jax.model.layers.embeddings import apply_rotary
from glm_jax.model.layers.importance import record, sum_squares
from glm_jax.model.layers.linear import Linear
from glm_jax.model.layers.norms import RMSNorm

# transformers builds q_a_layernorm / kv_a_layernorm with its RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6
HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", None)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_rope(params: dict, rotary_dim: int, theta: float, max_position: int) -> tuple[np.ndarray, float]:
    """YaRN rotary frequencies [rotary_dim // 2] (fp32) and the factor on cos / sin, as transformers'
    `_compute_yarn_parameters` (GLMConfig.rope_scaling; docs/mla.md "Rope scaling"): frequencies interpolated by
    `factor` below the `beta_slow` rotations, kept above `beta_fast`, a linear ramp in between."""
    factor = params.get("factor") or max_position / params["original_max_position_embeddings"]
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                            else _yarn_mscale(factor))
    dim, original = rotary_dim, params["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq.astype(np.float32), float(attention_factor)


def yarn_cos_sin(positions, params: dict, rotary_dim: int, theta: float, max_position: int, dtype):
    """cos / sin tables [B, S, rotary_dim // 2] of YaRN: fp32 angles, times the attention factor, then `dtype`."""
    inv_freq, attention_factor = yarn_rope(params, rotary_dim, theta, max_position)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    af = np.float32(attention_factor)
    return (jnp.cos(angles) * af).astype(dtype), (jnp.sin(angles) * af).astype(dtype)


def softmax_scale(qk_head_dim: int, rope_scaling: dict) -> float:
    """(nope + rope)^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN (transformers' yarn_apply_mscale)."""
    scale = qk_head_dim ** -0.5
    if rope_scaling.get("mscale_all_dim"):
        scale *= _yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
    return scale


class Kernel(nn.Module, kw_only=True):
    """A bare weight `kernel` (for kv_b, which the absorbed path splits and contracts in two different ways)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype).astype(self.dtype)


def expanded_attention(q_nope, q_rope, latent, k_rope, kv_b, q_segments, kv_segments, *, scale: float,
                       impl: str = "xla", max_segments: int = 0):
    """Per-head keys and values from the latents, then `dot_product_attention` (any kernel). q_nope [B, S, N,
    nope], q_rope [B, S, N, rope] (rotated), latent [B, T, kv_lora], k_rope [B, T, rope] (rotated), kv_b
    [kv_lora, N, nope + v]. Returns [B, S, N, v]."""
    nope, n = q_nope.shape[-1], q_nope.shape[2]
    kv = jnp.einsum("btc,cnd->btnd", latent, kv_b)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    b, t, rope = k_rope.shape
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (b, t, n, rope)).astype(k_nope.dtype)], -1)
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], -1)
    # The kernels take one head dim and scale by its rsqrt: pad q / k / v to a common width with zeros (dot
    # products unchanged) and pre-scale q so that the kernel's 1/sqrt(width) becomes `scale`.
    dv, width = v.shape[-1], max(q.shape[-1], v.shape[-1])
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731
    factor = scale * math.sqrt(width)
    if abs(factor - 1.0) > 1e-12:
        q = q * jnp.asarray(factor, q.dtype)
    q = nn.with_logical_constraint(pad(q), HEADS_AXES)
    out = dot_product_attention(q, pad(k), pad(v), q_segments, kv_segments, 0, impl, None, max_segments)
    return out[..., :dv]


def absorbed_attention(q_nope, q_rope, kv, kv_b, mask, *, scale: float):
    """MLA over the latent cache without expanding it. kv [B, T, kv_lora + rope] (latent ; rotary key, as
    cached), kv_b [kv_lora, N, nope + v], mask [B, S, T]. Scores and softmax in fp32. Returns [B, S, N, v]."""
    nope = q_nope.shape[-1]
    rank = kv_b.shape[0]
    w_uk, w_uv = kv_b[..., :nope], kv_b[..., nope:]
    q_lat = jnp.einsum("bsnd,cnd->bsnc", q_nope, w_uk)  # the key up-projection, applied to the query once
    q = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], -1)  # [B, S, N, kv_lora + rope]
    scores = jnp.einsum("bsnc,btc->bnst", q, kv.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None], scores * np.float32(scale), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(kv.dtype)
    ctx = jnp.einsum("bnst,btc->bsnc", probs, kv[..., :rank])  # attention-weighted latents [B, S, N, kv_lora]
    return jnp.einsum("bsnc,cnv->bsnv", ctx.astype(w_uv.dtype), w_uv)  # the value up-projection, per query


class MLA(nn.Module, kw_only=True):
    """glm4_moe_lite's attention (see the module docstring); same call signature as `Attention` minus the
    P-tuning prefix. `cache` is the 1-tuple (cached_latent [L, B, max_len, kv_lora + rope],) of all layers."""

    num_heads: int
    hidden_size: int
    q_lora_rank: int  # 0: a plain query projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float | None = None  # None: (nope + rope) ** -0.5
    use_bias: bool = False  # transformers' attention_bias: q_a, kv_a and out
    rope_interleaved: bool = True
    attention_impl: str = "auto"
    max_segments: int = 0
    decode: bool = False
    prefill: bool = False
    # DSA (glm_moe_dsa, docs/dsa.md): index_topk > 0 adds the indexer; attention then covers its top-k keys only
    # (layers/dsa.py, `mla_dsa`), and decoding caches the indexer keys too: cache = (latent, indexer keys).
    index_topk: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0
    dsa_block: int = 128
    index_kpool: int = 1  # > 1: the indexer scores pools of keys (GLM-5.3-Flash; layers/dsa.py `pool_keys`)
    index_kpool_tail: bool = True
    latent_norm_eps: float = LATENT_NORM_EPS  # glm5_next builds q_a / kv_a norms with rms_norm_eps
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def linear(self, features, axes, name, use_bias=False, n_in=1):
        return Linear(features=features, kernel_axes=axes, n_in=n_in, use_bias=use_bias,
                      bias_axes=axes[n_in:], dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def norm(self, name):
        return RMSNorm(eps=self.latent_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, cos, sin, q_segments=None, kv_segments=None, cache_index=None, cache=None, layer=None,
                 full=True, chosen=None, positions=None):
        """Returns (output [B, S, embed], cache). Decoding writes this layer's new latents into `cache` at
        (layer, cache_index) and, unless prefilling, attends over every slot in the absorbed form. DSA with
        "shared" layers (docs/dsa.md): `chosen` is the previous layer's top-k selection, `full` whether this layer
        selects its own; the call then returns (output, cache, this layer's selection)."""
        n, nope, rope, rank = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        qk = nope + rope
        if self.q_lora_rank:
            q_lat = self.linear((self.q_lora_rank,), ("embed", "q_lora"), "q_a", self.use_bias)(x)
            q_lat = self.norm("q_a_norm")(q_lat)  # also the DSA indexer's input
            q = self.linear((n, qk), ("q_lora", "q_heads", "head_dim"), "q_b")(q_lat)
        else:
            q = self.linear((n, qk), ("embed", "q_heads", "head_dim"), "query")(x)
        q = nn.with_logical_constraint(q, HEADS_AXES)
        q_nope, q_rope = q[..., :nope], apply_rotary(q[..., nope:], cos, sin, self.rope_interleaved)
        compressed = self.linear((rank + rope,), ("embed", "kv_lora"), "kv_a", self.use_bias)(x)
        latent = self.norm("kv_a_norm")(compressed[..., :rank])
        k_rope = apply_rotary(compressed[..., None, rank:], cos, sin, self.rope_interleaved)[:, :, 0]
        kv_b = Kernel(shape=(rank, n, nope + self.v_head_dim), axes=("kv_lora", "q_heads", "head_dim"),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="kv_b")()
        scale = self.softmax_scale or qk ** -0.5

        if self.decode:  # the cache keeps [latent ; rotary key] per token (module docstring)
            new = jnp.concatenate([latent, k_rope.astype(latent.dtype)], -1)
            cache = (kv_cache_lib.write(cache[0], layer, cache_index, new),) + tuple(cache[1:])
        picked = None
        if self.index_topk:
            out, cache, picked = mla_dsa(self, x, q_lat, cos, sin, q_nope, q_rope, latent, k_rope, kv_b, scale,
                                         q_segments, kv_segments, cache_index, cache, layer, full, chosen, positions)
        elif self.decode and not self.prefill:
            kv = kv_cache_lib.read(cache[0], layer, cache_index)  # [B, max_len, kv_lora + rope]
            mask = make_mask(q_segments, kv_segments, x.shape[1], kv.shape[1], kv_cache_lib.query_offset(cache_index))
            out = absorbed_attention(q_nope, q_rope, kv, kv_b, mask, scale=scale)
        else:
            out = expanded_attention(q_nope, q_rope, latent, k_rope, kv_b, q_segments, kv_segments, scale=scale,
                                     impl=self.attention_impl, max_segments=self.max_segments)
        out = nn.with_logical_constraint(out, HEADS_AXES)
        record(self, "head_norms", lambda: sum_squares(out, keep_last=2).sum(-1))  # [heads]: output energy per head
        out = self.linear((self.hidden_size,), ("q_heads", "head_dim", "embed"), "out", self.use_bias, n_in=2)(out)
        return (out, cache) if chosen is None else (out, cache, picked)
