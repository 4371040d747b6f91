"""Mixture-of-experts feed-forward layer of glm4_moe (GLM-4.5, GLM-4.5-Air, GLM-4.6), as transformers'
`Glm4MoeMoE` computes it, built from pieces that the MLA models (GLM-4.7-Flash, GLM-5) can reuse.

    router:  scores = sigmoid(x @ W_router) in fp32
             choose with scores + e_score_correction_bias (group-limited: keep the topk_group groups whose two
             best biased scores sum highest, then the top-k experts among them); the bias only chooses
             weights = the UNBIASED scores of the chosen experts, / their sum if norm_topk_prob,
                       * routed_scaling_factor
    experts: y = sum_k weights_k * FFN_{expert_k}(x)        (SwiGLU FFNs of moe_intermediate_size)
    shared:  + SwiGLU(x) of n_shared_experts * moe_intermediate_size, on every token

The routed experts are dropless, computed one of three ways (GLMConfig.moe_impl):
  ragged  the token-expert assignments sorted by expert, one grouped matmul per projection over them
          (`jax.lax.ragged_dot`, group sizes = tokens per expert): a native grouped GEMM on TPU and GPU. (JAX
          0.10's CPU lowering of ragged_dot expands the groups densely; that is a CPU backend detail.)
  gather  each assignment multiplies its own expert's weights, gathered by expert id: a batched matmul that
          reads only the chosen experts, for decoding (a batch-1 step reads top_k experts, not all of them).
  auto    gather while tokens * top_k < n_routed_experts (decode steps), else ragged (prefill, training).
  dense   every expert on every token, weighted by the (mostly zero) routing weights: a test reference only.
Under a mesh whose `expert` axis is > 1, ragged becomes an all-to-all exchange between the expert shards and
gather a per-shard gather + sum (glm_jax/model/layers/expert_parallel.py, docs/moe.md "Expert parallelism").

Parameters (logical axes in brackets; glm_jax/sharding.py maps them onto mesh axes):
    router/kernel                     [embed, E]                 (embed, None)
    router/e_score_correction_bias    [E] float32                (None)   only chooses; no gradient flows to it
    experts/wi                        [E, embed, 2, moe_mlp]     (expert, embed, None, moe_mlp)   (gate, up)
    experts/wo                        [E, moe_mlp, embed]        (expert, moe_mlp, embed)
    shared_experts/{wi,wo}/kernel     the dense MLP's layout, n_shared_experts * moe_intermediate_size wide
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.model.layers import expert_parallel
from glm_jax.model.layers.importance import record_all
from glm_jax.model.layers.mlp import MLP, swiglu


def route(logits, correction_bias, *, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """transformers' Glm4MoeTopkRouter on router logits [T, E] (fp32) -> (weights [T, k] fp32, experts [T, k]).

    The correction bias shifts the scores used to CHOOSE experts (groups and top-k); the weights are the
    unbiased sigmoid scores of the chosen experts. With n_group > 1 only the topk_group groups whose top-2
    biased scores sum highest compete."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + jax.lax.stop_gradient(correction_bias.astype(jnp.float32))
    t, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(t, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        _, groups = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // n_group, axis=1), choice, -jnp.inf)
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(choice), top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * routed_scaling_factor, experts.astype(jnp.int32)


def load_stats(logits, experts, num_experts: int, num_sequences: int = 1, token_mask=None):
    """What training reads of one router call (docs/moe.md, "Training"): (tokens per expert [E] fp32, the sum
    over the `num_sequences` sequences of DeepSeek-V3's sequence-wise balance term sum_i f_i * P_i).

    Per sequence of S real tokens: f_i = E / (k * S) * (tokens that chose expert i), P_i = mean over its tokens
    of s_i / sum_j s_j (s = sigmoid scores). `token_mask` [T] (1 = real token, 0 = padding; default all real)
    keeps padding out of both. Gradients reach the router through P only."""
    t, k = experts.shape
    mask = jnp.ones((t,), jnp.float32) if token_mask is None else token_mask.reshape(t).astype(jnp.float32)
    seq = jnp.repeat(jnp.arange(num_sequences), t // num_sequences * k)  # rows are whole sequences, in order
    per_seq = jnp.zeros((num_sequences, num_experts), jnp.float32).at[seq, experts.reshape(-1)].add(
        jnp.repeat(mask, k))
    real = jnp.maximum(mask.reshape(num_sequences, -1).sum(1, keepdims=True), 1.0)  # [S, 1]
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    share = (scores / scores.sum(-1, keepdims=True)) * mask[:, None]
    p = share.reshape(num_sequences, -1, num_experts).sum(1) / real
    f = per_seq * num_experts / (k * real)
    return per_seq.sum(0), jnp.sum(f * p)


def _swiglu(gate_up, limit: float = 0.0):
    """[..., 2, I] (gate, up) -> silu(gate) * up; limit > 0 first clamps gate above and up on both sides at limit
    (GLM-5.3-Flash's swiglu_limit)."""
    return swiglu(gate_up[..., 0, :], gate_up[..., 1, :], limit)


def _combine(y, weights, dtype):
    """Per-assignment outputs [T, k, H] weighted by the routing weights (fp32) and summed over k."""
    return jnp.einsum("tkh,tk->th", y.astype(jnp.float32), weights).astype(dtype)


def experts_ragged(x, weights, experts, wi, wo, limit: float = 0.0):
    """Dropless grouped matmul: the T*k (token, expert) assignments sorted by expert, each projection one
    `jax.lax.ragged_dot` whose groups are the experts' runs. x [T, H] -> [T, H]."""
    t, h = x.shape
    k = experts.shape[1]
    e = wi.shape[0]
    flat = experts.reshape(-1)  # assignment a = token a // k, slot a % k
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [T*k, H], grouped by expert
    ys = ragged_ffn(xs, wi, wo, group_sizes, limit)  # [T*k, H]
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)  # back to (token, slot) order
    return _combine(y.reshape(t, k, h), weights, x.dtype)


def ragged_ffn(xs, wi, wo, group_sizes, limit: float = 0.0):
    """The experts' SwiGLU on rows xs [N, H] sorted by expert (group_sizes [E] rows each; rows past their sum
    give 0): two `jax.lax.ragged_dot` grouped matmuls. -> [N, H]."""
    e, h, _, i = wi.shape
    gate_up = jax.lax.ragged_dot(xs, wi.reshape(e, h, 2 * i).astype(xs.dtype), group_sizes)
    return jax.lax.ragged_dot(_swiglu(gate_up.reshape(-1, 2, i), limit), wo.astype(xs.dtype), group_sizes)


def experts_gather(x, weights, experts, wi, wo, limit: float = 0.0):
    """Each assignment multiplies its own expert's weights, gathered by expert id: reads top_k experts per token
    and never the others (decode steps). x [T, H] -> [T, H]."""
    t, h = x.shape
    return _combine(_assignment_outputs(x, experts, wi, wo, limit).reshape(t, experts.shape[1], h), weights, x.dtype)


def _assignment_hidden(x, experts, wi, limit: float = 0.0):
    """([T*k, H], [T*k, I]): each (token, chosen expert) assignment's input and SwiGLU activation, the expert's
    weights gathered by id."""
    flat = experts.reshape(-1)
    xs = jnp.repeat(x, experts.shape[1], axis=0)  # [T*k, H]
    gate_up = jnp.einsum("ah,ahgi->agi", xs, jnp.take(wi, flat, axis=0).astype(x.dtype))
    return xs, _swiglu(gate_up, limit)


def _assignment_outputs(x, experts, wi, wo, limit: float = 0.0):
    """[T*k, H]: each (token, chosen expert) assignment's expert output."""
    _, hidden = _assignment_hidden(x, experts, wi, limit)
    return jnp.einsum("ai,aih->ah", hidden, jnp.take(wo, experts.reshape(-1), axis=0).astype(x.dtype))


def experts_dense(x, weights, experts, wi, wo, limit: float = 0.0):
    """Test reference: every expert on every token, combined with routing weights that are zero for the experts
    a token did not choose. x [T, H] -> [T, H]."""
    t = x.shape[0]
    e = wi.shape[0]
    gate_up = jnp.einsum("th,ehgi->tegi", x, wi.astype(x.dtype))
    ys = jnp.einsum("tei,eih->teh", _swiglu(gate_up, limit), wo.astype(x.dtype))
    dense_weights = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], experts].add(weights)
    return jnp.einsum("teh,te->th", ys.astype(jnp.float32), dense_weights).astype(x.dtype)


