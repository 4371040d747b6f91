"""Structured pruning: importance from calibration data, then a smaller model of the same family (docs/compression.md).

    scores = collect_importance(model, params, batches)          # one jitted pass per batch
    plan = choose_units(cfg, scores, mlp_keep=0.75, heads_keep=0.5, layers_drop=1, experts_keep=6, width_keep=0.75)
    new_cfg, new_params = apply_plan(cfg, params, plan)           # real slices, a consistent config

Units and their scores (summed over the calibration tokens by glm_jax/model/layers/importance.py):
  MLP channels   sum of each channel's squared activation silu(gate) * up (Minitron's activation score)
  KV groups      sum of the squared attention outputs of the group's query heads (whole groups: GQA stays valid)
  MLA heads      each head's squared attention output (its query, key / value up-projection and output rows)
  hidden width   each hidden channel's energy at the normed inputs of every block's two sublayers (Minitron)
  layers         block influence, mean over tokens of 1 - cos(block input, block output) (ShortGPT)
  experts        REAP: mean over the tokens routed to an expert of gate weight x its output's norm; "frequency":
                 how many tokens were routed to it
Every layer keeps the same number of units (its own best ones): the configs of every format have one width.
The hidden channels are one choice for the whole model (the residual stream is shared).
`method="random"` draws the kept units uniformly instead (the baseline importance must beat).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from glm_jax.config import GLMConfig
from glm_jax.model import GLMForCausalLM, param_specs, stack_layers, unstack_layers
from glm_jax.model.layers.importance import COLLECTION


@dataclasses.dataclass
class PrunePlan:
    """What each block keeps (indices into the original units, sorted), and which blocks stay."""

    layers: list[int]  # the original indices of the blocks kept
    mlp: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # block -> MLP channels kept
    kv_groups: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # block -> KV groups kept (GQA)
    heads: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # block -> query heads kept (MLA)
    experts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # block -> routed experts kept
    width: np.ndarray | None = None  # the hidden channels kept (every block, embeddings, norms and head)

    def to_json(self) -> dict:
        return {"layers_kept": self.layers,
                **({"width": self.width.tolist()} if self.width is not None else {}),
                **{name: {str(b): v.tolist() for b, v in getattr(self, name).items()}
                   for name in ("mlp", "kv_groups", "heads", "experts") if getattr(self, name)}}


# ------------------------------------------------------------------------------------------------ importance

@functools.partial(jax.jit, static_argnums=0)
def _batch_stats(model, params, tokens, segments):
    _, variables = model.apply({"params": params}, tokens, segment_ids=segments, mutable=[COLLECTION])
    return variables[COLLECTION]


def collect_importance(model, params, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Per block (in layer order), the activation statistics summed over `batches` of (tokens, segment_ids)
    [B, S]: {"mlp_channels": [F], "head_norms": [H], "block_influence": [2], "embed_channels": [hidden],
    "expert_reap": [2, E], "inputs": {linear: [in...]}} as the block has them."""
    total = None
    for tokens, segments in batches:
        stats = _batch_stats(model, params, jnp.asarray(tokens), jnp.asarray(segments))
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    if total is None:
        raise ValueError("calibration: no batches (the calibration data is empty)")
    blocks = unstack_layers({"model": jax.device_get(total)["model"]})["model"]
    out = []
    for i in range(len([k for k in blocks if k.startswith("layers_")])):
        flat = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(blocks[f"layers_{i}"]):
            keys = [getattr(p, "key", None) for p in path]
            name = next(k for k in reversed(keys) if isinstance(k, str))
            if name.endswith("input_sq"):  # per linear layer: {"attention/query": [in...], "mlp/experts/wi": [E, in]}
                prefix = "/".join(k for k in keys if isinstance(k, str))[:-len("/" + name)]
                linear = prefix if name == "input_sq" else f"{prefix}/{name[:-len('_input_sq')]}"
                flat.setdefault("inputs", {})[linear] = np.asarray(leaf)
                continue
            if name == "mlp_channels" and "shared_experts" in keys:
                continue  # a MoE block's shared expert: its width is the experts' (not pruned here)
            flat[name] = np.asarray(leaf)
        out.append(flat)
    return out


# ------------------------------------------------------------------------------------------------ choosing

