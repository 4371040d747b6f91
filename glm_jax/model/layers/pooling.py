"""One vector per sequence from a model's final hidden states: what glm_jax.embed returns and what contrastive
training (data.task: embedding) trains (docs/knowledge.md, "Embeddings")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("last", "mean")


def pool(hidden, mask, pooling: str, normalize: bool = True):
    """hidden [B, S, H], mask [B, S] (1 = real token, right-padded) -> [B, H] fp32."""
    hidden, mask = hidden.astype(jnp.float32), mask.astype(jnp.float32)
    if pooling == "last":
        last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
        out = hidden[jnp.arange(hidden.shape[0]), last]
    elif pooling == "mean":
        out = jnp.sum(hidden * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    else:
        raise ValueError(f"pooling: {pooling!r} is not one of {POOLINGS}")
    if normalize:
        out = out * jax.lax.rsqrt(jnp.maximum(jnp.sum(out * out, axis=-1, keepdims=True), 1e-12))
    return out
