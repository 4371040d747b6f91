"""Token embedding, token positions and GLM's rotary position embedding."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def positions_from_segments(segment_ids):
    """Per-token positions restarting at 0 wherever the segment id changes (packing, left padding)."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
    prev = jnp.concatenate([jnp.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], axis=1)
    run_start = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
    return idx - run_start


def check_ids(ids, vocab_size: int) -> None:
    """ValueError for token ids outside [0, vocab_size) when they are concrete (an eager `model.apply`). Under
    jax.jit they are not known, and the gather gives such ids NaN embeddings (jnp.take's fill mode)."""
    if isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True) or ids.size == 0:
        return
    host = np.asarray(ids)  # on the host: jnp.min would be staged into a trace that closes over concrete ids
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids: token ids must be in [0, {vocab_size}) (the model's vocab_size), got ids from "
                         f"{lo} to {hi}")


class Embed(nn.Module, kw_only=True):
    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        check_ids(ids, self.vocab_size)
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (self.vocab_size, self.features), self.param_dtype)
        # Gather from a table whose embed axis is unsharded: a gather from the fsdp-sharded table cannot produce
        # batch-sharded rows without replicating them first (XLA's "involuntary full rematerialization").
        table = nn.with_logical_constraint(table, ("vocab", None))
        out = jnp.take(table, ids, axis=0).astype(self.dtype)  # GLM does not scale the embedding output
        return nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_embed"))


def rotary_cos_sin(positions, rotary_dim: int, theta: float, position_divisor: float, dtype,
                   half_inv_freq: bool = False):
    """cos/sin tables [batch, seq, rotary_dim // 2] for integer `positions` [batch, seq].

    Computed in fp32, then rounded to the activation dtype as the original code does. `half_inv_freq`: the
    frequencies rounded through float16 first, as ChatGLM-6B's code stores them.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    if half_inv_freq:
        inv_freq = inv_freq.astype(jnp.float16).astype(jnp.float32)
    angles = (positions.astype(jnp.float32) / position_divisor)[..., None] * inv_freq
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x, cos, sin, interleaved: bool = True):
    """Rotates the first 2*cos.shape[-1] dims of each head of x [batch, seq, heads, head_dim].

    interleaved=True: GLM pairs ADJACENT dims (2i, 2i+1) ("GPT-J style", ChatGLM2/3 and GLM-4).
    interleaved=False: dim i pairs with dim i + rot/2 (the split-half "NeoX" layout of glm4_moe, transformers'
    rotate_half). The remaining dims pass through unchanged.
    """
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    if interleaved:
        pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).reshape(x_rot.shape)
    else:
        x0, x1 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        out = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)
