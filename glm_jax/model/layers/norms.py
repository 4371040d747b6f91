"""RMSNorm as GLM computes it: statistics and the scale multiply in fp32, one cast back at the end."""

import jax
import jax.numpy as jnp
from flax import linen as nn


class RMSNorm(nn.Module, kw_only=True):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * y).astype(self.dtype)
