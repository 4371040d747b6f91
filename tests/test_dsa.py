"""GLM-5's DeepSeek sparse attention (glm_jax/model/layers/dsa.py) against transformers' glm_moe_dsa modules
(fp32, random weights, index_topk smaller than the sequence, left padding)."""

from __future__ import annotations

import json
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as hf_dsa

from safetensors.numpy import load_file as np_load_file

from hf_models import (DSA_TOPK, add_mtp_layer, assert_decode_matches_forward, assert_greedy_matches_oracle,
                       assert_matches_oracle, forward,
                       left_padded_batch, randomize, rel_err, save_and_load, saved_oracle, tiny_dsa_config,
                       tiny_dsa_model)
from jaxprs import equations, out_shapes, primitives
from glm_jax import GLMConfig, GLMForCausalLM, load_hf, save_hf
from glm_jax import generation as G
from glm_jax.model import cache_specs, glm as glm_module
from glm_jax.model.layers import dsa
from glm_jax.model.layers.embeddings import apply_rotary, rotary_cos_sin

SEQ, TOPK = 12, DSA_TOPK  # tiny_dsa_config (tests/hf_models.py): index_topk below the sequence


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


# ------------------------------------------------------------------------------------------ the whole model
# tiny_dsa_model (tests/hf_models.py): a random fp32 GlmMoeDsaForCausalLM, eager attention.
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_oracle(tiny_dsa_model(seed=3), tmp_path_factory.mktemp("dsa") / "hf")


def test_logits_match_transformers(saved):
    ref, d = saved
    cfg, params = load_hf(d)
    assert cfg.is_dsa and cfg.index_topk == TOPK and cfg.model_type == "glm_moe_dsa"
    # query blocks that do not divide the sequence
    out = assert_matches_oracle(ref, cfg, params, [16, 11, 6], seed=5, rtol=1e-4, dsa_block=3)
    # Sparsity is active: with a top-k as long as the sequence (dense attention) the logits differ.
    dense = forward(cfg.replace(index_topk=16), params, out.ids, out.mask)
    assert rel_err(dense[out.real], out.theirs[out.real]) > 1e-2


def test_gradients_skip_the_indexer(saved):
    """Training through DSA: the attention weights get gradients, the indexer none (transformers runs it under
    no_grad; its top-k is not differentiable)."""
    _, d = saved
    cfg, params = load_hf(d)
    ids, mask, _ = left_padded_batch([16, 10], 16, cfg.vocab_size, seed=7)
    model = GLMForCausalLM(cfg)

    def loss(p):
        return jnp.sum(model.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)) ** 2)

    grads = jax.jit(jax.grad(loss))(params)["model"]["moe_layers"]["attention"]
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["indexer"]))
    assert all(float(jnp.abs(grads[k]["kernel"]).max()) > 0 for k in ("q_a", "q_b", "kv_a", "kv_b", "out"))


def test_decode_cache_matches_full_forward(saved):
    _, d = saved
    cfg, params = load_hf(d)
    ids, mask, _ = left_padded_batch([14, 9], 14, cfg.vocab_size, seed=6)
    # steps 8..13 see more than index_topk visible keys: the selection matters
    cache = assert_decode_matches_forward(cfg, params, ids, mask, prompt=8, cache_len=16)
    assert cache["model"]["cached_index_key"].shape == (cfg.num_layers, 2, 16, cfg.index_head_dim)


def test_greedy_generation_matches_transformers(tmp_path):
    ref = tiny_dsa_model(seed=4, confident=True, vocab_size=256)
    cfg, params = save_and_load(ref, tmp_path)
    assert_greedy_matches_oracle(ref, GLMForCausalLM(cfg), params, [11, 4, 7], new_tokens=12,
                                 rng=np.random.RandomState(8))


