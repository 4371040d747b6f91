"""RMSNorm as GLM computes it (statistics and the scale multiply in fp32, one cast back at the end), and the
LayerNorm of ChatGLM-6B."""

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


class LayerNorm(nn.Module, kw_only=True):
    """LayerNorm with scale and bias over the last axis (torch.nn.LayerNorm), statistics in fp32: ChatGLM-6B's
    norms and the DSA indexer's k_norm."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (scale.astype(jnp.float32) * y + bias.astype(jnp.float32)).astype(self.dtype)
