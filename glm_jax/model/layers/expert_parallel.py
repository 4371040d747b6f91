"""Expert parallelism for the routed experts of a MoE layer (docs/moe.md, "Expert parallelism").

With a mesh axis `expert` of size X > 1, expert e lives on expert shard e // (E / X) and the layer runs per
device inside `shard_map`:

  all-to-all (prefill, training: GLMConfig.moe_impl ragged / auto on many tokens)
      each device routes its own T tokens (T*k assignments), sorts them by expert and packs them into a send
      buffer [X, C, H], one block of C = T * min(k, E/X) rows per destination shard (the most one token can
      send to a shard is min(k, E/X) assignments, so no assignment is ever dropped); `jax.lax.all_to_all`
      over `expert` delivers block j to shard j; the receiver sorts its X*C rows by local expert (padding last)
      and runs its E/X experts with `jax.lax.ragged_dot`; a second all-to-all returns the rows to their senders.
  local gather (decode: moe_impl gather / auto on few tokens)
      every shard sees all the layer's tokens (all-gathered over `expert` when split), computes the
      assignments that chose one of ITS experts by gathering only those experts' weights, and the results are
      summed over `expert`: a decode step reads top_k experts' weights per token, spread over the shards.

Inside each expert, `tensor` splits moe_mlp (each device holds a column slice of gate/up and a row slice of
down; the partial outputs are summed over `tensor` after the return trip) and the embed dimension of the
weights, split over fsdp / sequence, is all-gathered on entry (its gradient is reduce-scattered back).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from glm_jax.sharding import logical_to_spec

EXPERT_AXIS = "expert"
WI_AXES = ("expert", "embed", None, "moe_mlp")
WO_AXES = ("expert", "moe_mlp", "embed")
TOKEN_AXES = ("activation_batch", "activation_length", None)


def _shard_map(fn, mesh, in_specs, out_specs):
    """jax.shard_map where it exists (jax >= 0.7), else the experimental one; replication is not checked
    (the outputs' specs are what the code makes them)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _axes(entry) -> tuple:
    """One PartitionSpec entry -> the tuple of mesh axes it names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_shards(mesh=None) -> int:
    """Size of the current (abstract) mesh's `expert` axis; 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)


def capacity(tokens: int, top_k: int, experts_per_shard: int) -> int:
    """Rows per (sender, receiver) block: a token's k experts are distinct, so at most min(k, E/X) of its
    assignments go to one shard; T * min(k, E/X) is the worst case, so nothing is ever dropped."""
    return tokens * min(top_k, experts_per_shard)


def dispatch_plan(experts, num_shards: int, experts_per_shard: int):
    """Where this shard's T*k assignments go. experts [T, k] global ids ->
    (order [T*k]: assignments sorted by expert, slot [T*k]: the sorted assignment's row in the send buffer
    [num_shards * C] (block = destination shard), local [T*k]: its expert's index on that shard)."""
    t, k = experts.shape
    cap = capacity(t, k, experts_per_shard)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    dest = flat[order] // experts_per_shard  # sorted by expert, hence by destination
    counts = jnp.zeros(num_shards, jnp.int32).at[dest].add(1)
    start = jnp.cumsum(counts) - counts
    slot = dest * cap + jnp.arange(t * k, dtype=jnp.int32) - start[dest]
    return order, slot, flat[order] % experts_per_shard


def all_to_all_experts(x, experts, compute, *, axis: str, num_shards: int, experts_per_shard: int):
    """Inside shard_map (or vmap) over `axis`. x [T, H] this shard's tokens, experts [T, k] global expert ids;
    compute(rows [N, H] sorted by local expert, group_sizes [E/X]) -> [N, D] runs this shard's experts (rows past
    sum(group_sizes) are padding). Returns each assignment's output [T, k, D], computed on the shard that holds
    its expert."""
    t, h = x.shape
    k = experts.shape[1]
    n = num_shards * capacity(t, k, experts_per_shard)
    order, slot, local = dispatch_plan(experts, num_shards, experts_per_shard)
    send = jnp.zeros((n, h), x.dtype).at[slot].set(jnp.take(x, order // k, axis=0), unique_indices=True)
    send_ids = jnp.full((n,), experts_per_shard, jnp.int32).at[slot].set(local, unique_indices=True)  # pad = E/X
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # block i now holds what shard i sent here
    recv_ids = jax.lax.all_to_all(send_ids, axis, 0, 0, tiled=True)
    by_expert = jnp.argsort(recv_ids, stable=True)  # padding (id E/X) sorts last
    group_sizes = jnp.zeros(experts_per_shard, jnp.int32).at[recv_ids].add(1, mode="drop")
    ys = compute(jnp.take(recv, by_expert, axis=0), group_sizes)
    ys = jnp.zeros_like(ys).at[by_expert].set(ys, unique_indices=True)
    back = jax.lax.all_to_all(ys, axis, 0, 0, tiled=True)  # block j: our rows, computed on shard j
    y = jnp.take(back, slot, axis=0)  # sorted assignments
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True).reshape(t, k, -1)


def _local_gather(x, weights, experts, wi, wo, gather_fn, *, split: bool, experts_per_shard: int):
    """Decode path inside shard_map: the assignments whose expert lives here, with only those experts' weights
    gathered; the others weigh 0. Summed (or, with tokens split over `expert`, reduce-scattered) over it."""
    if split:
        x, weights, experts = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True) for a in (x, weights, experts))
    local = experts - jax.lax.axis_index(EXPERT_AXIS) * experts_per_shard
    mine = (local >= 0) & (local < experts_per_shard)
    y = gather_fn(x, jnp.where(mine, weights, 0.0), jnp.clip(local, 0, experts_per_shard - 1), wi, wo)
    y = y.astype(jnp.float32)
    if split:
        return jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, EXPERT_AXIS)


