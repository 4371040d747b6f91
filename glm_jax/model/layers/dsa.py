"""DeepSeek sparse attention (DSA) of GLM-5 (transformers `glm_moe_dsa`): an indexer picks, for every query,
the `index_topk` earlier keys it may attend to; the MLA attention then runs over those keys only.

The indexer (`Indexer`, transformers' GlmMoeDsaIndexer) scores key t for query s as

    score[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t] / sqrt(index_head_dim)),   w[s] = weights_proj(x[s]) / sqrt(H)

with q = wq_b(the MLA query latent) (H = index_n_heads heads of index_head_dim), k = LayerNorm(wk(x)) (one head),
both rotated on their first qk_rope_head_dim dims in the interleaved-pair layout. Masked keys (causal, padding)
are never chosen; the top `index_topk` of the rest are. The indexer is not trained by the language-model loss
(transformers runs it under no_grad): its outputs pass through `stop_gradient`. A "shared" layer has no indexer
and attends to the previous layer's selection (`mla_dsa`, docs/dsa.md "Shared indexer layers").

Attention over the chosen keys runs in MLA's absorbed form: one shared key/value head per token (the latent
[kv_lora_rank] followed by the rope key [qk_rope_head_dim]; the values are the latent) and queries already
multiplied into the latent space, so a gather of top-k keys is [q_block, topk, kv_lora_rank + rope] whatever the
number of heads. Two paths (docs/dsa.md):
  dsa_attention_reference  full [S, T] scores and masks (tests only);
  dsa_attention            queries in blocks: per block the indexer's [q_block, T] scores (one matrix, heads
                           already reduced), top-k, a gather of the chosen keys and a softmax over [heads, topk];
                           nothing of size [S, T] per attention head exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from glm_jax.model.layers import kv_cache as kv_cache_lib
from glm_jax.model.layers.attention import causal
from glm_jax.model.layers.embeddings import apply_rotary, positions_from_segments
from glm_jax.model.layers.linear import Linear
from glm_jax.model.layers.norms import LayerNorm

NEG = float(jnp.finfo(jnp.float32).min)  # masked score: finite, so a row with nothing visible stays finite


class Indexer(nn.Module, kw_only=True):
    """GLM-5's DSA indexer. Returns (q [B, S, H, D], k [B, S, D], w [B, S, H] fp32) such that
    `indexer_scores(q, k, w)` are transformers' index scores; k is what the decode cache keeps per token.
    `q_latent` is the MLA query latent (q_a_layernorm(q_a_proj(x))), cos / sin the MLA rope tables
    [B, S, qk_rope_head_dim // 2]."""

    num_heads: int  # index_n_heads
    head_dim: int  # index_head_dim
    kpool: int = 1  # > 1: keys are scored in pools of kpool (GLM-5.3-Flash, `pool_keys`)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, q_latent, cos, sin):
        """With kpool > 1 also the pooling logits of every key [B, S, D] (fp32; what a pool mixes its keys by)."""
        h, d = self.num_heads, self.head_dim
        q = Linear(features=(h, d), kernel_axes=("q_lora", "index_heads", "index_head_dim"), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="wq_b")(q_latent)
        k = Linear(features=(d,), kernel_axes=("embed", "index_head_dim"), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="wk")(x)
        k = LayerNorm(eps=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="k_norm")(k)
        # Interleaved pairs on the first rope dims (transformers writes the rotated halves de-interleaved, a
        # permutation applied to q and k alike, which leaves every q . k unchanged).
        q = apply_rotary(q, cos, sin, interleaved=True)
        k = apply_rotary(k[:, :, None], cos, sin, interleaved=True)[:, :, 0]
        # weights_proj runs in fp32 (transformers keeps it so); relu(c * s) = c * relu(s) folds the softmax scale
        # 1/sqrt(D) into the per-head weights.
        w = Linear(features=(h,), kernel_axes=("embed", "index_heads"), dtype=jnp.float32,
                   param_dtype=self.param_dtype, name="weights_proj")(x.astype(jnp.float32))
        w = w * np.float32(h ** -0.5 * d ** -0.5)
        if self.kpool == 1:
            return jax.lax.stop_gradient((q, k, w))
        gate = Linear(features=(d,), kernel_axes=("embed", "index_head_dim"), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="compress_gate")(x)
        ape = self.param("compress_ape", nn.with_logical_partitioning(nn.initializers.zeros, (None, "index_head_dim")),
                         (self.kpool, d), self.param_dtype)
        return jax.lax.stop_gradient((q, k, w, (gate, ape)))


def pool_keys(keys, gate, ape, kv_segments):
    """GLM-5.3-Flash's pooled indexer keys. Pools are runs of kpool consecutive keys of one document counted from
    its first token (left padding and packed rows alike); only complete pools exist. A pool's key is, per channel,
    the softmax(gate logits + ape[position in pool]) mixture of its keys. keys / gate [B, T, D], ape [kpool, D],
    kv_segments [B, T]. Returns (pool keys [B, P, D], last slot of each pool [B, P] int32, exists [B, P]),
    P = T // kpool, the pools of a row first in slot order."""
    kpool = ape.shape[0]
    b, t, _ = keys.shape
    p = max(t // kpool, 1)
    seg = kv_segments.astype(jnp.int32)
    ends_here = (seg > 0) & (positions_from_segments(seg) % kpool == kpool - 1)
    ends = jax.vmap(lambda e: jnp.nonzero(e, size=p, fill_value=t)[0])(ends_here).astype(jnp.int32)
    exists = ends < t
    members = jnp.clip(ends[..., None] - (kpool - 1) + jnp.arange(kpool), 0, t - 1)  # [B, P, kpool]
    rows = jnp.arange(b)[:, None, None]
    logits = gate[rows, members].astype(jnp.float32) + ape.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=2).astype(keys.dtype)
    return jnp.sum(probs * keys[rows, members], axis=2), ends, exists


def select_pools(scores, mask, ends, exists, topk: int, kpool: int, q_slots, q_positions, tail: bool):
    """Token selection of the pooled indexer: the top topk // kpool visible pools by score (a pool is visible when
    its last key is), expanded to their keys, then (`tail`) the query's own incomplete pool: the keys of its
    document since the last complete pool. scores [B, S, P], mask [B, S, T], ends / exists [B, P], q_slots [B, S]
    (each query's slot in the key axis), q_positions [B, S] (its position in its document). Returns (indices
    [B, S, K] int32, visible [B, S, K]), K = min(topk // kpool, P) * kpool + (kpool - 1 if tail)."""
    t = mask.shape[-1]
    end_visible = jnp.take_along_axis(mask, jnp.clip(ends, 0, t - 1)[:, None, :].repeat(mask.shape[1], 1), axis=-1)
    candidate = end_visible & exists[:, None, :]
    k = min(topk // kpool, scores.shape[-1])
    _, picked = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), k)  # [B, S, k]
    ok = jnp.take_along_axis(candidate, picked, axis=-1)
    last = jnp.take_along_axis(ends[:, None, :].repeat(scores.shape[1], 1), picked, axis=-1)
    idx = (last[..., None] - (kpool - 1) + jnp.arange(kpool)).reshape(*picked.shape[:2], -1)
    visible = jnp.repeat(ok, kpool, axis=-1)
    if tail and kpool > 1:
        count = (q_positions + 1) % kpool  # keys of the query's pool up to and including itself, when incomplete
        j = jnp.arange(kpool - 1)
        tail_idx = q_slots[..., None] - count[..., None] + 1 + j
        idx = jnp.concatenate([idx, tail_idx], axis=-1)
        visible = jnp.concatenate([visible, j < count[..., None]], axis=-1)
    idx = jnp.clip(idx, 0, t - 1).astype(jnp.int32)
    return idx, visible & jnp.take_along_axis(mask, idx, axis=-1)


