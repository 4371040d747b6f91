"""The GLM decoder: the dense line (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B, GLM-4-0414's sandwich-norm variant) and
the mixture-of-experts line (glm4_moe: GLM-4.5, GLM-4.5-Air, GLM-4.6), one model whose config picks the block
variants (as MaxText's decoder does).

    h   = x + Attn(RMSNorm_in(x))            [glm4: + RMSNorm(Attn(...)) instead]
    out = h + FFN(RMSNorm_post(h))           [glm4: + RMSNorm(FFN(...)) instead]

FFN is the dense SwiGLU MLP, or (layers first_k_dense_replace.. of a MoE config) the MoE layer of
layers/moe.py. Attention optionally RMS-normalises each query / key head (use_qk_norm) and rotates the first
rotary_dim dims in GLM's interleaved layout or in the split-half NeoX layout of glm4_moe (rope_interleaved).

The layer scan stacks identical blocks, so the blocks run as up to two scans (`nn.scan`, one compiled block
each, parameters stacked on a leading "layers" axis): "layers" = the dense-MLP blocks (all L of a dense model,
the first first_k_dense_replace of a MoE one), then "moe_layers" = the MoE blocks. The one decode cache spans
all L layers; each block writes its global layer index. Then a final RMSNorm and an untied output projection
(cfg.scan_layers=False: blocks model/layers_0 ... layers_{L-1} with their own unstacked weights, see
`unstack_layers`). Parameter tree of GLMForCausalLM:

    model/embed/embedding                         [vocab, embed]
    model/layers/input_norm/scale                 [L, embed]
    model/layers/attention/{query,key,value}/kernel,bias   [L, embed, heads, head_dim], [L, heads, head_dim]
    model/layers/attention/{query,key}_norm/scale [L, head_dim]                 (use_qk_norm)
    model/layers/attention/out/kernel             [L, heads, head_dim, embed]
    model/layers/post_attention_norm/scale        [L, embed]
    model/layers/mlp/wi/kernel                    [L, embed, 2, mlp]   (gate, up)
    model/layers/mlp/wo/kernel                    [L, mlp, embed]
    model/moe_layers/...                          [L_moe, ...] as model/layers, with mlp = the MoE layer:
        mlp/router/kernel, mlp/router/e_score_correction_bias, mlp/experts/{wi,wo}, mlp/shared_experts/{wi,wo}
    model/mtp/{enorm,hnorm,shared_head_norm}/scale, model/mtp/eh_proj/kernel, model/mtp/block/...
                                                  [num_mtp_layers, ...]   the MTP layers (MTPHead runs them)
    model/final_norm/scale                        [embed]
    model/prefix                                  [L, 2, pre_seq_len, kv_heads, head_dim]   (P-tuning v2 only)
    lm_head/kernel                                [embed, vocab]

Decode cache ("cache" collection, `init_cache`): model/cached_key and model/cached_value [L, batch, max_len,
kv_heads, head_dim] (carried through the layer scans and updated in place; an MLA model, attention_type "mla",
has model/cached_latent [L, batch, max_len, kv_lora_rank + qk_rope_head_dim] instead: docs/mla.md), model/index (next write slot),
model/segment_ids [batch, max_len] (0 = pad / empty) and model/position [batch] (each row's next position).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.config import REMAT_POLICIES, GLMConfig
from glm_jax.model.layers import MLP, Attention, Embed, Linear, MoE, RMSNorm, rotary_cos_sin
from glm_jax.model.layers.norms import LayerNorm
from glm_jax.model.layers import kv_cache as kv_cache_lib
from glm_jax.model.layers.embeddings import positions_from_segments
from glm_jax.model.layers.hyper import HyperConnection, merge as hc_merge
from glm_jax.model.layers.importance import COLLECTION as IMPORTANCE, record, sum_squares
from glm_jax.model.layers.kda import KDA
from glm_jax.model.layers.kv_cache import PagedIndex
from glm_jax.model.layers.mla import LATENT_NORM_EPS, MLA, softmax_scale, yarn_cos_sin
from glm_jax.platforms import current_platform

JAX_REMAT_POLICIES = {  # GLMConfig.remat_policy -> what each block keeps for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
assert set(JAX_REMAT_POLICIES) == set(REMAT_POLICIES) - {"none"}

BATCH_SEQ_EMBED = ("activation_batch", "activation_length", "activation_embed")
STREAMS_AXES = ("activation_batch", "activation_length", None, "activation_embed")  # hyper-connection streams
# ChatGLM-6B's residual scale, sqrt(2 * 28): THUDM's GLMBlock computes sqrt(2 * num_layers) from its own
# `num_layers` argument, which ChatGLMModel never passes, so its default 28 holds for any depth.
CHATGLM_V1_ALPHA = (2 * 28) ** 0.5


def combine_segments(attention_mask, segment_ids):
    """Segment ids (0 = padding) from an attention mask and/or explicit segment ids; None when neither is given."""
    if segment_ids is None and attention_mask is None:
        return None
    seg = jnp.ones_like(attention_mask, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if attention_mask is not None:
        seg = jnp.where(attention_mask.astype(bool), seg, 0)
    return seg


class DecoderBlock(nn.Module, kw_only=True):
    cfg: GLMConfig
    decode: bool = False
    prefill: bool = False
    moe: bool = False  # the MoE layer instead of the dense MLP (glm4_moe's layers first_k_dense_replace..)
    linear: bool = False  # glm5_next: Kimi delta attention (layers/kda.py) instead of MLA + DSA
    full: bool | None = None  # glm5_next: this MLA layer runs its own indexer (False: reuses the previous layer's)

    @nn.compact
    def __call__(self, carry, ctx: dict, per_layer: dict):
        """carry: (x, kv_cache): all layers' (keys, values) while decoding, else None; a DSA model with "shared"
        indexer layers carries a third item, the previous layer's top-k selection (docs/dsa.md). ctx: what every
        block shares (cos, sin, positions, q_segments, kv_segments, cache_index); per_layer: this block's `layer`
        index, P-tuning `prefix` (or None) and, with shared layers, `full` (whether it runs its own indexer). Two
        named bundles, so the layer scan binds nothing by position. With hyper-connections (cfg.hc_mult, glm5_next)
        x is the residual streams [B, S, hc_mult, embed] (layers/hyper.py)."""
        x, kv_cache, *chosen = carry
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def norm(name):
            return make_norm(cfg, name)

        def hyper(name):
            return HyperConnection(hc_mult=cfg.hc_mult, sinkhorn_iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps,
                                   norm_eps=cfg.norm_eps, param_dtype=param_dtype, name=name)

        x = nn.with_logical_constraint(x, STREAMS_AXES if cfg.hc_mult else BATCH_SEQ_EMBED)
        h_in = x
        if cfg.hc_mult:
            post, comb, h_in = hyper("attn_hc")(x)
        attn_in = norm("input_norm")(h_in)
        h, kv_cache, chosen = self.attention(attn_in, kv_cache, chosen, ctx, per_layer)
        if cfg.sandwich_norm:
            h = norm("post_self_attn_norm")(h)
        if cfg.position_encoding_2d:  # ChatGLM-6B scales the normed input, not x (THUDM's GLMBlock)
            x = attn_in * CHATGLM_V1_ALPHA + h
        else:
            x = hc_merge(post, comb, h, x) if cfg.hc_mult else x + h
        if self.moe:
            ffn = MoE(hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
                      num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                      n_shared_experts=cfg.n_shared_experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
                      norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
                      impl=cfg.moe_impl, swiglu_limit=cfg.swiglu_limit, dtype=dtype, param_dtype=param_dtype,
                      name="mlp")
        else:
            ffn = MLP(hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size, swiglu_limit=cfg.swiglu_limit,
                      dtype=dtype, param_dtype=param_dtype, quantization_bit=cfg.quantization_bit,
                      gelu=cfg.position_encoding_2d, name="mlp")
        h_in = x
        if cfg.hc_mult:
            post, comb, h_in = hyper("ffn_hc")(x)
        ffn_in = norm("post_attention_norm")(h_in)
        # each hidden channel's energy at the normed inputs of both sublayers (Minitron's width score)
        record(self, "embed_channels", lambda: sum_squares(attn_in) + sum_squares(ffn_in))
        if self.moe:  # padding (segment 0) is routed like any token but not counted in the expert load
            seg = ctx["q_segments"]
            h = ffn(ffn_in, token_mask=None if seg is None else seg > 0)
        else:
            h = ffn(ffn_in)
        if cfg.sandwich_norm:
            h = norm("post_mlp_norm")(h)
        if cfg.position_encoding_2d:
            x = ffn_in * CHATGLM_V1_ALPHA + h
        else:
            x = hc_merge(post, comb, h, x) if cfg.hc_mult else x + h
        record(self, "block_influence", lambda: block_influence(carry[0], x))
        return (nn.with_logical_constraint(x, STREAMS_AXES if cfg.hc_mult else BATCH_SEQ_EMBED), kv_cache,
                *chosen), None

    def attention(self, x, kv_cache, chosen, ctx: dict, per_layer: dict):
        """The block's attention on its normed input: (output [B, S, embed], kv_cache, chosen)."""
        cfg = self.cfg
        if cfg.is_glm5_next and kv_cache is not None:  # its MLA layers' buffers first, then its KDA layers'
            n = mla_buffers(cfg)
            mla_cache, kda_cache = kv_cache[:n], kv_cache[n:]
        else:
            mla_cache, kda_cache = kv_cache, None
        if self.linear:  # glm5_next's KDA layers
            out, kda_cache = KDA(
                hidden_size=cfg.hidden_size, num_heads=cfg.linear_num_heads, head_dim=cfg.linear_head_dim,
                conv_kernel=cfg.linear_conv_kernel, lower_bound=cfg.linear_lower_bound, chunk_size=cfg.kda_chunk_size,
                norm_eps=cfg.norm_eps, decode=self.decode, dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), name="attention")(
                x, ctx["q_segments"], kda_cache, per_layer["layer"], ctx["cache_index"])
            return out, None if kv_cache is None else mla_cache + kda_cache, chosen
        if cfg.is_mla:  # glm4_moe_lite: multi-head latent attention (layers/mla.py, docs/mla.md)
            full = per_layer.get("full") if self.full is None else self.full
            shared = {"full": full, "chosen": chosen[0]} if chosen else {}
            out, mla_cache, *chosen = mla_attention(cfg, self.decode, self.prefill)(
                x, ctx["cos"], ctx["sin"], ctx["q_segments"], ctx["kv_segments"], ctx["cache_index"], mla_cache,
                per_layer["layer"], positions=ctx.get("positions"), **shared)
            return out, mla_cache if kda_cache is None else mla_cache + kda_cache, chosen
        out, kv_cache = Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            hidden_size=cfg.hidden_size, use_bias=cfg.qkv_bias, attention_impl=cfg.attention_impl,
            decode=self.decode, prefill=self.prefill, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype), quantization_bit=cfg.quantization_bit,
            max_segments=cfg.max_segments, rope_interleaved=cfg.rope_interleaved, qk_norm=cfg.use_qk_norm,
            norm_eps=cfg.norm_eps, rotary_2d=cfg.position_encoding_2d, out_bias=cfg.position_encoding_2d,
            name="attention")(
            x, ctx["cos"], ctx["sin"], ctx["q_segments"], ctx["kv_segments"], ctx["cache_index"], per_layer["prefix"],
            kv_cache, per_layer["layer"], ctx.get("context_len"))
        return out, kv_cache, chosen


