"""LoRA as a parameter transform outside the model: kernel_eff = kernel + (alpha / rank) * A @ B.

The base parameters stay frozen (not in the optimizer state; for a MoE model that includes every router's
kernel and e_score_correction_bias); only the A/B factors are trained. Targets name kernels of the blocks, in
each layer stack (model/layers = dense-MLP blocks, model/moe_layers = MoE blocks) that has them:

    query / key / value   <stack>/attention/<t>/kernel           [L, embed, heads, head_dim]   in = embed
    out                   <stack>/attention/out/kernel           [L, heads, head_dim, embed]   in = heads*head_dim
    wi                    layers/mlp/wi/kernel                   [L, embed, 2, mlp]            in = embed
                          moe_layers/mlp/shared_experts/wi/kernel  (the shared experts: a dense SwiGLU MLP)
    wo                    layers/mlp/wo/kernel                   [L, mlp, embed]               in = mlp
                          moe_layers/mlp/shared_experts/wo/kernel
    experts_wi            moe_layers/mlp/experts/wi              [L, E, embed, 2, moe_mlp]     in = embed
    experts_wo            moe_layers/mlp/experts/wo              [L, E, moe_mlp, embed]        in = moe_mlp
  multi-head latent attention (glm4_moe_lite / glm_moe_dsa, glm_jax/model/layers/mla.py; `query` and `out` above
  also name MLA's full-rank query (q_lora_rank 0) and its output [L, heads, v_head_dim, embed]):
    q_a                   <stack>/attention/q_a/kernel           [L, embed, q_lora]            in = embed
    q_b                   <stack>/attention/q_b/kernel           [L, q_lora, heads, qk_dim]    in = q_lora
    kv_a                  <stack>/attention/kv_a/kernel          [L, embed, kv_lora + rope]    in = embed
    kv_b                  <stack>/attention/kv_b/kernel          [L, kv_lora, heads, nope + v] in = kv_lora
  Kimi delta attention (glm5_next's KDA layers, glm_jax/model/layers/kda.py):
    kda_q / kda_k / kda_v <stack>/attention/{q,k,v}/kernel       [L, embed, heads, head_dim]   in = embed
    kda_o                 <stack>/attention/o/kernel             [L, heads, head_dim, embed]   in = heads*head_dim
glm5_next's stacks are the blocks of its repeating units (glm_jax.model.glm.hybrid_stacks): hybrid_<k>/block_<j>,
whose LoRA keys are {"hybrid_<k>": {"block_<j>": {target: {"a", "b"}}}}.

A is [*lead, in, rank] (normal, std 1/sqrt(in)), B is [*lead, rank, out] (zeros), so training starts at the base
model; lead = [L] for a stacked kernel and [L, E] for the routed experts (one low-rank pair per expert). The
trained tree is {target: {"a", "b"}} for model/layers and {"moe_layers": {target: {"a", "b"}}} for the MoE stack.
Dropout: because the transform acts on weights, `lora.dropout` drops input features of A (rows of A, the same
for every token of a step) instead of per-token activations, which would need a hook inside the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from glm_jax.convert.hf import get_path
from glm_jax.train.config import ConfigError

# target -> [(path inside a block, leading dims of the kernel (layers [, experts]), input dims)]
BLOCK_TARGETS = {
    "query": [(("attention", "query", "kernel"), 1, 1)],
    "key": [(("attention", "key", "kernel"), 1, 1)],
    "value": [(("attention", "value", "kernel"), 1, 1)],
    "out": [(("attention", "out", "kernel"), 1, 2)],
    "wi": [(("mlp", "wi", "kernel"), 1, 1), (("mlp", "shared_experts", "wi", "kernel"), 1, 1)],
    "wo": [(("mlp", "wo", "kernel"), 1, 1), (("mlp", "shared_experts", "wo", "kernel"), 1, 1)],
    "experts_wi": [(("mlp", "experts", "wi"), 2, 1)],
    "experts_wo": [(("mlp", "experts", "wo"), 2, 1)],
    # MLA's latent projections (docs/mla.md); kv_b's delta is merged before the absorbed decode splits it
    "q_a": [(("attention", "q_a", "kernel"), 1, 1)],
    "q_b": [(("attention", "q_b", "kernel"), 1, 1)],
    "kv_a": [(("attention", "kv_a", "kernel"), 1, 1)],
    "kv_b": [(("attention", "kv_b", "kernel"), 1, 1)],
    "kda_q": [(("attention", "q", "kernel"), 1, 1)],
    "kda_k": [(("attention", "k", "kernel"), 1, 1)],
    "kda_v": [(("attention", "v", "kernel"), 1, 1)],
    "kda_o": [(("attention", "o", "kernel"), 1, 2)],
}
STACKS = ("layers", "moe_layers")  # glm_jax.model.glm.STACKS; the first keeps the flat {target: ...} keys


def _has(tree, path) -> bool:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def stacks(base) -> list[tuple[str, ...]]:
    """The block stacks of `base` (paths under model/): layers / moe_layers, or glm5_next's unit blocks."""
    model = base.get("model", {})
    hybrid = [(k, j) for k in sorted(model) if k.startswith("hybrid_") for j in sorted(model[k])]
    return [(s,) for s in STACKS if s in model] + hybrid


