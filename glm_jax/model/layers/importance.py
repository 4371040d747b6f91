"""Activation statistics for structured pruning (glm_jax/compress, docs/compression.md).

Modules record sums over a call's tokens in the "importance" collection; only when the caller makes it mutable
(`apply(..., mutable=["importance"])`) are they computed at all, so training and inference pay nothing. Inside
the layer scan they stack along the layers like the parameters.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import linen as nn

COLLECTION = "importance"


def record(module: nn.Module, name: str, compute: Callable[[], jnp.ndarray]) -> None:
    """Sows compute() (fp32) under `name` when the importance collection is mutable; else does nothing."""
    if module.is_mutable_collection(COLLECTION):
        module.sow(COLLECTION, name, compute().astype(jnp.float32))


def record_all(module: nn.Module, compute: Callable[[], dict]) -> None:
    """Sows each item of compute() (fp32) under its key, as `record` does for one."""
    if module.is_mutable_collection(COLLECTION):
        for name, value in compute().items():
            module.sow(COLLECTION, name, value.astype(jnp.float32))


def sum_squares(x, keep_last: int = 1):
    """sum of x^2 over every axis but the last `keep_last` (fp32)."""
    x = x.astype(jnp.float32)
    return jnp.sum(x * x, axis=tuple(range(x.ndim - keep_last)))