def indexer_scores(q, k, w):
    """q [B, S, H, D], k [B, T, D], w [B, S, H] -> index scores [B, S, T] in fp32."""
    s = jnp.einsum("bshd,btd->bsht", q, k, preferred_element_type=jnp.float32)
    return jnp.einsum("bsht,bsh->bst", jax.nn.relu(s), w)


def select_topk(scores, mask, topk: int):
    """The `topk` best visible keys per query: (indices [B, S, K] int32, visible [B, S, K] bool), K =
    min(topk, T). A query that sees fewer than K keys gets all of them plus invisible fillers (visible=False),
    as transformers' top-k over masked scores does."""
    k = min(topk, scores.shape[-1])
    _, idx = jax.lax.top_k(jnp.where(mask, scores, -jnp.inf), k)
    return idx.astype(jnp.int32), jnp.take_along_axis(mask, idx, axis=-1)


def topk_mask(idx, visible, kv_len: int):
    """Boolean [B, S, T]: the visible selected keys (reference path only)."""
    b, s, _ = idx.shape
    bi, si = jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None]
    return jnp.zeros((b, s, kv_len), bool).at[bi, si, idx].max(visible)


def visibility(q_segments, kv_segments, q_len: int, kv_len: int, q_offset=0):
    """[B, q_len, kv_len]: causal by slot, same segment (attention.make_mask's rule; 0 = padding)."""
    return causal(q_len, kv_len, q_offset) & (q_segments[:, :, None] == kv_segments[:, None, :])


