"""Grouped-query self-attention with GLM's partial rotary embedding, a KV cache, and three kernels.

Kernels (config `attention_impl`):
  xla     plain einsum + fp32 softmax; the reference, runs anywhere.
  cudnn   cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16).
  splash  the Pallas splash-attention kernel (TPU).
  auto    cudnn on GPU, splash on TPU, xla otherwise.
A kernel that cannot run here falls back to xla with a logged warning.

Masking is expressed by segment ids: a query attends to keys at or before its own slot with the same segment
id. Packed documents get distinct ids; left padding gets id 0, so real tokens never see pads and pad rows (which
are ignored) see other pads, never an empty row.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from glm_jax.model.layers.embeddings import apply_rotary
from glm_jax.model.layers.importance import record, sum_squares
from glm_jax.model.layers.linear import Linear
from glm_jax.model.layers.norms import RMSNorm
from glm_jax.model.layers import kv_cache as kv_cache_lib
from glm_jax.platforms import current_platform
from glm_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str):
    log.warning(msg)


def resolve_impl(impl: str, dtype) -> str:
    """Picks the kernel for `impl` on the current platform."""
    backend = current_platform()
    if impl == "auto":
        if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        return "splash" if backend == "tpu" else "xla"
    if impl == "cudnn" and backend != "gpu":
        _warn_once(f"attention_impl='cudnn' needs a GPU, running on {backend}: falling back to xla")
        return "xla"
    if impl == "splash" and backend != "tpu":
        _warn_once(f"attention_impl='splash' needs a TPU, running on {backend}: falling back to xla")
        return "xla"
    return impl


def causal(q_len: int, kv_len: int, q_offset=0):
    """Boolean [1 or B, q_len, kv_len]: query slot i (at key slot i + q_offset; q_offset a number or [B] per row)
    sees key slots <= that."""
    q_idx = jnp.arange(q_len)[None, :] + jnp.reshape(q_offset, (-1, 1))
    return q_idx[:, :, None] >= jnp.arange(kv_len)[None, None, :]


def make_mask(q_segments, kv_segments, q_len: int, kv_len: int, q_offset=0, context_len=None):
    """Boolean [batch, q_len, kv_len]: causal by slot and same segment. Segments None means all one segment.
    `context_len` [batch], or [batch, q_len] per query (packed rows; ChatGLM-6B): key slots before it are seen by
    the query too (GLM's bidirectional context)."""
    mask = causal(q_len, kv_len, q_offset)
    if context_len is not None:
        ends = context_len[:, None, None] if jnp.ndim(context_len) == 1 else context_len[:, :, None]
        mask = mask | (jnp.arange(kv_len)[None, None, :] < ends)
    if q_segments is not None:
        mask = mask & (q_segments[:, :, None] == kv_segments[:, None, :])
    return mask


def xla_attention(q, k, v, mask):
    """q [B,S,N,D], k/v [B,T,G,D], mask [B,S,T] -> [B,S,N,D]. Softmax in fp32, probabilities in v's dtype."""
    b, s, n, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, s, g, n // g, d)
    scores = jnp.einsum("bsgrd,btgd->bgrst", q, k, preferred_element_type=jnp.float32) / np.sqrt(d).astype(np.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrst,btgd->bsgrd", probs, v)
    return out.reshape(b, s, n, d)


def segment_runs(segments, max_runs: int):
    """cuDNN's packed-layout description of each row: (lengths [B, M], starts [B, M + 1]) of the maximal runs of
    equal segment id, -1 past the row's last run, and the largest run count of the batch. A run is a document
    of a packed row (or the left padding, which then attends only to itself)."""
    b, s = segments.shape
    start = jnp.concatenate([jnp.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    run = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1  # run index of every token
    n_runs = run[:, -1] + 1
    lengths = jax.vmap(lambda r: jnp.zeros((max_runs,), jnp.int32).at[r].add(1, mode="drop"))(run)
    lengths = jnp.where(jnp.arange(max_runs)[None] < n_runs[:, None], lengths, -1)
    starts = jax.vmap(lambda st: jnp.nonzero(st, size=max_runs + 1, fill_value=-1)[0])(start).astype(jnp.int32)
    starts = jnp.where(jnp.arange(max_runs + 1)[None] < n_runs[:, None], starts, -1)
    return lengths, starts, jnp.max(n_runs)


def _cudnn_packed(q, k, v, segments, max_runs: int):
    """cuDNN flash attention over packed documents (its ragged "THD" layout): each run of equal segment id is
    its own causal sequence, so nothing of size [S, S] exists. Hopper or later."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # the packed layout has no public entry point yet

    lengths, starts, _ = segment_runs(segments, max_runs)
    return fa.dot_product_attention(q, k, v, None, None, lengths, lengths, starts, starts,
                                    scale=float(1 / np.sqrt(q.shape[-1])), mask_type=fa.MaskType.PADDING_CAUSAL,
                                    qkv_layout="BTNH")


def cudnn_attention(q, k, v, q_segments, kv_segments, max_segments: int = 0):
    """Unpadded, unpacked batches take cuDNN's causal fast path. Segment ids with `max_segments` > 0 take the
    packed layout while no row has more runs than that (else the mask path below: same result, slower);
    `max_segments` = 0 passes an explicit [B, 1, S, S] mask, which cuDNN reads as a bias."""
    if q_segments is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def masked(q, k, v, seg):
        mask = make_mask(seg, seg, q.shape[1], k.shape[1])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    if not max_segments:
        return masked(q, k, v, q_segments)
    _, _, n_runs = segment_runs(q_segments, 1)
    return jax.lax.cond(n_runs <= max_segments, functools.partial(_cudnn_packed, max_runs=max_segments), masked,
                        q, k, v, q_segments)


def splash_attention(q, k, v, q_segments, kv_segments, interpret: bool = False, q_offset: int = 0):
    """TPU splash attention, causal, with segment ids; one MQA kernel per KV group, vmapped over batch.

    q [B,Sq,N,D] may be a slice of the sequence starting at slot `q_offset` of k/v [B,Skv,G,D] (sequence
    parallelism): the causal mask is offset, and kv blocks after the slice's last query are skipped."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, n, d = q.shape
    t, g = k.shape[1], k.shape[2]
    r = n // g
    bq, bkv = min(512, s), min(512, t)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sm.MultiHeadMask([sm.CausalMask((s, t), offset=q_offset) for _ in range(r)])
    kernel = sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)
    # [B,S,N,D] -> [B,G,R,S,D]; the kernel expects pre-scaled queries.
    qh = (q / np.sqrt(d).astype(q.dtype)).reshape(b, s, g, r, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if q_segments is None:
        q_segments, kv_segments = jnp.ones((b, s), jnp.int32), jnp.ones((b, t), jnp.int32)
    seg = sk.SegmentIds(q=q_segments, kv=kv_segments)

    def per_group(qg, kg, vg, segs):  # qg [R,S,D], kg/vg [T,D]
        return kernel(qg, kg, vg, segment_ids=segs)

    out = jax.vmap(jax.vmap(per_group, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, sk.SegmentIds(0, 0)))(
        qh, kh, vh, seg)  # [B,G,R,S,D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, d)


def sharded_splash_attention(q, k, v, q_segments, kv_segments, interpret: bool = False):
    """Splash attention under the current mesh. A Mosaic kernel cannot be partitioned by XLA, so it runs per
    shard inside `shard_map`: batch over data/fsdp, KV groups over tensor (when they divide), and queries over
    `sequence` (context parallelism: each shard attends its slice of queries to the whole, all-gathered K/V,
    which grouped-query attention keeps small; the shard index picks the kernel with the matching causal
    offset)."""
    if q_segments is None:
        q_segments = kv_segments = jnp.ones(q.shape[:2], jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    kernel = functools.partial(splash_attention, interpret=interpret)
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, q_segments, kv_segments)
    # The sharding rules' layout (indivisible axes dropped), with heads split only as far as the KV groups allow.
    axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
    batch, seq, _, _ = logical_to_spec(axes, q.shape, mesh)
    heads = logical_to_spec(axes, k.shape, mesh)[2]
    if seq is not None:
        q_len = q.shape[1] // mesh.shape[seq]
        branches = [functools.partial(kernel, q_offset=i * q_len) for i in range(mesh.shape[seq])]
        kernel = lambda *args: jax.lax.switch(jax.lax.axis_index(seq), branches, *args)  # noqa: E731

    q_spec, kv_spec = P(batch, seq, heads, None), P(batch, None, heads, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, seq), P(batch, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segments, kv_segments)


def dot_product_attention(q, k, v, q_segments=None, kv_segments=None, q_offset=0, impl: str = "xla",
                          prefix=None, max_segments: int = 0, context_len=None):
    """Dispatches to the configured kernel. `q_offset` is the query's first slot in the key sequence (decode).

    `prefix` [2, P, kv_heads, head_dim]: P-tuning v2 keys/values placed before the sequence, visible to every
    query (xla kernel only: prefix tuning is a fine-tuning mode, not the fast path). `context_len` [batch]:
    ChatGLM-6B's bidirectional context (`make_mask`; xla kernel only).
    """
    impl = resolve_impl(impl, q.dtype)
    if context_len is not None or prefix is not None:
        if impl != "xla":
            _warn_once(f"attention_impl={impl!r} has no " + ("bidirectional-context mask (ChatGLM-6B)" if prefix is None
                       else "P-tuning prefix support") + ": using xla")
        mask = make_mask(q_segments, kv_segments, q.shape[1], k.shape[1], q_offset, context_len)
        if prefix is None:
            return xla_attention(q, k, v, mask)
        b, p = q.shape[0], prefix.shape[1]
        pk, pv = (jnp.broadcast_to(x.astype(k.dtype), (b, *x.shape)) for x in prefix)
        mask = jnp.concatenate([jnp.ones((mask.shape[0], q.shape[1], p), bool), mask], axis=-1)
        return xla_attention(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1), mask)
    is_self = q.shape[1] == k.shape[1] and isinstance(q_offset, int) and q_offset == 0
    if impl == "cudnn" and is_self:
        try:
            return cudnn_attention(q, k, v, q_segments, kv_segments, max_segments)
        except Exception as e:  # unsupported shape / dtype / cuDNN version: say so, then stay correct
            _warn_once(f"cuDNN attention unavailable ({type(e).__name__}: {e}); falling back to xla")
    elif impl == "splash" and is_self:
        try:
            return sharded_splash_attention(q, k, v, q_segments, kv_segments)
        except Exception as e:
            _warn_once(f"splash attention unavailable ({type(e).__name__}: {e}); falling back to xla")
    mask = make_mask(q_segments, kv_segments, q.shape[1], k.shape[1], q_offset)
    return xla_attention(q, k, v, mask)


class Attention(nn.Module, kw_only=True):
    """Self-attention block of GLM v2: separate q/k/v projections (with bias), rotary, GQA, output projection.

    The q/k/v kernels are the row blocks of THUDM's fused `query_key_value`; keeping them apart lets tensor
    parallelism split each by heads without a reshuffle.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    use_bias: bool = True
    attention_impl: str = "auto"
    decode: bool = False
    prefill: bool = False  # decode into an EMPTY cache: the new tokens attend among themselves only
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    quantization_bit: int = 0
    max_segments: int = 0  # GLMConfig.max_segments: cuDNN's packed layout (see cudnn_attention)
    rope_interleaved: bool = True  # GLMConfig.rope_interleaved: GLM's pairs (2i, 2i+1), else split-half (NeoX)
    qk_norm: bool = False  # GLMConfig.use_qk_norm: RMSNorm over head_dim on each query / key head before rotary
    norm_eps: float = 1e-5
    rotary_2d: bool = False  # ChatGLM-6B: cos/sin [2, ...]: head halves rotated by position / block position
    out_bias: bool = False  # ChatGLM-6B: a bias on the output projection

    @nn.compact
    def __call__(self, x, cos, sin, q_segments=None, kv_segments=None, cache_index=None, prefix=None, kv_cache=None,
                 layer=None, context_len=None):
        """Returns (output, kv_cache). Decoding, `kv_cache` is (keys, values) of ALL layers [L, batch, max_len,
        kv_heads, head_dim] and `layer` this block's index: the new keys/values are written in place, so the
        layer scan carries one cache buffer instead of re-stacking a copy of it every step."""
        def proj(heads, axis_name, name):
            return Linear(features=(heads, self.head_dim), kernel_axes=("embed", axis_name, "head_dim"), use_bias=self.use_bias,
                          bias_axes=(axis_name, "head_dim"), dtype=self.dtype, param_dtype=self.param_dtype,
                          quantization_bit=self.quantization_bit, name=name)(x)

        q, k = proj(self.num_heads, "q_heads", "query"), proj(self.num_kv_heads, "kv_heads", "key")
        if self.qk_norm:
            q = RMSNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="query_norm")(q)
            k = RMSNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="key_norm")(k)
        q, k = (self.rotate(t, cos, sin) for t in (q, k))
        v = proj(self.num_kv_heads, "kv_heads", "value")
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))

        q_offset = 0
        if self.decode:
            kv_cache = tuple(kv_cache_lib.write(c, layer, cache_index, new) for c, new in zip(kv_cache, (k, v)))
            if not self.prefill:  # attend over the whole cache; a prefill attends within its own tokens (any kernel)
                k, v = (kv_cache_lib.read(c, layer, cache_index) for c in kv_cache)
                q_offset = kv_cache_lib.query_offset(cache_index)

        out = dot_product_attention(q, k, v, q_segments, kv_segments, q_offset, self.attention_impl, prefix,
                                    self.max_segments, context_len)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        record(self, "head_norms", lambda: sum_squares(out, keep_last=2).sum(-1))  # [heads]: output energy per head
        out = Linear(features=(self.hidden_size,), kernel_axes=("q_heads", "head_dim", "embed"), n_in=2, dtype=self.dtype,
                     param_dtype=self.param_dtype, quantization_bit=self.quantization_bit, use_bias=self.out_bias,
                     bias_axes=("embed",), name="out")(out)
        return out, kv_cache

    def rotate(self, t, cos, sin):
        """The rotary embedding of queries or keys [B, S, heads, head_dim]."""
        if not self.rotary_2d:
            return apply_rotary(t, cos, sin, self.rope_interleaved)
        half = t.shape[-1] // 2
        return jnp.concatenate([apply_rotary(t[..., :half], cos[0], sin[0], False),
                                apply_rotary(t[..., half:], cos[1], sin[1], False)], axis=-1)