def sites(base, targets) -> list[tuple[tuple, tuple, int, int]]:
    """(key path in the LoRA tree, kernel path in `base`, leading dims, input dims) of every kernel `targets`
    name in `base` (arrays or shapes). A target that names no kernel of this model is an error."""
    out = []
    for t in targets:
        found = []
        for stack in stacks(base):
            for sub, lead, n_in in BLOCK_TARGETS[t]:
                path = ("model",) + stack + sub
                if _has(base, path):
                    found.append(((t,) if stack == STACKS[:1] else stack + (t,), path, lead, n_in))
        if not found:
            raise ConfigError(f"lora.targets: {t!r} names no weight of this model (experts_wi / experts_wo need a "
                             f"MoE model, q_a / q_b / kv_a / kv_b latent attention, key / value a GQA one, "
                             f"kda_q / kda_k / kda_v / kda_o KDA layers)")
        out += found
    return out


def _dims(shape, lead, n_in):
    rest = shape[lead:]
    return tuple(shape[:lead]), math.prod(rest[:n_in]), math.prod(rest[n_in:])


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def lora_shapes(base_shapes, targets, rank: int) -> dict:
    out = {}
    for key, path, lead, n_in in sites(base_shapes, targets):
        lead_dims, d_in, d_out = _dims(get_path(base_shapes, path).shape, lead, n_in)
        _set(out, key, {"a": jax.ShapeDtypeStruct(lead_dims + (d_in, rank), jnp.float32),
                        "b": jax.ShapeDtypeStruct(lead_dims + (rank, d_out), jnp.float32)})
    return out


def init_lora(rng, base_params, targets, rank: int) -> dict:
    """The LoRA tree (see the module docstring) in float32: A random, B zero."""
    out = {}
    for i, (key, path, lead, n_in) in enumerate(sites(base_params, targets)):
        lead_dims, d_in, d_out = _dims(get_path(base_params, path).shape, lead, n_in)
        a = jax.random.normal(jax.random.fold_in(rng, i), lead_dims + (d_in, rank), jnp.float32) / math.sqrt(d_in)
        _set(out, key, {"a": a, "b": jnp.zeros(lead_dims + (rank, d_out), jnp.float32)})
    return out


def merge(base_params, lora_params, alpha: float, rank: int, dropout: float = 0.0, rng=None) -> dict:
    """Base parameters with every LoRA delta added (a new tree; the untouched leaves are shared)."""
    scale = alpha / rank
    merged = jax.tree.map(lambda x: x, base_params)  # shallow copy of the nested dicts
    every = [s for s in sites(base_params, [t for t in BLOCK_TARGETS if any(
        _has(lora_params, (t,) if st == STACKS[:1] else st + (t,)) for st in stacks(base_params))])
             if _has(lora_params, s[0])]
    for i, (key, path, _, _) in enumerate(sorted(every)):
        ab = get_path(lora_params, key)
        kernel = get_path(base_params, path)
        a = ab["a"]
        if dropout > 0 and rng is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1 - dropout, a.shape[:-1] + (1,))
            a = jnp.where(keep, a / (1 - dropout), 0)
        delta = jnp.einsum("...ir,...ro->...io", a, ab["b"]).reshape(kernel.shape) * scale
        node = merged
        for k in path[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        node[path[-1]] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return merged
