"""Manifold-constrained hyper-connections (mHC) of GLM-5.3-Flash (transformers' `Glm5NextTextHyperConnection`;
docs/glm5-next.md "Hyper-connections").

The residual stream is hc_mult streams [B, S, N, E] instead of one. Around each sublayer (attention, then the
MLP) a small projection of all N streams, RMS-normalised together (no weight), gives three mixing weights:

    pre  [N]     sigmoid(.) + eps            collapses the streams into the sublayer's input  sum_i pre_i x_i
    post [N]     2 sigmoid(.)                spreads the sublayer's output y over the streams
    comb [N, N]  softmax(.) + eps, then Sinkhorn-Knopp (columns, then rows and columns hc_sinkhorn_iters - 1 times):
                 near doubly stochastic, so mixing the streams cannot grow their norm
    x'_i = post_i y + sum_k comb[k, i] x_k

each of the three `(raw * scale + base)` with one learned scale per weight kind. The model starts with every stream
a copy of the embedding and ends with their unweighted mean (then the final norm).

Parameters: fn/kernel [N * E, (2 + N) * N] (the checkpoint's hc_{attn,ffn}_fn, transposed), base [(2 + N) * N] and
scale [3], both fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class HyperConnection(nn.Module, kw_only=True):
    """Mixing weights for one sublayer. `__call__(streams)` -> (post [B, S, N] fp32, comb [B, S, N, N] fp32, the
    sublayer's input [B, S, E] in the streams' dtype); `merge` applies post and comb to the sublayer's output."""

    hc_mult: int
    sinkhorn_iters: int = 20
    eps: float = 1e-6
    norm_eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, streams):
        n = self.hc_mult
        b, s = streams.shape[:2]
        flat = streams.reshape(b, s, -1).astype(jnp.float32)
        flat = flat * jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + self.norm_eps)
        width = (2 + n) * n
        fn = self.param("fn", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None)),
                        (flat.shape[-1], width), self.param_dtype)
        base = self.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (width,), jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (3,), jnp.float32)
        raw = jnp.dot(flat, fn.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        pre = jax.nn.sigmoid(raw[..., :n] * scale[0] + base[:n]) + self.eps
        post = 2 * jax.nn.sigmoid(raw[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = raw[..., 2 * n:].reshape(b, s, n, n) * scale[2] + base[2 * n:].reshape(n, n)
        comb = jax.nn.softmax(comb, axis=-1) + self.eps
        comb = comb / (comb.sum(-2, keepdims=True) + self.eps)

        def rows_then_columns(_, c):
            c = c / (c.sum(-1, keepdims=True) + self.eps)
            return c / (c.sum(-2, keepdims=True) + self.eps)

        # a loop, not unrolled: 2 x 19 normalisations per block would otherwise be traced and compiled one by one
        comb = jax.lax.fori_loop(0, self.sinkhorn_iters - 1, rows_then_columns, comb)
        collapsed = jnp.einsum("bsn,bsne->bse", pre, streams.astype(jnp.float32)).astype(streams.dtype)
        return post, comb, collapsed


def merge(post, comb, out, streams):
    """x'_i = post_i * out + sum_k comb[k, i] x_k, in the streams' dtype (weights cast first, as transformers)."""
    dtype = streams.dtype
    return (post.astype(dtype)[..., None] * out.astype(dtype)[..., None, :]
            + jnp.einsum("bski,bske->bsie", comb.astype(dtype), streams))