def _top(scores: np.ndarray, keep: int, rng: np.random.Generator | None) -> np.ndarray:
    order = rng.permutation(len(scores)) if rng is not None else np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])


def _count(total: int, keep: float | int | None, what: str) -> int:
    """keep as a fraction (0, 1] of total, or a count (int >= 1)."""
    n = int(round(total * keep)) if isinstance(keep, float) else int(keep)
    if not 1 <= n <= total:
        raise ValueError(f"{what}: keeping {keep} of {total} leaves {n}; keep at least 1 and at most all")
    return n


def choose_units(cfg: GLMConfig, scores: list[dict], *, mlp_keep: float | int | None = None,
                 heads_keep: float | int | None = None, layers_drop: int | Iterable[int] = 0,
                 experts_keep: int | None = None, width_keep: float | int | None = None, expert_score: str = "reap",
                 method: str = "importance", seed: int = 0) -> PrunePlan:
    """The units to keep; a float keeps that fraction, an int that many. `heads_keep`: whole KV groups of a GQA
    model, heads of an MLA model. `layers_drop`: how many blocks (the lowest block influence; the first block never
    goes) or an explicit list of block indices. `width_keep`: hidden channels, scored over the kept blocks.
    `expert_score`: "reap" or "frequency"."""
    if method not in ("importance", "random"):
        raise ValueError(f"method: {method!r} is not 'importance' or 'random'")
    rng = np.random.default_rng(seed) if method == "random" else None
    n = cfg.num_layers
    if isinstance(layers_drop, int):
        if not 0 <= layers_drop < n:
            raise ValueError(f"layers_drop: {layers_drop} of {n} layers; keep at least one")
        influence = np.array([s["block_influence"][0] / max(s["block_influence"][1], 1.0) for s in scores])
        influence[0] = np.inf  # the first block reads the embeddings: never a candidate
        candidates = rng.permutation(np.arange(1, n)) if rng is not None else np.argsort(influence, kind="stable")
        dropped = set(int(i) for i in candidates[:layers_drop])
    else:
        dropped = set(int(i) for i in layers_drop)
        if not dropped <= set(range(n)) or len(dropped) >= n:
            raise ValueError(f"layers_drop: {sorted(dropped)} are not block indices below {n} leaving one")
    plan = PrunePlan(layers=[i for i in range(n) if i not in dropped])
    for i in plan.layers:
        s = scores[i]
        if mlp_keep is not None and "mlp_channels" in s:
            plan.mlp[i] = _top(s["mlp_channels"], _count(len(s["mlp_channels"]), mlp_keep, "mlp_keep"), rng)
        if heads_keep is not None and cfg.is_mla:
            plan.heads[i] = _top(s["head_norms"], _count(cfg.num_heads, heads_keep, "heads_keep"), rng)
        elif heads_keep is not None:
            per_group = s["head_norms"].reshape(cfg.num_kv_heads, -1).sum(-1)
            plan.kv_groups[i] = _top(per_group, _count(cfg.num_kv_heads, heads_keep, "heads_keep"), rng)
        if experts_keep is not None and "expert_reap" in s:
            reap, counts = s["expert_reap"]
            score = {"reap": reap / np.maximum(counts, 1.0), "frequency": counts}[expert_score]
            plan.experts[i] = _top(score, _count(cfg.n_routed_experts, experts_keep, "experts_keep"), rng)
    if width_keep is not None:
        energy = sum(scores[i]["embed_channels"] for i in plan.layers)
        plan.width = _top(energy, _count(cfg.hidden_size, width_keep, "width_keep"), rng)
    return plan


# ------------------------------------------------------------------------------------------------ slicing

def _take(tree: dict, path: tuple[str, ...], index: np.ndarray, axis: int) -> None:
    """tree[path] sliced to `index` along `axis` (in place on the dicts, when the leaf exists)."""
    node = tree
    for key in path:
        if key not in node:
            return
        node = node[key]
    _set(tree, list(path), jnp.take(node, jnp.asarray(index), axis=axis))