def make_norm(cfg: GLMConfig, name: str):
    """The model's normalisation: RMSNorm, or ChatGLM-6B's LayerNorm."""
    kind = LayerNorm if cfg.position_encoding_2d else RMSNorm
    return kind(eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name)


def glm_positions(cfg: GLMConfig, input_ids, segments=None):
    """ChatGLM-6B's positions from the ids (THUDM's get_position_ids / get_masks), per row: the context ends at
    the first <sop> (bos_token_id; the whole row without one); tokens from there on take the position of the
    first [gMASK], else the first [MASK], and block positions 1, 2, ...; the context before them is 0, 1, ...
    with block position 0. Left padding (segment id 0 before the row's first token) is not counted, as THUDM's
    tokenizer pads the positions of the unpadded row. Returns (position_ids, block_position_ids, context_len
    [batch] (a slot index), mask position [batch])."""
    batch, seq = input_ids.shape
    idx = jnp.arange(seq, dtype=jnp.int32)[None]
    start = jnp.zeros((batch, 1), jnp.int32) if segments is None else jnp.argmax(segments > 0, -1)[:, None]

    def first(token):
        hit = input_ids == token
        return jnp.where(hit.any(-1), jnp.argmax(hit, -1), -1).astype(jnp.int32)[:, None]

    bos, gmask = first(cfg.bos_token_id), first(cfg.gmask_token_id)
    context_len = jnp.where(bos >= 0, bos, seq)
    mask_at = jnp.where(gmask >= 0, gmask, first(cfg.mask_token_id)) - start
    positions, blocks = positions_2d(idx, context_len, mask_at, start)
    return positions, blocks, context_len[:, 0], mask_at[:, 0]