def test_save_hf_round_trip(tmp_path, saved):
    ref, d = saved
    cfg, params = load_hf(d)
    out = save_hf(cfg, params, tmp_path / "ours")
    written, source = np_load_file(str(out / "model.safetensors")), np_load_file(str(d / "model.safetensors"))
    assert any(".indexer.k_norm.bias" in k for k in written)
    assert sorted(written) == sorted(source)
    for name, value in source.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    again = transformers.GlmMoeDsaForCausalLM.from_pretrained(out).eval()
    again.config._attn_implementation = "eager"
    assert_matches_oracle(again, cfg, params, [12, 7], seed=9, rtol=1e-4)
    cfg2, _ = load_hf(out)
    assert cfg2 == cfg
    # An MTP layer (GLM-5 ships one: model.layers.{L}, with its own indexer) loads and is written back.
    src = tmp_path / "mtp"
    ref.save_pretrained(src)
    mtp = add_mtp_layer(src, ref)
    cfg3, params3 = load_hf(src)
    n = cfg3.num_layers
    assert cfg3.num_mtp_layers == 1
    wk = params3["model"]["mtp"]["block"]["attention"]["indexer"]["wk"]["kernel"][0]
    np.testing.assert_array_equal(np.asarray(wk), mtp[f"model.layers.{n}.self_attn.indexer.wk.weight"].T)
    written = np_load_file(str(save_hf(cfg3, params3, tmp_path / "ours_mtp") / "model.safetensors"))
    for name, value in mtp.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)


def test_yarn_rope_matches_transformers_and_round_trips(tmp_path):
    """YaRN (DeepSeek-V3's form, as in the MLA tests) reaches the attention and the indexer's rotary alike, and
    config.json written by save_hf keeps it (it was once rewritten as the default rope)."""
    yarn = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 4,
            "mscale": 0.7, "mscale_all_dim": 1.0}
    ref = tiny_dsa_model(seed=6, rope_parameters=yarn)
    cfg, params = save_and_load(ref, tmp_path / "hf")
    assert cfg.rope_scaling_params["factor"] == 8.0 and GLMConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert_matches_oracle(ref, cfg, params, [16, 11, 6], seed=5, rtol=1e-4)
    out = save_hf(cfg, params, tmp_path / "ours")
    written = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert {k: written[k] for k in yarn} == yarn
    again = transformers.GlmMoeDsaForCausalLM.from_pretrained(out).eval()
    again.config._attn_implementation = "eager"
    assert_matches_oracle(again, cfg, params, [16, 11, 6], seed=5, rtol=1e-4)