def apply_plan(cfg: GLMConfig, params, plan: PrunePlan) -> tuple[GLMConfig, dict]:
    """(pruned config, pruned parameters): the kept blocks with their kept units; with `plan.width`, every tensor's
    hidden axis (the `embed` logical axis: embeddings, block projections, router, head) and the hidden-size norms
    sliced to the kept channels."""
    if cfg.is_glm5_next or cfg.indexer_types:
        raise ValueError("prune: per-layer layer / indexer types (glm5_next, GLM-5 shared indexers) are not supported")
    if cfg.num_mtp_layers and plan.layers != list(range(cfg.num_layers)):
        raise ValueError("layers_drop: the model has MTP layers, which read the last block's output; drop no layers")
    if cfg.num_mtp_layers and plan.width is not None:
        raise ValueError("width_keep: the model has MTP layers (their eh_proj concatenates two hidden states)")
    unstacked = unstack_layers(params)
    model = {k: v for k, v in unstacked["model"].items() if not k.startswith("layers_")}
    for new, old in enumerate(plan.layers):
        block = dict(unstacked["model"][f"layers_{old}"])
        if old in plan.mlp:
            _take(block, ("mlp", "wi", "kernel"), plan.mlp[old], -1)
            _take(block, ("mlp", "wo", "kernel"), plan.mlp[old], 0)
        if old in plan.kv_groups:
            groups = plan.kv_groups[old]
            heads = (groups[:, None] * cfg.kv_groups + np.arange(cfg.kv_groups)[None]).reshape(-1)
            for name, index in (("query", heads), ("key", groups), ("value", groups)):
                _take(block, ("attention", name, "kernel"), index, 1)
                _take(block, ("attention", name, "bias"), index, 0)
            _take(block, ("attention", "out", "kernel"), heads, 0)
        if old in plan.heads:  # MLA: a head's query rows, its key / value up-projection and its output rows
            heads = plan.heads[old]
            for name in ("q_b", "query", "kv_b"):
                _take(block, ("attention", name, "kernel"), heads, 1)
            _take(block, ("attention", "out", "kernel"), heads, 0)
        if old in plan.experts:
            kept = plan.experts[old]
            _take(block, ("mlp", "router", "kernel"), kept, 1)
            _take(block, ("mlp", "router", "e_score_correction_bias"), kept, 0)
            _take(block, ("mlp", "experts", "wi"), kept, 0)
            _take(block, ("mlp", "experts", "wo"), kept, 0)
        model[f"layers_{new}"] = block
    changes = {"num_layers": len(plan.layers)}
    if cfg.is_moe:
        changes["first_k_dense_replace"] = sum(i < cfg.first_k_dense_replace for i in plan.layers)
    if plan.mlp:
        changes["ffn_hidden_size"] = len(next(iter(plan.mlp.values())))
    if plan.kv_groups:
        kv = len(next(iter(plan.kv_groups.values())))
        changes.update(num_kv_heads=kv, num_heads=kv * cfg.kv_groups)
    if plan.heads:
        n = len(next(iter(plan.heads.values())))
        changes.update(num_heads=n, num_kv_heads=n)
    if plan.experts:
        changes["n_routed_experts"] = len(next(iter(plan.experts.values())))
    new_cfg = cfg.replace(**changes)
    new_params = {**unstacked, "model": model}
    new_params = stack_layers(new_params) if cfg.scan_layers else new_params
    if plan.width is not None:
        new_params = _slice_width(new_cfg, new_params, plan.width)
        new_cfg = new_cfg.replace(hidden_size=len(plan.width))
    return new_cfg, new_params