def prompt_context(cfg: GLMConfig, prompt: Sequence[int]) -> tuple[int, int]:
    """`glm_positions`' rule for one unpadded prompt on the host (the serving engine's per-request index): its
    context end (its first <sop>, else its length) and mask position (its first [gMASK], else its first [MASK],
    else -1)."""
    prompt = list(prompt)

    def first(token):
        return prompt.index(token) if token in prompt else -1

    sop, gmask = first(cfg.bos_token_id), first(cfg.gmask_token_id)
    return (sop if sop >= 0 else len(prompt)), (gmask if gmask >= 0 else first(cfg.mask_token_id))


def positions_2d(slots, context_len, mask_at, start=0):
    """(position ids, block position ids) of token slots: from the context end on, the mask's position and 1, 2,
    ...; before it, the slot (less the row's left padding `start`) and 0."""
    generated = slots >= context_len
    return (jnp.maximum(jnp.where(generated, mask_at, slots - start), 0),
            jnp.where(generated, slots - context_len + 1, 0))


def block_influence(x_in, x_out):
    """[2]: (sum over tokens of 1 - cos(x_in, x_out), tokens): how much a block changes its input (ShortGPT's
    block influence; a low value marks a block that can go). Hyper-connection streams count as one vector."""
    a, b = (v.reshape(*v.shape[:2], -1).astype(jnp.float32) for v in (x_in, x_out))
    cos = jnp.sum(a * b, -1) * jax.lax.rsqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1) + 1e-12)
    return jnp.stack([jnp.sum(1.0 - cos), jnp.float32(cos.size)])


def mla_attention(cfg: GLMConfig, decode: bool, prefill: bool) -> MLA:
    """The MLA module of a glm4_moe_lite block (docs/mla.md)."""
    return MLA(num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, q_lora_rank=cfg.q_lora_rank,
               kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
               qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, use_bias=cfg.qkv_bias,
               rope_interleaved=cfg.rope_interleaved, attention_impl=cfg.attention_impl,
               max_segments=cfg.max_segments, decode=decode, prefill=prefill, dtype=jnp.dtype(cfg.dtype),
               index_topk=cfg.index_topk, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
               dsa_block=cfg.dsa_block, index_kpool=cfg.index_kpool, index_kpool_tail=cfg.index_kpool_tail,
               latent_norm_eps=cfg.norm_eps if cfg.is_glm5_next else LATENT_NORM_EPS,
               param_dtype=jnp.dtype(cfg.param_dtype), softmax_scale=softmax_scale(cfg.head_dim, cfg.rope_scaling_params),
               name="attention")


def cache_shapes(cfg: GLMConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """The per-layer key/value buffers of the decode cache, all layers stacked: GQA keeps keys and values of the
    KV groups; MLA (docs/mla.md) one [latent ; rotary key] row of kv_lora_rank + qk_rope_head_dim per token;
    glm5_next its MLA layers' rows and, for its KDA layers, a fixed-size state per row (docs/glm5-next.md)."""
    if cfg.is_glm5_next:  # MLA + DSA layers as glm_moe_dsa (plus the pooling logits), then the KDA layers' state
        mla, kda, h, d = cfg.num_layers - cfg.num_kda_layers, cfg.num_kda_layers, cfg.linear_num_heads, cfg.linear_head_dim
        shapes = {}
        if mla:
            shapes = {"cached_latent": (mla, batch, max_len, cfg.kv_lora_rank),
                      "cached_index_key": (mla, batch, max_len, cfg.index_head_dim)}
            if cfg.index_kpool > 1:
                shapes["cached_index_gate"] = (mla, batch, max_len, cfg.index_head_dim)
        if kda:
            shapes.update(kda_state=(kda, batch, h, d, d), kda_conv=(kda, batch, cfg.linear_conv_kernel - 1, 3, h, d))
        return shapes
    if cfg.is_dsa:  # glm_moe_dsa: MLA's latent plus the DSA indexer's key of every token (docs/dsa.md)
        return {"cached_latent": (cfg.num_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                "cached_index_key": (cfg.num_layers, batch, max_len, cfg.index_head_dim)}
    if cfg.is_mla:
        return {"cached_latent": (cfg.num_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)}
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"cached_key": shape, "cached_value": shape}


STATE_BUFFERS = ("kda_state", "kda_conv")  # a fixed size per sequence: per row / decode slot, never paged


def mla_buffers(cfg: GLMConfig) -> int:
    """glm5_next: how many of the decode cache's buffers (in `cache_shapes` order) are its MLA layers'; the rest
    are its KDA layers'."""
    if cfg.num_kda_layers == cfg.num_layers:
        return 0
    return 3 if cfg.index_kpool > 1 else 2


def cache_dtype(cfg: GLMConfig, name: str):
    """The dtype of decode-cache buffer `name`: KDA's recurrent state accumulates in fp32, the rest is cfg.dtype,
    except on CPU, where a bf16 / fp16 cache is kept in fp32: XLA's CPU backend has no 16-bit float scatter or
    dynamic-update-slice and converts the whole buffer around each write (one token into an 8-layer 134 MB bf16
    pool: 111 ms, in fp32 0.01 ms; docs/serving.md)."""
    if name == "kda_state" or (current_platform() == "cpu" and jnp.dtype(cfg.dtype).itemsize < 4):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(cfg.dtype)


class MTPLayer(nn.Module, kw_only=True):
    """One multi-token-prediction layer of a glm4_moe / glm4_moe_lite / glm_moe_dsa checkpoint (DeepSeek-V3's MTP
    module, as vLLM / SGLang run GLM-4.5's; docs/mtp.md): h' = block(eh_proj([enorm(embed(x[t+1])) ; hnorm(h[t])])),
    logits' = lm_head(shared_head_norm(h')). Its embedding and output head are the model's own (`MTPHead`)."""

    cfg: GLMConfig
    decode: bool = False

    @nn.compact
    def __call__(self, carry, ctx: dict, embeds):
        """carry: (hidden [batch, seq, embed]: the previous depth's hidden states (the main model's output after
        its final norm, or the previous MTP depth's block output), kv_cache: this depth's (keys, values) / latent
        buffers while decoding, else None); embeds: embeddings of the tokens one step ahead. Returns ((new hidden,
        kv_cache), new hidden after shared_head_norm)."""
        hidden, kv_cache = carry
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        def norm(name):
            return RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)

        both = jnp.stack([norm("enorm")(embeds), norm("hnorm")(hidden)], axis=-2)  # [B, S, 2, embed]
        h = Linear(features=(cfg.hidden_size,), kernel_axes=(None, "embed", None), n_in=2, dtype=dtype,
                   param_dtype=param_dtype, name="eh_proj")(both)
        (h, kv_cache), _ = DecoderBlock(cfg=cfg, decode=self.decode, moe=True, name="block")(
            (h, kv_cache), ctx, {"layer": jnp.int32(0), "prefix": None})
        return (h, kv_cache), norm("shared_head_norm")(h)


