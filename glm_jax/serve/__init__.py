"""Serving: the continuous-batching engine over a paged KV cache (docs/serving.md)."""

from glm_jax.serve.engine import Engine, QueueFull, RequestOutput
from glm_jax.serve.sampling import SamplingParams

__all__ = ["Engine", "QueueFull", "RequestOutput", "SamplingParams"]