def _slice_width(cfg: GLMConfig, params, kept: np.ndarray):
    """Every axis whose logical name is `embed` sliced to `kept`, and the scales of the norms over the hidden state
    (the blocks' own norms and the final one; those inside attention act on heads or latents)."""
    specs = nn.get_partition_spec(param_specs(GLMForCausalLM(cfg)))
    index = jnp.asarray(kept)

    def one(path, spec, leaf):
        keys = [getattr(k, "key", None) for k in path]
        axes = list(spec) if isinstance(spec, jax.sharding.PartitionSpec) else []
        if keys[-1] == "scale" and "norm" in axes and "attention" not in keys:
            axes[axes.index("norm")] = "embed"
        for axis, name in enumerate(axes):
            if name == "embed":
                leaf = jnp.take(leaf, index, axis=axis)
        return leaf

    return jax.tree_util.tree_map_with_path(one, specs, params,
                                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


# ------------------------------------------------------------------------------------------------ sparsity

def sparsity_masks(kernel: np.ndarray, input_sq: np.ndarray | None, sparsity: str, n_in: int) -> np.ndarray:
    """The kept weights of one linear layer's kernel [in..., out...] (bool, same shape). Scores: Wanda's
    |W_ij| * ||X_j|| (`input_sq` = sum of X_j^2 over the calibration tokens), or |W_ij| alone when input_sq is
    None (magnitude). Each output compares its own inputs (Wanda's per-output group): `sparsity` "0.5" drops the
    lowest half of every output's weights, "2:4" two of every four consecutive inputs."""
    shape = kernel.shape
    w = np.abs(kernel.astype(np.float32)).reshape(int(np.prod(shape[:n_in])), -1)  # [IN, OUT]
    score = w if input_sq is None else w * np.sqrt(input_sq.astype(np.float32).reshape(-1, 1))
    keep = np.zeros_like(score, bool)
    if sparsity == "2:4":
        if score.shape[0] % 4:
            raise ValueError(f"sparsity 2:4: {score.shape[0]} inputs are not a multiple of 4")
        groups = score.reshape(-1, 4, score.shape[1])  # [IN / 4, 4, OUT]
        top = np.argsort(-groups, axis=1, kind="stable")[:, :2]
        np.put_along_axis(keep.reshape(groups.shape), top, True, axis=1)
    else:
        drop = int(round(score.shape[0] * float(sparsity)))
        if not 0 <= drop < score.shape[0]:
            raise ValueError(f"sparsity: {sparsity} is not a fraction in [0, 1)")
        order = np.argsort(score, axis=0, kind="stable")  # per output, lowest first
        np.put_along_axis(keep, order[drop:], True, axis=0)
    return keep.reshape(shape)


SPARSE_LINEARS = ("attention/query", "attention/key", "attention/value", "attention/out",  # GQA (and MLA's out)
                  "attention/q_a", "attention/q_b", "attention/kv_a",  # MLA (kv_b: not a Linear, kept dense)
                  "mlp/wi", "mlp/wo", "shared_experts/wi", "shared_experts/wo", "mlp/experts/wi", "mlp/experts/wo")
ROUTED = ("mlp/experts/wi", "mlp/experts/wo")  # stacked [E, in, out...] with per-expert input statistics [E, in]


def sparsify(params, scores: list[dict], sparsity: str, method: str = "wanda"):
    """`params` with the block linears (SPARSE_LINEARS: GQA and MLA projections, dense, shared and routed expert
    MLPs) masked to `sparsity` ("0.5" unstructured or "2:4" semi-structured), scored by Wanda or magnitude; the
    masks live in the dense tensors as zeros. Returns (params, {"weights": n, "zeros": n}) over the masked kernels."""
    if method not in ("wanda", "magnitude"):
        raise ValueError(f"sparsity method: {method!r} is not 'wanda' or 'magnitude'")
    unstacked = unstack_layers(params)
    model = dict(unstacked["model"])
    counts = {"weights": 0, "zeros": 0}
    for i, s in enumerate(scores):
        block = model[f"layers_{i}"]
        for name, inputs in s.get("inputs", {}).items():
            if not name.endswith(SPARSE_LINEARS):
                continue
            node, keys = block, name.split("/")
            for key in keys:
                node = node[key]
            if name.endswith(ROUTED):  # each expert on its own tokens' statistics
                kernel = np.asarray(node)
                keep = np.stack([sparsity_masks(kernel[e], inputs[e] if method == "wanda" else None, sparsity, 1)
                                 for e in range(kernel.shape[0])])
            else:
                keys = keys + ["kernel"]
                kernel = np.asarray(node["kernel"])
                keep = sparsity_masks(kernel, inputs if method == "wanda" else None, sparsity, inputs.ndim)
            _set(block, keys, jnp.asarray(np.where(keep, kernel, 0).astype(kernel.dtype)))
            counts["weights"] += keep.size
            counts["zeros"] += int((~keep).sum())
        model[f"layers_{i}"] = block
    out = {**unstacked, "model": model}
    return (stack_layers(out) if "layers_0" not in params["model"] else out), counts


def _set(tree: dict, path: list[str], value) -> None:
    for key in path[:-1]:
        tree[key] = dict(tree[key])
        tree = tree[key]
    tree[path[-1]] = value