def experts_expert_parallel(x, weights, experts, wi, wo, *, mode: str, ffn, gather_fn, mesh=None):
    """The routed experts under a mesh with `expert` > 1. x [B, S, H], weights / experts [B, S, k] (global,
    sharded by the activation rules); wi [E, H, 2, I], wo [E, I, H] sharded by the parameter rules.
    mode "all_to_all" or "gather"; ffn(rows, wi, wo, group_sizes) = the ragged grouped SwiGLU;
    gather_fn = experts_gather. Returns [B, S, H]."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    nx, e = dict(mesh.shape)[EXPERT_AXIS], wi.shape[0]
    if e % nx:
        raise ValueError(f"expert parallelism: {e} experts do not split over mesh axis expert={nx}")
    x_spec = logical_to_spec(TOKEN_AXES, x.shape, mesh)
    r_spec = P(x_spec[0], x_spec[1], None)
    wi_spec, wo_spec = logical_to_spec(WI_AXES, wi.shape, mesh), logical_to_spec(WO_AXES, wo.shape, mesh)
    if _axes(wi_spec[0]) != (EXPERT_AXIS,) or wi_spec[1] != wo_spec[2] or wi_spec[3] != wo_spec[1]:
        raise ValueError(f"expert parallelism: unexpected expert weight specs {wi_spec} / {wo_spec}")
    embed, tensor = _axes(wi_spec[1]), _axes(wi_spec[3])
    split = EXPERT_AXIS in _axes(x_spec[0])
    per_shard = e // nx

    def body(x, weights, experts, wi, wo):
        wi, wo = wi.astype(x.dtype), wo.astype(x.dtype)  # gather in the compute dtype: half the bytes in bf16
        if embed:  # FSDP: whole rows of each local expert, for this layer only
            wi = jax.lax.all_gather(wi, embed, axis=1, tiled=True)
            wo = jax.lax.all_gather(wo, embed, axis=2, tiled=True)
        b, s, h = x.shape
        xf, wf, ef = x.reshape(b * s, h), weights.reshape(b * s, -1), experts.reshape(b * s, -1)
        if mode == "gather":
            y = _local_gather(xf, wf, ef, wi, wo, gather_fn, split=split, experts_per_shard=per_shard)
        else:
            ys = all_to_all_experts(xf, ef, lambda rows, sizes: ffn(rows, wi, wo, sizes), axis=EXPERT_AXIS,
                                    num_shards=nx, experts_per_shard=per_shard)
            y = jnp.einsum("tkh,tk->th", ys.astype(jnp.float32), wf)
        if tensor:  # each device summed over its slice of moe_mlp only
            y = jax.lax.psum(y, tensor)
        return y.astype(x.dtype).reshape(b, s, h)

    return _shard_map(body, mesh, (x_spec, r_spec, r_spec, wi_spec, wo_spec), x_spec)(x, weights, experts, wi, wo)