def latent_attention(q, kv, mask, scale: float, value_dim: int):
    """Attention with one shared key/value head. q [B, S, N, C], kv [B, ..., C] with the key axes after S
    ([B, T, C] shared by all queries, or [B, S, K, C] gathered per query), mask broadcastable to the scores
    [B, S, N, keys]. Values are kv[..., :value_dim]. Softmax in fp32; returns [B, S, N, value_dim]."""
    shared = kv.ndim == 3
    sub = "btc" if shared else "bstc"
    scores = jnp.einsum(f"bsnc,{sub}->bsnt", q, kv, preferred_element_type=jnp.float32) * np.float32(scale)
    scores = jnp.where(mask, scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(kv.dtype)
    return jnp.einsum(f"bsnt,{sub}->bsnc", probs, kv[..., :value_dim])


@struct.dataclass
class Pooling:
    """A pooled indexer's key side (GLM-5.3-Flash, `pool_keys`) and what its selection needs of the queries."""

    keys: jax.Array  # [B, P, D] pool keys
    ends: jax.Array  # [B, P] last slot of each pool
    exists: jax.Array  # [B, P]
    q_positions: jax.Array  # [B, S] each query's position in its document
    kpool: int = struct.field(pytree_node=False, default=1)
    tail: bool = struct.field(pytree_node=False, default=True)


def chooser(index, topk: int):
    """The indexer's selection, split for blockwise use: (per-query inputs [B, S, ...], choose(per-query block,
    mask [B, s, T], q_slots [B, s]) -> (indices, visible)). `index` = (iq, ik, iw) or (iq, ik, iw, Pooling)."""
    iq, ik, iw = index[:3]
    pooling = index[3] if len(index) > 3 else None
    if pooling is None:
        return (iq, iw), lambda given, mask, _: select_topk(indexer_scores(given[0], ik, given[1]), mask, topk)

    def choose(given, mask, q_slots):
        scores = indexer_scores(given[0], pooling.keys, given[1])
        return select_pools(scores, mask, pooling.ends, pooling.exists, topk, pooling.kpool, q_slots, given[2],
                            pooling.tail)
    return (iq, iw, pooling.q_positions), choose


def query_slots(q_offset, start, count: int):
    """[B or 1, count] slots in the key axis of queries start .. start + count - 1 (q_offset: scalar or [B])."""
    return (jnp.reshape(q_offset, (-1, 1)) + start + jnp.arange(count)[None]).astype(jnp.int32)


def dsa_attention_reference(q, kv, index, q_segments, kv_segments, topk: int, scale: float, value_dim: int,
                            q_offset=0, chosen=None):
    """Exact DSA over full [S, T] matrices (tests only). q [B, S, N, C] absorbed queries, kv [B, T, C] latent
    keys (values = kv[..., :value_dim]), `index` = (iq, ik, iw[, Pooling]): the indexer's queries, keys [B, T, D]
    and weights (and the pooled key side). `chosen` = (indices, visible) [B, S, K] from an earlier layer replaces
    the indexer (transformers' "shared" layers). Returns (output [B, S, N, value_dim], chosen)."""
    mask = visibility(q_segments, kv_segments, q.shape[1], kv.shape[1], q_offset)
    if chosen is None:
        given, choose = chooser(index, topk)
        chosen = choose(given, mask, query_slots(q_offset, 0, q.shape[1]))
    idx, visible = chosen
    sparse = topk_mask(idx, visible & jnp.take_along_axis(mask, idx, axis=-1), kv.shape[1])
    return latent_attention(q, kv, sparse[:, :, None, :], scale, value_dim), chosen


def dsa_attention(q, kv, index, q_segments, kv_segments, topk: int, scale: float, value_dim: int, q_offset=0,
                  chosen=None, block: int = 128):
    """Blockwise DSA, same arguments and results as `dsa_attention_reference`. Queries run in blocks of
    `block` (a sequential loop): the indexer scores of a block [B, block, T] (pooled: [B, block, P]), its top-k,
    the chosen keys gathered [B, block, K, C], attention over them. Memory per block: [B, block, index_heads, T]
    for the indexer and [B, block, heads, K] for the attention, never [S, T] per head."""
    b, s = q.shape[:2]
    block = min(block, s)
    n_blocks = -(-s // block)
    pad = n_blocks * block - s

    def blocks(x):  # [B, S, ...] -> [n_blocks, B, block, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n_blocks, block, *x.shape[2:]), 1, 0)

    def unblock(x):
        return jnp.moveaxis(x, 0, 1).reshape(b, n_blocks * block, *x.shape[3:])[:, :s]

    per_query, choose = chooser(index, topk) if chosen is None else (chosen, None)

    def one(args):
        i, qb, segb, given = args
        mask = visibility(segb, kv_segments, block, kv.shape[1], q_offset + i * block)
        idx, visible = given if choose is None else choose(given, mask, query_slots(q_offset, i * block, block))
        gathered = jax.vmap(lambda rows, ids: rows[ids])(kv, idx)  # [B, block, K, C]
        seen = visible & jnp.take_along_axis(mask, idx, axis=-1)
        return latent_attention(qb, gathered, seen[:, :, None, :], scale, value_dim), (idx, visible)

    # Each block is recomputed in the backward pass (jax.checkpoint): what a block keeps for it is its inputs, not
    # its gathered keys [B, block, K, C] and probabilities, which summed over blocks would be O(S * K) per layer.
    out, picked = jax.lax.map(jax.checkpoint(one), (jnp.arange(n_blocks), blocks(q), blocks(q_segments),
                                                    jax.tree.map(blocks, per_query)))
    return unblock(out), jax.tree.map(unblock, picked)


def mla_sparse_attention(q_nope, q_rope, kv, kv_b, index, q_segments, kv_segments, *, topk: int, scale: float,
                         q_offset=0, chosen=None, block: int = 128, reference: bool = False):
    """DSA for the MLA layer (glm_jax/model/layers/mla.py): absorbs kv_b's key half into the queries, runs
    `dsa_attention` (or the reference) over the latent keys and applies kv_b's value half to the result.
    q_nope [B, S, N, nope], q_rope [B, S, N, rope] (rotated), kv [B, T, kv_lora + rope] (the cached latent ;
    rotary key), kv_b [kv_lora, N, nope + v]. Returns ([B, S, N, v], chosen)."""
    nope, rank = q_nope.shape[-1], kv_b.shape[0]
    q_lat = jnp.einsum("bsnd,cnd->bsnc", q_nope, kv_b[..., :nope])
    q = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], -1)
    if q_segments is None:
        q_segments = kv_segments = jnp.ones(q.shape[:2], jnp.int32)
    if reference:
        ctx, chosen = dsa_attention_reference(q, kv.astype(q.dtype), index, q_segments, kv_segments, topk, scale,
                                              rank, q_offset, chosen)
    else:
        ctx, chosen = dsa_attention(q, kv.astype(q.dtype), index, q_segments, kv_segments, topk, scale, rank,
                                    q_offset, chosen, block)
    return jnp.einsum("bsnc,cnv->bsnv", ctx.astype(kv_b.dtype), kv_b[..., nope:]), chosen


