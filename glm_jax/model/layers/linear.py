"""A dense layer over several input/output axes whose kernel is created at its full shape with logical axes.

(flax's DenseGeneral initialises a flat kernel and reshapes it, which breaks logical sharding constraints on
multi-axis kernels under a mesh; this one never reshapes parameters.)
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers.importance import record, sum_squares


class Linear(nn.Module, kw_only=True):
    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]  # logical names of (input axes..., output axes...)
    n_in: int = 1  # how many trailing input axes are contracted
    use_bias: bool = False
    bias_axes: tuple[str | None, ...] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    # Weight-only quantization (THUDM's scheme): int8 / int4 kernel plus a scale per output feature, applied
    # to the matmul's output (x @ (q * s) == (x @ q) * s); the kernel is converted inside the fused matmul.
    quantization_bit: int = 0

    @nn.compact
    def __call__(self, x):
        shape = (*x.shape[-self.n_in:], *self.features)
        if self.quantization_bit:
            kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes),
                                shape, jnp.int8 if self.quantization_bit == 8 else jnp.int4)
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                     self.kernel_axes[self.n_in:]),
                               tuple(self.features), self.param_dtype)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                       self.kernel_axes), shape, self.param_dtype)
        record(self, "input_sq", lambda: sum_squares(x, keep_last=self.n_in))  # Wanda's ||X_j||^2 per input
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.quantization_bit:
            y = y * scale.astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