class MTPStack(nn.Module):
    """The model's embedding and its MTP layers, chained: depth d reads depth d-1's hidden states and the
    embeddings of the tokens d+1 steps ahead (`ahead` [depths, batch, seq]). Named "model" inside `MTPHead`, so
    that its parameters are GLMForCausalLM's model/embed and model/mtp."""

    cfg: GLMConfig
    decode: bool = False

    @nn.compact
    def __call__(self, hidden, ahead, ctx: dict, kv_cache=None):
        cfg = self.cfg
        embeds = Embed(vocab_size=cfg.vocab_size, features=cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.dtype(cfg.param_dtype), name="embed")(ahead)
        layers = nn.scan(MTPLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, 0), length=cfg.num_mtp_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        (hidden, kv_cache), normed = layers(cfg=cfg, decode=self.decode, name="mtp")((hidden, kv_cache), ctx, embeds)
        return normed, hidden, kv_cache


class MTPHead(nn.Module):
    """Multi-token prediction with a GLMForCausalLM's parameters (apply it with the same params tree: it reads
    model/embed, model/mtp and lm_head). For each position t, depth d (d = 0 .. num_mtp_layers - 1) predicts token
    t + d + 2 from the main model's final hidden state at t (`GLMForCausalLM(..., return_hidden=True)`) and the
    tokens t + 1 .. t + d + 1 (docs/mtp.md).

    Returns (logits, the last depth's block output (before shared_head_norm: what a next draft step reads),
    kv_cache); with `return_hidden=True` the shared_head_norm'd states [depths, batch, seq, embed] in place of the
    logits (for a loss that projects onto the vocabulary itself).
    Training: `apply(params, hidden, input_ids, segment_ids=...)`: logits [depths, batch, seq, vocab]; positions
    whose tokens ahead run past the row (or its document) are for the caller to mask.
    Speculative decoding: `tokens` [batch, seq] are the next tokens themselves and `paged` / `kv_cache` the MTP
    layer's own paged cache (`init_paged_mtp_cache`), one depth (num_mtp_layers=1): logits [1, batch, seq, vocab].
    """

    cfg: GLMConfig

    @nn.compact
    def __call__(self, hidden, tokens, segment_ids=None, paged: PagedIndex | None = None, kv_cache=None,
                 return_hidden: bool = False):
        cfg = self.cfg
        batch, seq = tokens.shape[-2:]
        if paged is not None:
            q_segments = paged.query_valid(seq).astype(jnp.int32)
            ctx_segments = (q_segments, paged.key_segments(kv_cache[0].shape[2], seq))
            positions, ahead = paged.positions(seq), tokens.reshape(1, batch, seq)
        else:
            q_segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
            ctx_segments = (q_segments, q_segments)
            positions = (positions_from_segments(q_segments) if q_segments is not None
                         else jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)))
            # depth d reads token t + d + 1 (0 past the row's end: those positions are masked by the caller)
            ahead = jnp.stack([jnp.pad(tokens[:, d + 1:], ((0, 0), (0, d + 1)))
                               for d in range(cfg.num_mtp_layers)])
        cos, sin = rope_cos_sin(cfg, positions, jnp.dtype(cfg.dtype))
        ctx = {"cos": cos, "sin": sin, "q_segments": ctx_segments[0], "kv_segments": ctx_segments[1],
               "cache_index": paged}
        normed, hidden, kv_cache = MTPStack(cfg, decode=paged is not None, name="model")(hidden, ahead, ctx,
                                                                                         kv_cache)
        if return_hidden:
            return normed, hidden, kv_cache
        return output_head(cfg)(normed), hidden, kv_cache