def expert_statistics(x, weights, experts, wi, wo, limit: float = 0.0) -> dict:
    """The routed experts' calibration statistics (glm_jax/compress; not a training path):
    expert_reap [2, E]   per expert, the sum over the tokens routed to it of gate weight x the norm of its output
                         (REAP: router-weighted expert activation), and how many tokens were routed to it;
    wi_input_sq [E, H], wo_input_sq [E, I]   per expert, each input feature of wi / wo squared, summed over the
                         tokens routed to it (Wanda's ||X_j||^2, expert by expert)."""
    e, flat = wi.shape[0], experts.reshape(-1)
    xs, hidden = _assignment_hidden(x, experts, wi, limit)
    ys = jnp.einsum("ai,aih->ah", hidden, jnp.take(wo, flat, axis=0).astype(x.dtype))
    norms = jnp.linalg.norm(ys.astype(jnp.float32), axis=-1) * weights.reshape(-1).astype(jnp.float32)
    per_expert = lambda v: jax.ops.segment_sum(jnp.square(v.astype(jnp.float32)), flat, e)  # noqa: E731
    return {"expert_reap": jnp.stack([jax.ops.segment_sum(norms, flat, e),
                                      jnp.bincount(flat, length=e).astype(jnp.float32)]),
            "wi_input_sq": per_expert(xs), "wo_input_sq": per_expert(hidden)}


