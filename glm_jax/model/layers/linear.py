"""A dense layer over several input/output axes whose kernel is created at its full shape with logical axes.

(flax's DenseGeneral initialises a flat kernel and reshapes it, which breaks logical sharding constraints on
multi-axis kernels under a mesh; this one never reshapes parameters.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers.importance import record, sum_squares
from glm_jax.platforms import current_platform


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
        y = contract(x.astype(self.dtype), kernel.astype(self.dtype), self.n_in)
        if self.quantization_bit:
            y = y * scale.astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def contract(x, kernel, n_in: int):
    """x's last `n_in` axes against kernel's first ones, in their (common) dtype. On CPU a 16-bit float product
    takes XLA's fast form: an fp32 result (its YNNPACK kernels on the CPU's bf16 instructions: 3-5x faster than
    a bf16 result at 8-64 rows) and never a single row (bf16's matrix-vector form is 3x slower than the same
    product over two rows). GPUs and TPUs accumulate in fp32 either way; there the result dtype would also set
    the backward pass's, so they keep the plain form. Measured: docs/serving.md, "bf16 on CPU"."""
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    if current_platform() != "cpu" or x.dtype.itemsize >= 4:
        return jax.lax.dot_general(x, kernel, dims)
    single = x.ndim > n_in and math.prod(x.shape[:-n_in]) == 1
    if single:
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    y = jax.lax.dot_general(x, kernel, dims, preferred_element_type=jnp.float32).astype(x.dtype)
    return y[:1] if single else y