class GLMModel(nn.Module):
    """Embedding, L decoder blocks, final norm. Returns hidden states [batch, seq, hidden]."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None, decode: bool = False,
                 prefill: bool = False, paged: PagedIndex | None = None, block_position_ids=None,
                 context_ends=None):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, seq = input_ids.shape
        q_segments = combine_segments(attention_mask, segment_ids)
        cache = None
        if paged is not None:
            decode, prefill = True, False
            cache, q_segments, kv_segments, position_ids = self.paged_state(paged, seq)
        elif decode:
            cache, q_segments, kv_segments, position_ids = self.decode_state(q_segments, position_ids, batch, seq,
                                                                            prefill)
        else:
            kv_segments = q_segments
            if position_ids is None:
                position_ids = (positions_from_segments(q_segments) if q_segments is not None
                                else jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)))

        embeds = Embed(vocab_size=cfg.vocab_size, features=cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                       name="embed")(input_ids)
        context_len = None
        if cfg.position_encoding_2d:  # ChatGLM-6B: 2D positions and the bidirectional context from the ids
            if paged is not None:
                if paged.context_len is None or paged.mask_position is None:
                    raise ValueError("position_encoding_2d (ChatGLM-6B): the PagedIndex needs each row's "
                                     "context_len and mask_position")
                # the row's whole context is in this call or already in its pages (the engine prefills it in one
                # chunk), so keys before the context end are seen by every query, as in the full forward
                context_len = paged.context_len
                positions, blocks = positions_2d(position_ids, context_len[:, None], paged.mask_position[:, None])
            elif block_position_ids is not None:  # given whole (packed blank-infilling rows: train/blank_infilling.py)
                if position_ids is None or context_ends is None or decode:
                    raise ValueError("block_position_ids: give position_ids and context_ends with them (no decode)")
                positions, blocks, context_len = position_ids, block_position_ids, context_ends
            else:
                positions, blocks, context_len = (
                    self.glm_decode_positions(input_ids, q_segments, cache["index"], prefill) if decode
                    else glm_positions(cfg, input_ids, q_segments)[:3])
            position_ids = positions
            tables = [rope_cos_sin(cfg, p, dtype) for p in (positions, blocks)]
            cos, sin = (jnp.stack([t[i] for t in tables]) for i in (0, 1))
        else:
            cos, sin = rope_cos_sin(cfg, position_ids, dtype)
        ctx = {"cos": cos, "sin": sin, "positions": position_ids, "q_segments": q_segments,
               "kv_segments": kv_segments, "cache_index": None if cache is None else cache["index"],
               "context_len": context_len}
        kv_cache = None if cache is None else tuple(var.value for var in cache["kv"])
        if cfg.hc_mult:  # hyper-connections: every stream starts as the embedding (layers/hyper.py)
            embeds = jnp.broadcast_to(embeds[:, :, None], (batch, seq, cfg.hc_mult, embeds.shape[-1]))
        x, kv_cache = self.blocks(embeds, kv_cache, ctx, decode, prefill)
        if cfg.hc_mult:
            x = jnp.mean(x.astype(jnp.float32), axis=2).astype(x.dtype)
        if cfg.num_mtp_layers and self.is_initializing():
            # Creates model/mtp (stacked over the MTP layers) for MTPHead, which runs them; the output is not used.
            mtp = nn.scan(MTPLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_mtp_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
            mtp(cfg=cfg, name="mtp")((x, None), dict(ctx, kv_segments=ctx["q_segments"], cache_index=None), embeds)
        if decode and not self.is_initializing():
            for var, value in zip(cache["kv"], kv_cache):
                var.value = value
        return make_norm(cfg, "final_norm")(x)

    def decode_state(self, q_segments, position_ids, batch: int, seq: int, prefill: bool):
        """The decode cache's variables and this call's segments and positions. The key/value (or latent) buffers
        of all layers are stacked [L, batch, max_len, ...]; their length is fixed when the cache is created (init
        with input of the cache length). Cache-wide state: the write slot, each slot's segment id (0 = pad /
        empty) and each row's next position. Returns ({"kv": variables, "index": write slot}, q_segments,
        kv_segments, position_ids)."""
        kv_vars = [self.variable("cache", name, jnp.zeros, shape, cache_dtype(self.cfg, name))
                   for name, shape in cache_shapes(self.cfg, batch, seq).items()]
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        slot_segments = self.variable("cache", "segment_ids", jnp.zeros, (batch, seq), jnp.int32)
        next_position = self.variable("cache", "position", jnp.zeros, (batch,), jnp.int32)
        cache_index = index.value
        if q_segments is None:
            q_segments = jnp.ones((batch, seq), jnp.int32)
        all_segments = jax.lax.dynamic_update_slice(slot_segments.value, q_segments, (0, cache_index))
        if position_ids is None:
            position_ids = next_position.value[:, None] + positions_from_segments(q_segments)
        if not self.is_initializing():
            slot_segments.value = all_segments
            next_position.value = position_ids[:, -1].astype(jnp.int32) + 1
            index.value = cache_index + seq
        # A prefill (empty cache) attends within its own tokens; later calls attend over every slot.
        kv_segments = q_segments if prefill else all_segments
        return {"kv": kv_vars, "index": cache_index}, q_segments, kv_segments, position_ids

    def glm_decode_positions(self, input_ids, q_segments, cache_index, prefill: bool):
        """ChatGLM-6B's positions while decoding: the prefill finds the context end and the mask in the prompt
        (`glm_positions`, left padding not counted) and keeps them in the cache; later tokens at slot t take the
        mask's position and block position t - context end + 1, as the whole sequence would give them. The
        bidirectional context matters within the prompt only (later tokens see it causally)."""
        batch, seq = input_ids.shape
        context = self.variable("cache", "context_len", jnp.zeros, (batch,), jnp.int32)
        mask_at = self.variable("cache", "mask_position", jnp.zeros, (batch,), jnp.int32)
        if prefill:
            positions, blocks, context_len, mask_position = glm_positions(self.cfg, input_ids, q_segments)
            if not self.is_initializing():
                context.value, mask_at.value = context_len, mask_position
            return positions, blocks, context_len
        slots = cache_index + jnp.arange(seq, dtype=jnp.int32)[None]
        return (*positions_2d(slots, context.value[:, None], mask_at.value[:, None]), None)

    def paged_state(self, paged: PagedIndex, seq: int):
        """`decode_state` for the paged layout (layers/kv_cache.py): the pool buffers [L, num_pages, page_size, ...]
        must be in the "cache" collection (`init_paged_cache`); segments and positions come from `paged`."""
        kv_vars = [self.variable("cache", name) for name in cache_shapes(self.cfg, 1, 1)]
        q_segments = paged.query_valid(seq).astype(jnp.int32)
        kv_segments = paged.key_segments(kv_vars[0].value.shape[2], seq)
        return {"kv": kv_vars, "index": paged}, q_segments, kv_segments, paged.positions(seq)

    def blocks(self, x, kv_cache, ctx: dict, decode: bool, prefill: bool):
        """The decoder blocks: one nn.scan per layer stack (scan_layers) or separate blocks. ctx is broadcast to
        every block; per_layer (layer index, P-tuning prefix, DSA "full" flag) is sliced along the layers."""
        cfg = self.cfg
        prefix = None
        if cfg.pre_seq_len:
            # P-tuning v2: learned per-layer keys/values in front of every sequence; positions are not shifted.
            prefix = self.param("prefix", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("layers", None, None, "kv_heads", "head_dim")),
                (cfg.num_layers, 2, cfg.pre_seq_len, cfg.num_kv_heads, cfg.head_dim), jnp.dtype(cfg.param_dtype))
        carry, full = (x, kv_cache), None
        if cfg.is_dsa and cfg.indexer_types:  # "shared" indexer layers: the selection travels with the carry
            batch, seq = x.shape[:2]
            t = kv_cache_lib.view_length(kv_cache[0], ctx["cache_index"]) if decode and not prefill else seq
            carry += ((jnp.zeros((batch, seq, selection_width(cfg, t)), jnp.int32),
                       jnp.zeros((batch, seq, selection_width(cfg, t)), bool)),)
            full = jnp.asarray([t == "full" for t in cfg.indexer_types])
        if cfg.is_glm5_next:  # each unit block knows its own indexer kind (`full` is the layer stacks')
            for name, kinds, first, count in hybrid_stacks(cfg):
                unit = nn.scan(HybridUnit, variable_axes={"params": 0, "intermediates": 0, IMPORTANCE: 0},
                               split_rngs={"params": True}, in_axes=(nn.broadcast, 0), length=count,
                               metadata_params={nn.PARTITION_NAME: "layers"})
                local = jnp.asarray([[kind_local_index(cfg, first + u * len(kinds) + j) for j in range(len(kinds))]
                                     for u in range(count)], jnp.int32)
                carry, _ = unit(cfg=cfg, kinds=kinds, repeats=count, decode=decode, prefill=prefill, name=name)(
                    carry, ctx, local)
            return carry[:2]

        def per_layer(first, count=None):  # a scanned stack's slices (count layers), or one block's values
            pick = first if count is None else slice(first, first + count)
            out = {"layer": jnp.int32(first) if count is None else jnp.arange(first, first + count),
                   "prefix": None if prefix is None else prefix[pick]}
            if full is not None:
                out["full"] = full[pick]
            return out

        if cfg.scan_layers:
            for name, moe, first, count in layer_stacks(cfg):
                # "intermediates": what a training step sows per layer (MoE expert load), stacked like params
                layers = nn.scan(remat_block(cfg, count), variable_axes={"params": 0, "intermediates": 0, IMPORTANCE: 0},
                                 split_rngs={"params": True},
                                 in_axes=(nn.broadcast, 0), length=count, unroll=min(cfg.scan_unroll, count),
                                 metadata_params={nn.PARTITION_NAME: "layers"})
                carry, _ = layers(cfg=cfg, decode=decode, prefill=prefill, moe=moe, name=name)(
                    carry, ctx, per_layer(first, count))
        else:  # separate weights per block: nothing is sliced out of a stack at run time
            block = remat_block(cfg, cfg.num_layers)
            for i in range(cfg.num_layers):
                carry, _ = block(cfg=cfg, decode=decode, prefill=prefill, moe=i >= cfg.num_dense_layers,
                                 name=f"layers_{i}")(carry, ctx, per_layer(i))
        return carry[:2]


def selection_width(cfg: GLMConfig, kv_len: int) -> int:
    """K, the keys a DSA query's selection names (layers/dsa.py): top-k keys, or top-k pools of keys plus the
    incomplete tail (glm5_next)."""
    if cfg.index_kpool == 1:
        return min(cfg.index_topk, kv_len)
    pools = min(cfg.index_topk // cfg.index_kpool, max(kv_len // cfg.index_kpool, 1))
    return pools * cfg.index_kpool + (cfg.index_kpool - 1 if cfg.index_kpool_tail else 0)


# glm5_next's block kinds: (KDA attention, MoE FFN, runs its own indexer)
BlockKind = tuple[bool, bool, bool]


def block_kind(cfg: GLMConfig, layer: int) -> BlockKind:
    linear = cfg.is_kda_layer(layer)
    full = linear or not cfg.indexer_types or cfg.indexer_types[layer] == "full"
    return linear, layer >= cfg.num_dense_layers, full


def kind_local_index(cfg: GLMConfig, layer: int) -> int:
    """A glm5_next layer's index among the layers of its attention kind (KDA or MLA): its decode cache slot."""
    return sum(cfg.is_kda_layer(i) == cfg.is_kda_layer(layer) for i in range(layer))


