"""The one place that maps the model's logical axis names onto mesh axes.

Modules annotate parameters (`nn.with_logical_partitioning`) and activations (`nn.with_logical_constraint`)
with names such as "embed" or "mlp"; `LOGICAL_RULES` says which mesh axes each name is split over. The mesh
has up to five axes: data (pure data parallel), fsdp (data parallel with sharded params/optimizer state),
expert (expert parallel: the routed experts split over it, tokens exchanged with all-to-all; for every other
layer it is one more fsdp-like data-parallel axis, docs/moe.md "Expert parallelism"), sequence (context
parallel: activations split along the sequence, params/optimizer state sharded as over fsdp) and tensor
(Megatron-style model parallel).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")

# Logical name -> mesh axes (tuple = split over several). Names not listed stay replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    # MoE expert weights [expert, embed, ..., moe_mlp]: experts over the `expert` axis, each expert split like a
    # dense MLP (embed over fsdp, moe_mlp over tensor); docs/moe.md "Expert parallelism". Listed first: flax
    # hands out mesh axes in the order of these rules, so the expert dimension takes `expert` before embed can.
    ("expert", "expert"),
    ("vocab", "tensor"),
    # context-parallel and expert-parallel shards also hold a slice of every weight, as FSDP does; the second
    # rule serves the routed experts' weights, whose expert dimension already takes the `expert` mesh axis
    ("embed", ("fsdp", "sequence", "expert")),
    ("embed", ("fsdp", "sequence")),
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # MLA's latent ranks (glm_jax/model/layers/mla.py, docs/mla.md): q_a [embed, q_lora] and kv_a [embed, kv_lora]
    # split only over embed (fsdp); q_b / kv_b [rank, heads, dim] over q_heads (tensor). A latent is one small
    # vector per token that every head reads, so it stays whole.
    ("q_lora", None),
    ("kv_lora", None),
    # DSA indexer (glm_jax/model/layers/dsa.py): its query heads over tensor like the attention heads (the head
    # sum of its scores is then a reduction over tensor); its one key head stays whole.
    ("index_heads", "tensor"),
    ("index_head_dim", None),
    # KDA (glm5_next, glm_jax/model/layers/kda.py): heads over tensor; each head's recurrent state stays whole
    ("kda_heads", "tensor"),
    ("kda_head_dim", None),
    ("layers", None),
    ("norm", None),
    ("labels", None),
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),  # expert devices take their own rows (data parallel)
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
    ("cache_latent", None),  # MLA's cached [latent ; rotary key] per token: one row shared by every head
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, devices=None,
              expert: int = 1) -> Mesh:
    """A mesh over `devices` (default: all) with axes (data, fsdp, expert, sequence, tensor).

    A size of -1 on one axis takes whatever the others leave. Tensor is the innermost axis so that it maps
    onto the fastest interconnect (NVLink / neighbouring TPU chips); expert is inside data and fsdp, so that its
    all-to-all stays among near devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(data=data, fsdp=fsdp, expert=expert, sequence=sequence, tensor=tensor)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total > len(devices):
        raise ValueError(f"mesh: {sizes} needs {total} devices but only {len(devices)} are available")
    if total < len(devices):
        log.warning("mesh %s uses %d of %d devices", sizes, total, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices[:total])
    except Exception:  # non-TPU/GPU topologies (e.g. fake CPU devices): plain order is fine
        arr = np.asarray(devices[:total]).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tensor with `logical_axes`.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension (2 KV heads over 8-way tensor
    parallelism, say) is dropped for that dimension, which replicates it instead of failing to compile.
    Each mesh axis is used at most once per tensor.
    """
    spec = nn.logical_to_mesh_axes(logical_axes, rules)
    if shape is None or mesh is None:
        return spec
    out, used = [], set()
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for a in axes:
            size = mesh.shape[a]
            if a in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[k] for k in keep) * size) == 0:
                keep.append(a)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def param_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a boxed parameter tree (e.g. `glm_jax.param_specs(model)`).

    Leaves must be `nn.LogicallyPartitioned` boxes or plain arrays (plain arrays are replicated).
    Returns an unboxed tree of shardings matching `nn.unbox(abstract_params)`.
    """
    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape=None, rules=LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def axis_rules(rules=LOGICAL_RULES):
    """Context manager that activates the rules for `nn.with_logical_constraint` inside model code."""
    return nn.logical_axis_rules(rules)


def use_mesh(mesh: Mesh):
    """Context manager making `mesh` the current one (jax.set_mesh on new jax, the Mesh context on older)."""
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def run_sharded(mesh: Mesh | None, rules, fn, *args):
    """fn(*args) under `mesh` and the logical axis `rules`, so that the model's activation constraints apply while
    a jitted fn traces (just fn(*args) without a mesh)."""
    if mesh is None:
        return fn(*args)
    with use_mesh(mesh), axis_rules(rules):
        return fn(*args)
