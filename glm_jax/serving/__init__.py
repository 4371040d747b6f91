"""Serving: the continuous-batching engine over a paged KV cache (docs/serving.md)."""

from glm_jax.serving.engine import Engine, QueueFull, RequestOutput
from glm_jax.serving.sampling import SamplingParams

__all__ = ["Engine", "QueueFull", "RequestOutput", "SamplingParams"]