def hybrid_stacks(cfg: GLMConfig, max_unit: int = 8) -> list[tuple[str, tuple[BlockKind, ...], int, int]]:
    """glm5_next's layers as scans of a repeating unit: (name, unit's block kinds, first layer, repeats). Greedy from
    the first layer: the unit of up to `max_unit` blocks that repeats over the most layers (a run of one kind when
    nothing repeats). GLM-5.3-Flash: 3 dense KDA blocks, then (MLA, KDA, KDA, KDA) x 10, then MLA, then KDA: four
    compiled bodies for 45 layers. Unit block j of repeat u is layer first + u * len(unit) + j."""
    kinds = [block_kind(cfg, i) for i in range(cfg.num_layers)]
    stacks, i = [], 0
    while i < len(kinds):
        best = (0, 1)  # (repeats, unit length)
        for p in range(1, min(max_unit, len(kinds) - i) + 1):
            n = 1
            while kinds[i + n * p:i + (n + 1) * p] == kinds[i:i + p]:  # a short tail slice never equals
                n += 1
            if (n >= 2 or p == 1) and n * p > best[0] * best[1]:
                best = (n, p)
        n, p = best
        stacks.append((f"hybrid_{len(stacks)}", tuple(kinds[i:i + p]), i, n))
        i += n * p
    return stacks


