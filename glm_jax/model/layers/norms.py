"""RMSNorm as GLM computes it (statistics and the scale multiply in fp32, one cast back at the end), and the
LayerNorm of ChatGLM-6B."""

import jax
import jax.numpy as jnp
from flax import linen as nn


class _Norm(nn.Module, kw_only=True):
    """The fields and per-channel parameters every norm here has."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def channel_param(self, name: str, init, x):
        """A parameter [channels] over x's last axis (logical axis "norm"), in fp32 for the arithmetic."""
        return self.param(name, nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                          self.param_dtype).astype(jnp.float32)


class RMSNorm(_Norm):
    @nn.compact
    def __call__(self, x):
        scale = self.channel_param("scale", nn.initializers.ones, x)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * y).astype(self.dtype)


class LayerNorm(_Norm):
    """LayerNorm with scale and bias over the last axis (torch.nn.LayerNorm), statistics in fp32: ChatGLM-6B's
    norms and the DSA indexer's k_norm."""

    @nn.compact
    def __call__(self, x):
        scale = self.channel_param("scale", nn.initializers.ones, x)
        bias = self.channel_param("bias", nn.initializers.zeros, x)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (scale * y + bias).astype(self.dtype)