EXPERT_IMPLS = {"ragged": experts_ragged, "gather": experts_gather, "dense": experts_dense}


def choose_impl(impl: str, num_tokens: int, top_k: int, num_experts: int) -> str:
    """GLMConfig.moe_impl -> the implementation for a call on `num_tokens` tokens (a static shape)."""
    if impl == "auto":
        return "gather" if num_tokens * top_k < num_experts else "ragged"
    return impl


class Router(nn.Module, kw_only=True):
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, num_sequences: int = 1, token_mask=None):
        """x [T, H] -> (weights [T, k] fp32, experts [T, k] int32). Logits in fp32, as transformers.
        With "intermediates" mutable (training) it also sows load_stats (x = num_sequences whole sequences;
        `token_mask` [T]: padding tokens are routed but not counted)."""
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                            (x.shape[-1], self.num_experts), self.param_dtype)
        # fp32 whatever param_dtype (transformers keeps it in fp32 too); set outside the gradient (balancing)
        bias = self.param("e_score_correction_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                          (self.num_experts,), jnp.float32)
        logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        weights, experts = route(logits, bias, top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                                 norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor)
        if self.is_mutable_collection("intermediates"):  # only when asked for: inference sows and computes nothing
            counts, balance = load_stats(logits, experts, self.num_experts, num_sequences, token_mask)
            self.sow("intermediates", "expert_counts", counts)
            self.sow("intermediates", "balance_terms", balance)
        return weights, experts


class Experts(nn.Module, kw_only=True):
    """The routed experts' stacked SwiGLU weights, applied to each token's chosen experts."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    impl: str = "auto"
    swiglu_limit: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, weights, experts):
        """x [..., H], routing weights / experts [..., k] -> [..., H]. Under a mesh whose `expert` axis is > 1,
        x [B, S, H] runs expert-parallel (glm_jax/model/layers/expert_parallel.py, docs/moe.md)."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        init = nn.initializers.normal(0.02)
        wi = self.param("wi", nn.with_logical_partitioning(init, ("expert", "embed", None, "moe_mlp")),
                        (e, h, 2, i), self.param_dtype)
        wo = self.param("wo", nn.with_logical_partitioning(init, ("expert", "moe_mlp", "embed")), (e, i, h),
                        self.param_dtype)
        tokens = math.prod(x.shape[:-1])
        impl = choose_impl(self.impl, tokens, experts.shape[-1], e)
        if x.ndim == 3 and impl != "dense" and expert_parallel.expert_shards() > 1:
            return expert_parallel.experts_expert_parallel(
                x, weights, experts, wi, wo, mode="gather" if impl == "gather" else "all_to_all",
                ffn=functools.partial(ragged_ffn, limit=self.swiglu_limit),
                gather_fn=functools.partial(experts_gather, limit=self.swiglu_limit))
        flat_x, flat_w, flat_e = x.reshape(tokens, h), weights.reshape(tokens, -1), experts.reshape(tokens, -1)
        record_all(self, lambda: expert_statistics(flat_x, flat_w, flat_e, wi, wo, self.swiglu_limit))
        y = EXPERT_IMPLS[impl](flat_x, flat_w, flat_e, wi, wo, self.swiglu_limit)
        return y.reshape(x.shape)


class MoE(nn.Module, kw_only=True):
    """Routed experts + shared experts on x [batch, seq, hidden] (see the module docstring)."""

    hidden_size: int
    intermediate_size: int  # moe_intermediate_size, of one expert
    num_experts: int
    top_k: int
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    impl: str = "auto"
    swiglu_limit: float = 0.0  # > 0: clamped SwiGLU in the routed and shared experts (GLM-5.3-Flash)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, token_mask=None):
        """x [batch, seq, hidden]; token_mask [batch, seq] (True = real token) keeps padding out of the load
        statistics that training reads."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).astype(self.dtype)
        weights, experts = Router(num_experts=self.num_experts, top_k=self.top_k, n_group=self.n_group,
                                  topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                                  routed_scaling_factor=self.routed_scaling_factor, param_dtype=self.param_dtype,
                                  name="router")(flat, num_sequences=math.prod(shape[:-2]),
                                                 token_mask=None if token_mask is None else token_mask.reshape(-1))
        h, i = self.hidden_size, self.intermediate_size
        lead = (*shape[:-1], -1)  # [batch, seq, .]: the expert-parallel path keeps the activations' sharding
        y = Experts(num_experts=self.num_experts, hidden_size=h, intermediate_size=i, impl=self.impl,
                    swiglu_limit=self.swiglu_limit, dtype=self.dtype, param_dtype=self.param_dtype, name="experts")(
            flat.reshape(lead), weights.reshape(lead), experts.reshape(lead))
        if self.n_shared_experts:
            y = y + MLP(hidden_size=h, ffn_hidden_size=i * self.n_shared_experts, swiglu_limit=self.swiglu_limit,
                        dtype=self.dtype,
                        param_dtype=self.param_dtype, name="shared_experts")(x)
        return y
