"""Small building blocks of the GLM decoder (MaxText-style layers folder)."""

from glm_jax.model.layers.attention import Attention, dot_product_attention
from glm_jax.model.layers.linear import Linear
from glm_jax.model.layers.embeddings import Embed, apply_rotary, rotary_cos_sin
from glm_jax.model.layers.mlp import MLP
from glm_jax.model.layers.moe import MoE
from glm_jax.model.layers.norms import RMSNorm

__all__ = ["Linear", "Attention", "dot_product_attention", "Embed", "apply_rotary", "rotary_cos_sin", "MLP", "MoE",
           "RMSNorm"]
