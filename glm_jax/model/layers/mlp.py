"""SwiGLU MLP. The gate and up projections share one kernel [embed, 2, mlp]: one matmul, and a tensor-parallel
split along `mlp` keeps each gate column next to its up column."""

import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers.importance import record, sum_squares
from glm_jax.model.layers.linear import Linear


def swiglu(gate, up, limit: float = 0.0):
    """silu(gate) * up; limit > 0 clamps gate above and up on both sides at limit first (GLM-5.3-Flash's
    swiglu_limit, as transformers' Glm5NextTextMLP)."""
    if limit:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return nn.silu(gate) * up


class MLP(nn.Module, kw_only=True):
    hidden_size: int
    ffn_hidden_size: int
    swiglu_limit: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    quantization_bit: int = 0
    gelu: bool = False  # ChatGLM-6B: wo(gelu_tanh(wi(x))), both with biases, wi [embed, mlp]

    @nn.compact
    def __call__(self, x):
        if self.gelu:
            h = Linear(features=(self.ffn_hidden_size,), kernel_axes=("embed", "mlp"), use_bias=True,
                       bias_axes=("mlp",), dtype=self.dtype, param_dtype=self.param_dtype,
                       quantization_bit=self.quantization_bit, name="wi")(x)
            h = nn.gelu(h, approximate=True)
            record(self, "mlp_channels", lambda: sum_squares(h))
            return Linear(features=(self.hidden_size,), kernel_axes=("mlp", "embed"), use_bias=True,
                          bias_axes=("embed",), dtype=self.dtype, param_dtype=self.param_dtype,
                          quantization_bit=self.quantization_bit, name="wo")(h)
        gate_up = Linear(features=(2, self.ffn_hidden_size), kernel_axes=("embed", None, "mlp"), dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         quantization_bit=self.quantization_bit, name="wi")(x)
        gate_up = nn.with_logical_constraint(gate_up, ("activation_batch", "activation_length", None, "activation_mlp"))
        h = swiglu(gate_up[..., 0, :], gate_up[..., 1, :], self.swiglu_limit)
        record(self, "mlp_channels", lambda: sum_squares(h))  # [mlp]: each channel's activation energy
        return Linear(features=(self.hidden_size,), kernel_axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                      quantization_bit=self.quantization_bit, name="wo")(h)