def test_config_layouts_and_presets():
    # transformers 5's layout (what save_pretrained writes) and the published one (first_k_dense_replace, no
    # mlp_layer_types / indexer_types, top-level keys) read the same.
    ours = GLMConfig.from_hf_dict(tiny_dsa_config().to_dict())
    published = dict(model_type="glm_moe_dsa", hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=8,
                     index_head_dim=16, index_topk=TOPK, n_routed_experts=4, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                     max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                     indexer_rope_interleave=True, rope_interleave=True, vocab_size=96, pad_token_id=0,
                     eos_token_id=[2], routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5)
    assert GLMConfig.from_hf_dict(published) == ours
    assert ours.indexer_types == () and ours.num_dense_layers == 1 and ours.rope_interleaved
    # Which layers run an indexer follows transformers (indexer_types, else the pattern / frequency keys).
    for extra in (dict(index_topk_pattern="FS"), dict(index_topk_freq=2, index_skip_topk_offset=1),
                  dict(indexer_types=["full", "shared"])):
        hf = transformers.GlmMoeDsaConfig(**{**published, **extra})
        mixed = GLMConfig.from_hf_dict({**published, **extra})
        assert mixed.indexer_types == tuple(hf.indexer_types) == ("full", "shared")
        assert GLMConfig.from_hf_dict(mixed.to_hf_dict()) == mixed
        assert mixed.flops_per_token(64) < mixed.replace(indexer_types=()).flops_per_token(64)  # one indexer less
    # A "shared" layer reuses the previous layer's top-k: the first one cannot (transformers fails at run time).
    with pytest.raises(ValueError, match="layer 0 is 'shared'.*must be 'full'"):
        GLMConfig.from_hf_dict({**published, "index_topk_pattern": "SF"})
    glm5 = GLMConfig.from_preset("glm-5")
    # zai-org/GLM-5's config.json (the key set its public copies show, see the preset's comment) is the preset.
    published_glm5 = {
        "architectures": ["GlmMoeDsaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "dtype": "bfloat16", "eos_token_id": [154820, 154827, 154829], "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "head_dim": 64, "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32,
        "index_topk": 2048, "indexer_rope_interleave": True, "initializer_range": 0.02, "intermediate_size": 12288,
        "kv_lora_rank": 512, "max_position_embeddings": 202752, "model_type": "glm_moe_dsa",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 78, "num_key_value_heads": 64, "num_nextn_predict_layers": 1, "pad_token_id": 154820,
        "pretraining_tp": 1, "q_lora_rank": 2048, "qk_head_dim": 256, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_interleave": True,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
        "use_cache": True, "v_head_dim": 256, "vocab_size": 154880}
    assert GLMConfig.from_hf_dict(published_glm5).replace(name="glm-5") == glm5
    assert (glm5.model_type, glm5.num_layers, glm5.index_topk, glm5.index_n_heads, glm5.index_head_dim,
            glm5.head_dim) == ("glm_moe_dsa", 78, 2048, 32, 128, 256)
    written = glm5.to_hf_dict()
    assert GLMConfig.from_hf_dict(written).replace(name="glm-5") == glm5
    hf5 = transformers.GlmMoeDsaConfig(**{k: v for k, v in written.items() if k != "torch_dtype"})
    assert (hf5.index_topk, hf5.indexer_types, hf5.qk_head_dim) == (2048, ["full"] * 78, 256)
    # GLM-5's decode cache per token, from the cache's own arrays (docs/dsa.md): 78 x (512 + 64) latent values
    # plus 78 x 128 indexer-key values, bf16 (fp32 on this CPU: glm_jax.model.glm.cache_dtype).
    specs = cache_specs(GLMForCausalLM(glm5), 1, 4)["model"]
    per_token = {k: math.prod(v.shape) // 4 for k, v in specs.items() if k.startswith("cached")}
    assert per_token == {"cached_latent": 44928, "cached_index_key": 9984}
    assert {specs[k].dtype for k in per_token} == {jnp.dtype(jnp.float32)}
    with mock.patch.object(glm_module, "current_platform", return_value="tpu"):
        specs = cache_specs(GLMForCausalLM(glm5), 1, 4)["model"]
    assert {specs[k].dtype for k in per_token} == {jnp.dtype(jnp.bfloat16)}


# ------------------------------------------------------------------------ "shared" indexer layers
SHARED_TYPES = ["full", "shared", "full", "shared"]  # layer 0 is dense, 1-3 MoE: a selection crosses the stacks


@pytest.fixture(scope="module")
def shared_saved(tmp_path_factory):
    """transformers' model with "shared" layers: they have no indexer (module and tensors) and reuse the top-k of
    the layer before."""
    ref = tiny_dsa_model(seed=5, confident=True, num_hidden_layers=4, indexer_types=SHARED_TYPES)
    assert [layer.self_attn.indexer is None for layer in ref.model.layers] == [False, True, False, True]
    d = tmp_path_factory.mktemp("dsa_shared") / "hf"
    ref.save_pretrained(d)
    return ref, d


def test_shared_layers_match_transformers(shared_saved, caplog):
    ref, d = shared_saved
    with caplog.at_level("WARNING"):
        cfg, params = load_hf(d)  # no indexer tensors for layers 1 and 3: neither missing nor unused
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "glm_jax" in r.name]
    assert cfg.indexer_types == tuple(SHARED_TYPES)
    wk = np.asarray(params["model"]["moe_layers"]["attention"]["indexer"]["wk"]["kernel"])  # layers 1, 2, 3
    assert not wk[0].any() and wk[1].any() and not wk[2].any()
    out = assert_matches_oracle(ref, cfg, params, [16, 11, 6], seed=5, rtol=1e-4, dsa_block=3)
    real = out.real
    # Each shared layer running an indexer of its own (here its zero weights) instead gives other logits.
    assert rel_err(forward(cfg.replace(indexer_types=()), params, out.ids, out.mask)[real], out.theirs[real]) > 1e-2
    # A shared layer skips the indexer's compute: a lax.cond whose other branch has no top-k.
    jaxpr = jax.make_jaxpr(lambda p: GLMForCausalLM(cfg).apply({"params": p}, jnp.asarray(out.ids)))(params).jaxpr
    conds = [[primitives(b.jaxpr) for b in eqn.params["branches"]] for eqn in equations(jaxpr)
             if eqn.primitive.name == "cond"]
    assert sorted(["top_k" in b for b in branches] for branches in conds) == [[False, True]] * 2


def test_shared_layers_decode_and_generate(shared_saved):
    """Cached decoding: a step's shared layer reuses the previous layer's choice for that step's query."""
    _, d = shared_saved
    cfg, params = load_hf(d)
    model = GLMForCausalLM(cfg)
    ids, mask, _ = left_padded_batch([14, 9], 14, cfg.vocab_size, seed=6)
    cache = assert_decode_matches_forward(cfg, params, ids, mask, prompt=8, cache_len=16)
    assert not np.asarray(cache["model"]["cached_index_key"][1::2]).any()  # shared layers: no indexer keys
    # Greedy generation (prefill=True, then steps) picks what the full forward over its output picks.
    tokens = G.generate(model, params, ids[:, :10], mask[:, :10], max_new_tokens=4, stop_ids=())
    assert tokens.shape == (2, 14) and len(set(tokens[:, 10:].ravel().tolist())) > 2  # not degenerate
    again = forward(cfg, params, tokens, np.concatenate([mask[:, :10], np.ones((2, 4), mask.dtype)], 1))
    np.testing.assert_array_equal(again[:, 9:13].argmax(-1), tokens[:, 10:])


def test_shared_layers_save_hf_round_trip(tmp_path, shared_saved):
    ref, d = shared_saved
    cfg, params = load_hf(d)
    # Shared layers' indexer slices are dropped on save, whatever they hold (here: not zero).
    params = jax.tree.map(lambda x: x + 1.0, params)
    out = save_hf(cfg, params, tmp_path / "ours")
    written, source = np_load_file(str(out / "model.safetensors")), np_load_file(str(d / "model.safetensors"))
    assert sorted(written) == sorted(source)
    assert not [k for k in written if ".indexer." in k and k.split(".")[2] in ("1", "3")]
    assert json.loads((out / "config.json").read_text())["indexer_types"] == SHARED_TYPES
    again = transformers.GlmMoeDsaForCausalLM.from_pretrained(out).eval()
    again.config._attn_implementation = "eager"
    assert [layer.self_attn.indexer is None for layer in again.model.layers] == [False, True, False, True]
    assert_matches_oracle(again, cfg, params, [14, 7], seed=9, rtol=1e-4)  # the decode test's shapes: compiled
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params2["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))


def test_blockwise_path_builds_no_sequence_square():
    """The blockwise path never holds a [S, T] matrix (per head or not); the reference path does."""
    b, s, n, c, h, d, topk = 1, 96, 4, 24, 2, 8, 8
    args = (jnp.zeros((b, s, n, c)), jnp.zeros((b, s, c)),
            (jnp.zeros((b, s, h, d)), jnp.zeros((b, s, d)), jnp.zeros((b, s, h))), jnp.ones((b, s), jnp.int32),
            jnp.ones((b, s), jnp.int32), topk, 0.1, 16)

    def squares(fn):
        shapes = out_shapes(jax.make_jaxpr(fn)(*args[:5]).jaxpr)
        return [x for x in shapes if list(x).count(s) >= 2]

    assert squares(lambda *a: dsa.dsa_attention(*a, *args[5:], block=32)) == []
    assert squares(lambda *a: dsa.dsa_attention_reference(*a, *args[5:]))


SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, numpy as np
jax.config.update("jax_platforms", "cpu")
from glm_jax import GLMConfig, GLMForCausalLM, init_params, make_mesh, param_shardings, param_specs
from glm_jax import generation as G
cfg = GLMConfig.from_preset("glm-dsa-test", index_topk=6, dsa_block=8)
model = GLMForCausalLM(cfg)
params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, init_params(model, jax.random.key(0)))
ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (4, 20)); mask = np.ones_like(ids); mask[1, :5] = 0
mesh = make_mesh(data=2, tensor=4)
spec = param_shardings(param_specs(model), mesh)["model"]["layers"]["attention"]["indexer"]["wq_b"]["kernel"].spec
assert tuple(spec) == (None, None, "tensor", None), spec  # [layers, q_lora, heads, dim]: heads over tensor
tokens = G.generate(model, params, ids, mask, max_new_tokens=4, stop_ids=())
sharded = G.generate(model, params, ids, mask, max_new_tokens=4, stop_ids=(), mesh=mesh)
np.testing.assert_array_equal(tokens, sharded)
print("SHARDED_OK")
"""


@pytest.mark.slow
def test_sharded_generation_matches_single_device():
    """8 fake devices (data x 4-way tensor, the indexer's heads split over tensor): sharded generation (prefill and
    cached decoding, indexer keys in the cache) equals the single-device tokens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [root]))
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