class HybridUnit(nn.Module, kw_only=True):
    """One repeat of a glm5_next unit (`hybrid_stacks`): its blocks in order, block_0 .. block_{p-1}. per_layer:
    each block's cache index among its attention kind [p]."""

    cfg: GLMConfig
    kinds: tuple[BlockKind, ...]
    repeats: int = 1  # the scan's length (remat_block's CSE rule)
    decode: bool = False
    prefill: bool = False

    @nn.compact
    def __call__(self, carry, ctx: dict, local):
        for j, (linear, moe, full) in enumerate(self.kinds):
            block = remat_block(self.cfg, self.repeats)
            carry, _ = block(cfg=self.cfg, decode=self.decode, prefill=self.prefill, moe=moe, linear=linear,
                             full=full, name=f"block_{j}")(carry, ctx, {"layer": local[j], "prefix": None})
        return carry, None


def rope_cos_sin(cfg: GLMConfig, position_ids, dtype):
    """cos, sin of the rotary embedding at `position_ids`, shared by every block."""
    if cfg.position_encoding_2d:  # ChatGLM-6B: each half of a head is rotated over all its dims
        return rotary_cos_sin(position_ids, cfg.head_dim // 2, cfg.rope_theta, 1.0, dtype, half_inv_freq=True)
    if cfg.rope_scaling:  # YaRN (MLA models only; docs/mla.md "Rope scaling")
        return yarn_cos_sin(position_ids, cfg.rope_scaling_params, cfg.rotary_dim, cfg.rope_theta, cfg.max_seq_len,
                            dtype)
    return rotary_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, cfg.rope_position_divisor, dtype)


def remat_block(cfg: GLMConfig, count: int):
    """DecoderBlock, rematerialised per cfg.remat_policy. Inside a rolled scan the recomputation cannot be merged
    with the forward pass, so CSE barriers are unnecessary; fully unrolled (scan_unroll >= count), XLA would CSE
    the recomputation away and keep every activation."""
    if cfg.remat_policy == "none":
        return DecoderBlock
    return nn.remat(DecoderBlock, policy=JAX_REMAT_POLICIES[cfg.remat_policy], prevent_cse=cfg.scan_unroll >= count)


def layer_stacks(cfg: GLMConfig) -> list[tuple[str, bool, int, int]]:
    """(name, moe, first layer, count) of each layer scan: "layers" (dense-MLP blocks), then "moe_layers"."""
    stacks = [("layers", False, 0, cfg.num_dense_layers), ("moe_layers", True, cfg.num_dense_layers,
                                                           cfg.num_moe_layers)]
    return [s for s in stacks if s[3]]


class GLMForCausalLM(nn.Module):
    """GLMModel plus the untied output projection. `apply` returns logits [batch, seq, vocab] in `cfg.dtype`.

    Left padding: pass `attention_mask` (1 = token, 0 = pad). Packed sequences: pass `segment_ids` (documents
    numbered from 1, 0 = padding); positions then restart per document unless `position_ids` are given.
    Decoding: `decode=True` with `mutable=["cache"]` and a cache from `init_cache`; the first call on an empty
    cache may pass `prefill=True` (the prompt then attends within itself, with the flash kernels, instead of
    against every cache slot) and `last_logits_only=True` (logits of the last position only: [batch, 1, vocab]).
    Paged decoding (the serving engine): `paged=PagedIndex(...)` with a pool from `init_paged_cache` as the
    "cache" collection and left-padded rows (layers/kv_cache.py). ChatGLM-6B (`position_encoding_2d`) derives its
    2D positions from the ids, or takes them whole for packed blank-infilling rows: `position_ids`,
    `block_position_ids` and `context_ends` (each token's Part A end) with `segment_ids` (train/blank_infilling.py
    `pack`).
    """

    cfg: GLMConfig

    @nn.compact
    def __call__(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None, decode: bool = False,
                 return_hidden: bool = False, prefill: bool = False, last_logits_only: bool = False,
                 paged: PagedIndex | None = None, block_position_ids=None, context_ends=None):
        hidden = GLMModel(self.cfg, name="model")(input_ids, position_ids, attention_mask, segment_ids, decode,
                                                  prefill, paged, block_position_ids, context_ends)
        if return_hidden:  # for losses that chunk the vocabulary projection themselves
            return hidden
        if last_logits_only:
            hidden = hidden[:, -1:]
        logits = output_head(self.cfg)(hidden)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def output_head(cfg: GLMConfig) -> Linear:
    """The untied vocabulary projection "lm_head" of GLMForCausalLM and MTPHead; alone:
    `output_head(cfg).apply({"params": params["lm_head"]}, hidden)`."""
    return Linear(features=(cfg.vocab_size,), kernel_axes=("embed", "vocab"), dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), name="lm_head")


class GLMForSequenceClassification(nn.Module):
    """A bias-free score head on the last non-pad token, as transformers' GlmForSequenceClassification.

    The last token is the rightmost one with attention_mask == 1 / segment id > 0, or, with neither given, the
    rightmost one that is not `cfg.pad_token_id`. Returns logits [batch, num_labels].
    """

    cfg: GLMConfig

    @nn.compact
    def __call__(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None):
        hidden = GLMModel(self.cfg, name="model")(input_ids, position_ids, attention_mask, segment_ids)
        if attention_mask is not None or segment_ids is not None:
            real = combine_segments(attention_mask, segment_ids) > 0
        elif self.cfg.pad_token_id is not None:
            real = input_ids != self.cfg.pad_token_id
        else:
            real = jnp.ones(input_ids.shape, bool)
        last = jnp.argmax(jnp.arange(input_ids.shape[1]) * real, axis=-1)
        pooled = hidden[jnp.arange(input_ids.shape[0]), last]
        return Linear(features=(self.cfg.num_labels,), kernel_axes=("embed", "labels"), dtype=jnp.dtype(self.cfg.dtype),
                      param_dtype=jnp.dtype(self.cfg.param_dtype), name="score")(pooled)