def mla_dsa(mla, x, q_lat, cos, sin, q_nope, q_rope, latent, k_rope, kv_b, scale: float, q_segments, kv_segments,
            cache_index, cache, layer, full=True, chosen=None, positions=None):
    """The sparse branch of the MLA layer (`mla` is the calling MLA module: the indexer becomes its submodule
    "indexer"). Training / prefill: indexer and attention over this call's tokens. Decoding: cache = (cached
    latent, cached indexer keys[, cached pooling logits]), all [L, B, max_len, ...]; the latent was written by the
    caller, the indexer's are written here, and a step (not a prefill) attends over every cache slot.

    "shared" layers (docs/dsa.md): `chosen` = (indices, visible) [B, S, K] is the selection of the previous layer
    and `full` says whether this layer runs its own indexer: a Python bool, or a traced one (per layer of a scan),
    in which case the indexer (projections, scores, top-k) is skipped by `nn.cond` and `chosen` is attended instead
    (its indexer cache slots are written with zeros, never read). chosen=None: every layer is full, no cond.
    A pooled indexer (mla.index_kpool > 1, GLM-5.3-Flash) needs `positions` [B, S]: each query's position in its
    document. Returns ([B, S, N, v], cache, the selection used)."""
    kv, q_offset, cached = jnp.concatenate([latent, k_rope.astype(latent.dtype)], -1), 0, None
    if mla.decode and not mla.prefill:
        kv, *cached = (kv_cache_lib.read(c, layer, cache_index) for c in cache)
        q_offset = kv_cache_lib.query_offset(cache_index)
    pooled = mla.index_kpool > 1

    def attend(picked, index):
        return mla_sparse_attention(q_nope, q_rope, kv, kv_b, index, q_segments, kv_segments, topk=mla.index_topk,
                                    scale=scale, q_offset=q_offset, chosen=picked, block=mla.dsa_block)

    def own(mdl):  # this layer's indexer: its keys join the cached ones (a decode step scores every slot)
        iq, ik, iw, *pool = Indexer(num_heads=mdl.index_n_heads, head_dim=mdl.index_head_dim, kpool=mdl.index_kpool,
                                    dtype=mdl.dtype, param_dtype=mdl.param_dtype, name="indexer")(x, q_lat, cos, sin)
        new = (ik,) + ((pool[0][0],) if pooled else ())  # what the cache keeps per token
        seen = new if cached is None else tuple(kv_cache_lib.place(c, cache_index, n) for c, n in zip(cached, new))
        index = (iq, seen[0].astype(iq.dtype), iw)
        if pooled:
            kv_seg = jnp.ones(kv.shape[:2], jnp.int32) if kv_segments is None else kv_segments
            keys, ends, exists = pool_keys(seen[0].astype(iq.dtype), seen[1], pool[0][1], kv_seg)
            pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]) if positions is None else positions
            index += (Pooling(keys, ends, exists, pos, mdl.index_kpool, mdl.index_kpool_tail),)
        out, picked = attend(None, index)
        return out, picked, tuple(n.astype(c.dtype) for n, c in zip(new, cache[1:])) if mla.decode else ()

    def reuse(mdl):  # a "shared" layer: the previous layer's selection, no indexer
        out, _ = attend(chosen, None)
        zeros = tuple(jnp.zeros((*x.shape[:2], c.shape[-1]), c.dtype) for c in cache[1:]) if mla.decode else ()
        return out, chosen, zeros

    if chosen is None or mla.is_initializing() or full is True:  # init creates every layer's indexer
        out, picked, new = own(mla)
    elif full is False:
        out, picked, new = reuse(mla)
    else:
        out, picked, new = nn.cond(full, own, reuse, mla, variables="params", rngs=False)
    if mla.decode:
        cache = (cache[0],) + tuple(kv_cache_lib.write(c, layer, cache_index, n) for c, n in zip(cache[1:], new))
    return out, cache, picked
