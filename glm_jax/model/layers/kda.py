"""Kimi delta attention (KDA), the linear attention of 3 in 4 GLM-5.3-Flash layers (transformers'
`Glm5NextTextLinearAttention`; docs/glm5-next.md has the equations in full).

    q, k, v   = silu(causal depthwise conv (linear_conv_kernel taps) of q_proj / k_proj / v_proj(x))   [H heads of D]
    q, k      = l2-normalised per head (eps inside the square root), q scaled by D^-1/2
    g         = per-channel log-decay: lower_bound * sigmoid(exp(A_log) * (f_b(f_a(x)) + dt_bias))   (<= 0)
    beta      = sigmoid(b_proj(x))                                                      one per head
    state     S [D_k, D_v] per head:  S_t = diag(exp(g_t)) S_{t-1} + k_t (beta_t (v_t - S'^T k_t))^T, S' the decayed S
    output    o_t = S_t^T q_t, then RMSNorm(o) * sigmoid(g_b(g_a(x))) per head, o_proj

Two equal evaluations of the recurrence (both fp32, whatever the model dtype):
  kda_chunked    training and prefill: chunks of `chunk_size` tokens. Inside a chunk the delta rule is one
                 triangular solve (the WY form) and attention-like [chunk, chunk] products; between chunks the state
                 is carried by a scan. Nothing of size [seq, seq] exists; per chunk a [chunk, chunk, D_k] decay.
  kda_recurrent  decoding: token by token from the cached state (O(1) per token in the sequence length).
Document starts (packed rows, `starts`) reset the state and the convolution: tokens never see another document.

Decode cache ("cache" collection, glm_jax/model/glm.py): `kda_state` [L_kda, B, H, D, D] fp32 and `kda_conv`
[L_kda, B, conv - 1, 3, H, D]: the last convolution inputs of q, k, v.

Parameters (logical axes; glm_jax/sharding.py maps kda_heads over tensor):
    {q,k,v}/kernel        [embed, H, D]             (embed, kda_heads, kda_head_dim)
    {q,k,v}_conv          [conv, H, D] fp32         (None, kda_heads, kda_head_dim)
    f_a/kernel, g_a/kernel  [embed, D]              (embed, None)
    f_b/kernel, g_b/kernel  [D, H, D]               (None, kda_heads, kda_head_dim)
    dt_bias [H, D] fp32, A_log [H] fp32, b/kernel [embed, H], o_norm/scale [D], o/kernel [H, D, embed]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from glm_jax.model.layers import kv_cache as kv_cache_lib
from glm_jax.model.layers.embeddings import positions_from_segments
from glm_jax.model.layers.linear import Linear

L2_EPS = 1e-6  # transformers / FLA: x / sqrt(sum x^2 + eps)
# the recurrence multiplies in full fp32 on every backend (a TPU's default fp32 matmul takes bf16 passes)
ein = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
HEAD_AXES = ("kda_heads", "kda_head_dim")


def l2norm(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def causal_conv(x, weight, starts, state=None):
    """Depthwise causal convolution: out[t] = sum_j weight[j] * x[t - (K-1) + j], inputs of another document (before
    a `starts` token) read as 0. x [B, S, ...] , weight [K, ...] fp32, starts [B, S] bool, state [B, K-1, ...]: the
    inputs before x (a decode cache; None = zeros). Returns (silu(out) fp32, [state ; x]: the inputs it read)."""
    k = weight.shape[0]
    b, s = x.shape[:2]
    if state is None:
        state = jnp.zeros((b, k - 1, *x.shape[2:]), x.dtype)
    ext = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+S, ...]
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # document number of each token
    doc_ext = jnp.concatenate([jnp.zeros((b, k - 1), jnp.int32), doc], axis=1)  # the state: before any start
    out = jnp.zeros(x.shape, jnp.float32)
    for j in range(k):  # tap j reads the input K-1-j steps back
        same = (doc_ext[:, j:j + s] == doc)[(...,) + (None,) * (x.ndim - 2)]
        out = out + jnp.where(same, ext[:, j:j + s].astype(jnp.float32), 0.0) * weight[j].astype(jnp.float32)
    return jax.nn.silu(out), ext


def kda_recurrent(q, k, v, g, beta, state=None, starts=None):
    """The recurrence token by token. q, k [B, S, H, Dk] (normalised, q scaled), v [B, S, H, Dv], g [B, S, H, Dk]
    log-decays, beta [B, S, H], state [B, H, Dk, Dv] (None = zeros), starts [B, S] (reset before the token).
    Returns (o [B, S, H, Dv] fp32, final state fp32)."""
    b, s, h, dk = k.shape
    if state is None:
        state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    if starts is None:
        starts = jnp.zeros((b, s), bool)

    def step(st, xs):
        qt, kt, vt, gt, bt, rt = xs
        st = st * jnp.exp(gt)[..., None] * jnp.where(rt, 0.0, 1.0)[:, None, None, None]
        delta = (vt - ein("bhkv,bhk->bhv", st, kt)) * bt[..., None]
        st = st + kt[..., None] * delta[..., None, :]
        return st, ein("bhkv,bhk->bhv", st, qt)

    xs = tuple(jnp.moveaxis(a.astype(jnp.float32) if a.dtype != bool else a, 1, 0)
               for a in (q, k, v, g, beta, starts))
    state, o = jax.lax.scan(step, state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), state


def kda_chunked(q, k, v, g, beta, state=None, starts=None, chunk_size: int = 64):
    """The same recurrence, chunk by chunk (arguments and results as `kda_recurrent`). Per chunk of C tokens, with
    G the within-chunk cumulative log-decay and M[i, j] = (j, i in one document):
        A[i, j]   = beta_i sum_d k_i[d] k_j[d] exp(G_i[d] - G_j[d]) M[i, j]   (j < i)
        T         = (I + A)^-1                    (a unit lower-triangular solve: the delta rule's WY form)
        u = T (beta v),   w = T (beta k exp(G) r)  r_i = token i continues the document carried in the state
        o = (q exp(G) r) S + (q . k decayed, j <= i, M) (u - w S)
        S' = diag(exp(G_last) r_last) S + (k exp(G_last - G) M[last, .])^T (u - w S)
    The chunks run in a scan (each recomputed in the backward pass): memory is one chunk's [C, C, Dk]."""
    b, s, h, dk = k.shape
    dv = v.shape[-1]
    c = min(chunk_size, s)
    n = -(-s // c)
    pad = n * c - s
    if state is None:
        state = jnp.zeros((b, h, dk, dv), jnp.float32)
    if starts is None:
        starts = jnp.zeros((b, s), bool)

    def chunks(x):  # [B, S, ...] -> [N, B, C, ...] fp32 (padding: no decay, no input)
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    tri = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)

    def one(st, xs):
        qc, kc, vc, gc, bc, sc = xs  # [B, C, H, D] / [B, C, H] / starts [B, C]
        gcum = jnp.cumsum(gc, axis=1)  # G [B, C, H, Dk]
        doc = jnp.cumsum(sc, axis=1)  # documents started inside this chunk, up to each token
        same = doc[:, :, None] == doc[:, None, :]  # M [B, C, C]
        carried = (doc == 0).astype(jnp.float32)  # r [B, C]
        diff = gcum[:, :, None] - gcum[:, None, :]  # [B, Ci, Cj, H, Dk]
        decay = jnp.exp(jnp.where(tri[None, :, :, None, None], diff, -jnp.inf))
        a = ein("bihd,bjhd,bijhd->bhij", kc * bc[..., None], kc, decay)
        a = jnp.where((strict[None] & same)[:, None], a, 0.0)
        qk = ein("bihd,bjhd,bijhd->bhij", qc, kc, decay)
        qk = jnp.where((tri[None] & same)[:, None], qk, 0.0)
        eye = jnp.eye(c, dtype=jnp.float32)
        rhs = jnp.concatenate([jnp.moveaxis(vc * bc[..., None], 1, 2),  # [B, H, C, Dv + Dk]
                               jnp.moveaxis(kc * bc[..., None] * jnp.exp(gcum) * carried[:, :, None, None], 1, 2)],
                              axis=-1)
        uw = jax.scipy.linalg.solve_triangular(eye + a, rhs, lower=True, unit_diagonal=True)
        u, w = uw[..., :dv], uw[..., dv:]
        v_new = u - ein("bhck,bhkv->bhcv", w, st)
        q_dec = jnp.moveaxis(qc * jnp.exp(gcum) * carried[:, :, None, None], 1, 2)  # [B, H, C, Dk]
        o = ein("bhck,bhkv->bhcv", q_dec, st) + ein("bhij,bhjv->bhiv", qk, v_new)
        last = gcum[:, -1]  # [B, H, Dk]
        k_dec = kc * jnp.exp(last[:, None] - gcum) * same[:, -1][:, :, None, None]  # [B, C, H, Dk]
        st = st * (jnp.exp(last) * carried[:, -1][:, None, None])[..., None] \
            + ein("bchk,bhcv->bhkv", k_dec, v_new)
        return st, jnp.moveaxis(o, 1, 2)  # [B, C, H, Dv]

    xs = tuple(chunks(a) for a in (q, k, v, g, beta)) + (chunks(starts).astype(jnp.int32),)
    state, o = jax.lax.scan(jax.checkpoint(one), state.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, dv)[:, :s], state


class KDA(nn.Module, kw_only=True):
    """Kimi delta attention (see the module docstring). `cache` = (kda_state, kda_conv) of all KDA layers while
    decoding, `layer` this layer's index among them."""

    hidden_size: int
    num_heads: int
    head_dim: int
    conv_kernel: int = 4
    lower_bound: float | None = -5.0
    chunk_size: int = 64
    norm_eps: float = 1e-5
    decode: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def linear(self, features, axes, name, n_in=1):
        return Linear(features=features, kernel_axes=axes, n_in=n_in, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=name)

    def fp32_param(self, name, init, shape, axes):
        return self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)

    @nn.compact
    def __call__(self, x, segments=None, cache=None, layer=None, index=None):
        """x [B, S, embed]; segments [B, S] (0 = padding; a change = a new document) or None. Returns (output
        [B, S, embed], cache). Decoding reads and writes this layer's state and convolution inputs: per row, or
        (`index` a PagedIndex, the serving engine) per decode slot (layers/kv_cache.py)."""
        h, d = self.num_heads, self.head_dim
        b, s = x.shape[:2]
        if segments is None:
            segments = jnp.ones((b, s), jnp.int32)
        x = jnp.where((segments > 0)[..., None], x, 0)  # padding reads as zeros (transformers' masking)
        gate_in = x
        state = conv_state = None
        if not self.decode:
            starts = positions_from_segments(segments) == 0  # document starts: the state and convolution restart
        else:
            # Continuing each row's cached sequence, whose left padding (a padded prompt) must leave the state
            # untouched: each row's real tokens are rotated to the front, so that they follow the cached state and
            # inputs directly; the padding, now last, neither decays nor writes.
            state, conv_state = (kv_cache_lib.read_state(c, layer, index, s) for c in cache)
            n_real = jnp.sum(segments > 0, axis=1)
            rotate = jax.vmap(lambda a, k: jnp.roll(a, k, axis=0))
            x, real = rotate(x, n_real - s), jnp.arange(s)[None] < n_real[:, None]
            starts = jnp.zeros((b, s), bool)

        proj = [self.linear((h, d), ("embed", *HEAD_AXES), name)(x) for name in ("q", "k", "v")]
        conv_w = jnp.stack([self.fp32_param(f"{name}_conv", nn.initializers.normal(0.5), (self.conv_kernel, h, d),
                                            (None, *HEAD_AXES)) for name in ("q", "k", "v")], axis=1)  # [K, 3, H, D]
        qkv, seen = causal_conv(jnp.stack(proj, axis=2), conv_w, starts, conv_state)  # [B, S, 3, H, D]
        q, k, v = (qkv[:, :, i] for i in range(3))
        q, k = l2norm(q) * np.float32(d ** -0.5), l2norm(k)

        f = self.linear((h, d), (None, *HEAD_AXES), "f_b")(self.linear((d,), ("embed", None), "f_a")(x))
        dt_bias = self.fp32_param("dt_bias", nn.initializers.zeros, (h, d), HEAD_AXES)
        a_log = self.fp32_param("A_log", nn.initializers.zeros, (h,), ("kda_heads",))
        g = f.astype(jnp.float32) + dt_bias
        rate = jnp.exp(a_log)[:, None]
        if self.lower_bound is not None:
            g = self.lower_bound * jax.nn.sigmoid(rate * g)
        else:
            g = -rate * jax.nn.softplus(g)
        beta = jax.nn.sigmoid(self.linear((h,), ("embed", "kda_heads"), "b")(x).astype(jnp.float32))

        if self.decode:
            g, beta = jnp.where(real[..., None, None], g, 0.0), jnp.where(real[..., None], beta, 0.0)
        if self.decode and s == 1:
            o, state = kda_recurrent(q, k, v, g, beta, state, starts)
        else:
            o, state = kda_chunked(q, k, v, g, beta, state, starts, self.chunk_size)
        if self.decode:
            o = rotate(o, s - n_real)  # back to the call's slots
            # the convolution's next inputs: the last K-1 real ones ([state ; x] read up to the last real token)
            new_conv = jax.vmap(lambda e, n: jax.lax.dynamic_slice_in_dim(e, n, self.conv_kernel - 1))(seen, n_real)
            cache = (kv_cache_lib.write_state(cache[0], layer, index, state),
                     kv_cache_lib.write_state(cache[1], layer, index, new_conv))

        gate = self.linear((h, d), (None, *HEAD_AXES), "g_b")(self.linear((d,), ("embed", None), "g_a")(gate_in))
        scale = self.param("o_norm", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.norm_eps) * scale.astype(jnp.float32)
        o = (o * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(self.dtype)
        return self.linear((self.hidden_size,), (*HEAD_AXES, "embed"), "o", n_in=2)(o), cache