def param_specs(model: nn.Module):
    """Shapes and dtypes of `model`'s parameters, still boxed with their logical axis names: what
    `glm_jax.param_shardings` turns into shardings. Nothing is computed.

    Traced with the xla attention kernel: the kernel does not change the parameters, and this may run outside
    the mesh (e.g. on a CPU host compiling for a TPU slice) where another kernel would only warn and fall back."""
    model = model.clone(cfg=model.cfg.replace(attention_impl="xla"))
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]


def init_params(model: nn.Module, rng, seq_len: int = 8, batch: int = 1):
    """Randomly initialised, unboxed parameters of `model` (sharded: `param_specs` + `param_shardings`)."""
    ids = jnp.zeros((batch, seq_len), jnp.int32)
    return jax.jit(lambda r: nn.unbox(model.init(r, ids))["params"])(rng)


STACKS = ("layers", "moe_layers")  # the layer scans' parameter stacks, in layer order (see layer_stacks)


def unstack_layers(params, *, free_stacked: bool = False):
    """Stacked block parameters (model/layers/... and model/moe_layers/..., leading axis = their layers) -> one
    subtree per block (model/layers_0, ... layers_{L-1}, numbered across both stacks), the layout of
    GLMConfig(scan_layers=False). The slices are copies: both layouts exist until the caller drops the stacked
    tree, unless `free_stacked` (the caller gives the stacked tree up): each stacked array is deleted as soon as
    it is split, so the peak is one array above the tree's size. The MTP layers (model/mtp) stay stacked."""
    def split(x):
        parts = [x[j] for j in range(x.shape[0])]
        if free_stacked and isinstance(x, jax.Array):
            jax.block_until_ready(parts)  # the slices are dispatched asynchronously: done reading x before it goes
            x.delete()
        return parts

    model = dict(params["model"])
    i = 0
    for name in STACKS:
        if name not in model:
            continue
        stacked = model.pop(name)
        n = jax.tree.leaves(stacked)[0].shape[0]
        parts = jax.tree.map(split, stacked)
        for j in range(n):
            model[f"layers_{i}"] = jax.tree.map(lambda p: p[j], parts, is_leaf=lambda p: isinstance(p, list))
            i += 1
    return {**params, "model": model}


def decoding_layout(cfg: GLMConfig, params, *, free_stacked: bool = False):
    """(cfg, params) in the layout decoding runs fastest in: one weight buffer per block (scan_layers=False),
    because a layer scan copies each block's weights out of the stack at every step (MaxText serves with
    scan_layers=false too; measured in docs/serving.md). glm5_next keeps its stacks (its hybrid units scan).
    `free_stacked`: see `unstack_layers`."""
    if not cfg.scan_layers or cfg.is_glm5_next:
        return cfg, params
    return cfg.replace(scan_layers=False), unstack_layers(params, free_stacked=free_stacked)


def stack_layers(params):
    """Inverse of `unstack_layers` (a stacked tree is returned as it is): dense-MLP blocks stack into
    model/layers, MoE blocks (those with an mlp/router) into model/moe_layers."""
    model = dict(params["model"])
    if any(name in model for name in STACKS):
        return params
    names = sorted((k for k in model if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    blocks = [model.pop(k) for k in names]
    is_moe = ["router" in b.get("mlp", {}) for b in blocks]
    if is_moe != sorted(is_moe):
        raise ValueError("stack_layers: MoE blocks must follow the dense-MLP blocks")
    for name, group in (("layers", [b for b, m in zip(blocks, is_moe) if not m]),
                        ("moe_layers", [b for b, m in zip(blocks, is_moe) if m])):
        if group:
            model[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *group)
    return {**params, "model": model}


def cache_specs(model: nn.Module, batch_size: int, max_len: int):
    """Shapes and dtypes of the decode cache for `batch_size` rows of up to `max_len` tokens. Nothing is
    computed."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, max_len), jnp.int32),
                                               decode=True))["cache"]
    return nn.unbox(shapes)


def init_cache(model: nn.Module, batch_size: int, max_len: int):
    """A zeroed KV cache for `batch_size` rows of up to `max_len` tokens (KV groups only, not expanded heads)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_specs(model, batch_size, max_len))


def paged_cache_specs(cfg: GLMConfig, num_pages: int, page_size: int, num_slots: int = 1) -> dict:
    """The paged decode cache's pool ("cache" collection, `paged=`): the buffers of `cache_shapes` with pages in
    place of rows, [L, num_pages, page_size, ...] (GQA keys / values, MLA's latent, DSA's indexer keys), and
    glm5_next's KDA state and convolution inputs with a row per decode slot, [L, num_slots, ...]."""
    shapes = cache_shapes(cfg, num_pages, page_size)
    shapes.update({name: shape for name, shape in cache_shapes(cfg, num_slots, 1).items() if name in STATE_BUFFERS})
    return {"model": {name: jax.ShapeDtypeStruct(shape, cache_dtype(cfg, name)) for name, shape in shapes.items()}}


def init_paged_cache(cfg: GLMConfig, num_pages: int, page_size: int, num_slots: int = 1) -> dict:
    """A zeroed pool for `paged_cache_specs`."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), paged_cache_specs(cfg, num_pages, page_size, num_slots))


def init_paged_mtp_cache(cfg: GLMConfig, num_pages: int, page_size: int) -> tuple:
    """A zeroed pool for one MTP layer (`MTPHead`'s kv_cache while decoding): the buffers of `cache_shapes` for
    one layer, in their order; it shares the page tables of the model's own pool."""
    return tuple(jnp.zeros((1,) + shape[1:], cache_dtype(cfg, name))
                 for name, shape in cache_shapes(cfg, num_pages, page_size).items())
