"""GLM-5's DeepSeek sparse attention (glm_jax/model/layers/dsa.py) against transformers' glm_moe_dsa modules
(fp32, random weights, index_topk smaller than the sequence, left padding)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf_dsa

from hf_models import left_padded_batch, randomize
from glm_jax.model.layers import dsa
from glm_jax.model.layers.embeddings import apply_rotary, rotary_cos_sin

SEQ, TOPK = 12, 5


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def tiny_dsa_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, index_n_heads=8, index_head_dim=16, index_topk=TOPK,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                topk_group=1, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                pad_token_id=0, eos_token_id=[2])
    cfg = transformers.GlmMoeDsaConfig(**{**base, **kw})
    cfg._attn_implementation = "eager"
    return cfg


def additive_mask(mask):
    """transformers' eager mask [B, 1, S, S]: 0 where a query sees a key (causal, key not padding), else min."""
    s = mask.shape[1]
    ok = np.tril(np.ones((s, s), bool))[None] & (mask[:, None, :] == 1)
    return torch.tensor(np.where(ok, 0.0, np.finfo(np.float32).min)[:, None], dtype=torch.float32)


def t2n(p):
    return p.detach().numpy()


def indexer_params(ix, cfg):
    h, d = cfg.index_n_heads, cfg.index_head_dim
    return {"wq_b": {"kernel": t2n(ix.wq_b.weight).T.reshape(-1, h, d)}, "wk": {"kernel": t2n(ix.wk.weight).T},
            "k_norm": {"scale": t2n(ix.k_norm.weight), "bias": t2n(ix.k_norm.bias)},
            "weights_proj": {"kernel": t2n(ix.weights_proj.weight).T}}


def rms(x, w, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def mla_inputs(attn, cfg, x, pos):
    """The MLA pieces of transformers' attention from its weights (test glue, written from
    GlmMoeDsaAttention.forward): q_nope, rotated q_rope, [latent ; rotated k_rope], the query latent, kv_b in our
    [kv_lora, N, nope + v] layout, cos / sin."""
    n, dn, dr, dv, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    q_lat = rms(x @ t2n(attn.q_a_proj.weight).T, t2n(attn.q_a_layernorm.weight))
    q = (q_lat @ t2n(attn.q_b_proj.weight).T).reshape(*x.shape[:2], n, dn + dr)
    ckv = x @ t2n(attn.kv_a_proj_with_mqa.weight).T
    latent, k_rope = rms(ckv[..., :c], t2n(attn.kv_a_layernorm.weight)), ckv[..., c:]
    cos, sin = rotary_cos_sin(jnp.asarray(pos), dr, cfg.rope_parameters["rope_theta"], 1.0, jnp.float32)
    q_rope = apply_rotary(q[..., dn:], cos, sin, True)
    k_rope = apply_rotary(k_rope[:, :, None], cos, sin, True)[:, :, 0]
    kv_b = t2n(attn.kv_b_proj.weight).reshape(n, dn + dv, c).transpose(2, 0, 1)
    return q[..., :dn], q_rope, jnp.concatenate([latent, k_rope], -1), q_lat, jnp.asarray(kv_b), cos, sin


@pytest.fixture(scope="module")
def layer_case():
    cfg = tiny_dsa_config()
    torch.manual_seed(0)
    attn = randomize(hf_dsa.GlmMoeDsaAttention(cfg, 0), seed=1)
    _, mask, pos = left_padded_batch([SEQ, SEQ - 4], SEQ, 8, seed=0)
    x = np.random.RandomState(2).randn(2, SEQ, cfg.hidden_size).astype(np.float32)
    xt, post = torch.tensor(x), torch.tensor(pos)
    rope = hf_dsa.GlmMoeDsaRotaryEmbedding(cfg)(xt, post)
    amask = additive_mask(mask)
    with torch.no_grad():
        ref_out, _, ref_idx = attn(xt, rope, amask, position_ids=post)
    return cfg, attn, x, mask, pos, ref_out.numpy(), ref_idx.numpy()


def _ours(layer_case, reference, **kw):
    cfg, attn, x, mask, pos, _, _ = layer_case
    q_nope, q_rope, kv, q_lat, kv_b, cos, sin = mla_inputs(attn, cfg, jnp.asarray(x), pos)
    ix = dsa.Indexer(num_heads=cfg.index_n_heads, head_dim=cfg.index_head_dim)
    index = ix.apply({"params": indexer_params(attn.indexer, cfg)}, jnp.asarray(x), q_lat, cos, sin)
    seg = jnp.asarray(mask, jnp.int32)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    out, chosen = dsa.mla_sparse_attention(q_nope, q_rope, kv, kv_b, index, seg, seg, topk=cfg.index_topk,
                                           scale=scale, reference=reference, **kw)
    if "chosen" in kw:  # a "shared" layer: the given selection, not this indexer's
        jax.tree.map(np.testing.assert_array_equal, chosen, kw["chosen"])
    out = out.reshape(*x.shape[:2], -1) @ t2n(attn.o_proj.weight).T
    return out, (*index, seg, chosen)


def test_indexer_selects_transformers_topk(layer_case):
    cfg, attn, x, mask, pos, _, ref_idx = layer_case
    _, (iq, ik, iw, seg, _) = _ours(layer_case, True)
    vis = dsa.visibility(seg, seg, SEQ, SEQ)
    idx, visible = dsa.select_topk(dsa.indexer_scores(iq, ik, iw), vis, cfg.index_topk)
    idx, visible = np.asarray(idx), np.asarray(visible)
    checked = 0
    for b in range(2):
        for s in range(SEQ):
            if not mask[b, s]:
                continue
            ours = set(idx[b, s][visible[b, s]].tolist())
            ref = {t for t in ref_idx[b, s].tolist() if mask[b, t] and t <= s}
            assert ours == ref, (b, s, ours, ref)
            checked += len(ref) == TOPK and s + 1 - (SEQ - mask[b].sum()) > TOPK  # sparsity really active
    assert checked >= 8


@pytest.mark.parametrize("reference,kw", [(True, {}), (False, {"block": 5}), (False, {"block": 128})])
def test_sparse_attention_matches_transformers(layer_case, reference, kw):
    *_, mask, _, ref_out, _ = layer_case
    out, (*_, chosen) = _ours(layer_case, reference, **kw)
    real = mask == 1
    assert rel_err(np.asarray(out)[real], ref_out[real]) < 1e-4
    # The same selection handed in (a "shared" layer) gives the same output; another selection does not.
    again, _ = _ours(layer_case, reference, chosen=chosen, **kw)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
    other, _ = _ours(layer_case, reference, chosen=(chosen[0][:, ::-1], chosen[1][:, ::-1]), **kw)
    assert rel_err(np.asarray(other)[real], ref_out[real]) > 1e-2
