"""glm4_moe (GLM-4.5 / GLM-4.5-Air / GLM-4.6): our Flax model against transformers' Glm4MoeForCausalLM (fp32):
logits with groups, shared experts, qk norm on and off, dense first layers, a non-zero correction bias and left
padding; the router alone; greedy generation token for token; checkpoints (per-expert and fused experts, MTP
layers) both ways; both config.json layouts; the grouped-matmul paths against the dense all-experts reference;
and that a batch-1 decode step reads only the chosen experts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from glm_jax import GLMConfig, GLMForCausalLM, init_cache, init_params, load_hf, param_specs, save_hf
from glm_jax.convert import hf as hf_convert
from glm_jax.model import stack_layers, unstack_layers
from glm_jax.model.layers.moe import experts_dense, experts_gather, experts_ragged, route
from glm_jax.sharding import logical_to_spec
from hf_models import (RTOL, add_mtp_layer, assert_decode_matches_forward, assert_greedy_matches_oracle,
                       assert_matches_oracle, assert_same_params, forward, left_padded_batch, rel_err, save_and_load, saved_oracle, tiny_moe_config,
                       tiny_moe_model, torch_logits)
from jaxprs import equations, in_shapes, primitives


# ------------------------------------------------------------------------------------------ the oracle models
# tiny_moe_model / tiny_moe_config (tests/hf_models.py): random fp32 Glm4MoeForCausalLM, correction biases included.
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The default tiny model (groups, shared expert, qk norm, one dense layer first) saved by transformers."""
    return saved_oracle(tiny_moe_model(seed=1), tmp_path_factory.mktemp("moe") / "hf")


# ------------------------------------------------------------------------------------------------ the logits
CASES = {
    # 4 groups of 2, the best 2 groups compete; qk norm; one dense layer; one shared expert; left padding
    "groups-qknorm-padded": (dict(n_group=4, topk_group=2), True),
    # no groups; no qk norm; two dense layers; two shared experts; top-3 unnormalised; rotary on 1/4 of a head
    "nogroups-noqknorm-k3": (dict(n_group=1, topk_group=1, use_qk_norm=False, first_k_dense_replace=2,
                                  n_shared_experts=2, num_experts_per_tok=3, norm_topk_prob=False,
                                  routed_scaling_factor=1.0, rope=dict(partial_rotary_factor=0.25, rope_theta=5e5)),
                             False),
    # MoE from the first layer; no qkv bias; 2 groups, 1 kept; left padding
    "allmoe-nobias-padded": (dict(first_k_dense_replace=0, attention_bias=False, num_hidden_layers=2), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    kw, padded = CASES[case]
    ref = tiny_moe_model(seed=len(case), **kw)
    cfg, params = save_and_load(ref, tmp_path)
    assert cfg.is_moe and not cfg.rope_interleaved and cfg.num_mtp_layers == 0
    assert cfg.first_k_dense_replace == ref.config.first_k_dense_replace and cfg.n_group == ref.config.n_group
    # prefill: 144 tokens x top-k > experts -> the ragged_dot path
    out = assert_matches_oracle(ref, cfg, params, [48, 30, 9] if padded else [48, 48, 48], seed=3, rtol=RTOL)
    # The dense all-experts reference gives the same logits.
    reference = forward(cfg, params, out.ids, out.mask, moe_impl="dense")
    assert rel_err(out.ours[out.real], reference[out.real]) < 1e-5


def test_router_matches_transformers():
    """Group-limited top-k with a correction bias, weights from the unbiased scores, against Glm4MoeTopkRouter."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    for norm in (True, False):
        config = tiny_moe_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                 norm_topk_prob=norm, routed_scaling_factor=2.5)
        router = Glm4MoeTopkRouter(config)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.3)
            router.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.3)
        x = torch.randn(256, 64, generator=g)
        with torch.no_grad():
            _, w_ref, idx_ref = router(x)
        logits = jnp.asarray(x.numpy()) @ jnp.asarray(router.weight.detach().numpy()).T
        kw = dict(top_k=4, n_group=4, topk_group=2, norm_topk_prob=norm, routed_scaling_factor=2.5)
        w, idx = route(logits, jnp.asarray(router.e_score_correction_bias.numpy()), **kw)
        order_ref, order = np.argsort(idx_ref.numpy(), 1), np.argsort(np.asarray(idx), 1)
        np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1),
                                      np.take_along_axis(idx_ref.numpy(), order_ref, 1))
        np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                                   np.take_along_axis(w_ref.numpy(), order_ref, 1), rtol=1e-6, atol=1e-7)
        # The bias changes which experts are chosen, not the weights' source: they are unbiased sigmoid scores.
        _, unbiased = route(logits, jnp.zeros(16), **kw)
        assert (np.sort(np.asarray(unbiased), 1) != np.sort(np.asarray(idx), 1)).any(axis=1).mean() > 0.2
        scores = np.asarray(jax.nn.sigmoid(logits))
        picked = np.take_along_axis(scores, np.asarray(idx), 1)
        expect = picked / picked.sum(1, keepdims=True) * 2.5 if norm else picked * 2.5
        np.testing.assert_allclose(np.asarray(w), expect, rtol=1e-6)


# -------------------------------------------------------------------------------------- the expert computation
@pytest.mark.parametrize("tokens", [3, 40])
def test_expert_paths_equal_dense_reference(tokens):
    """ragged_dot over expert-sorted tokens == per-assignment gathered weights == every expert on every token,
    values and gradients (an expert no token chose included)."""
    rng = np.random.RandomState(tokens)
    e, h, i, k = 8, 16, 12, 2
    x = jnp.asarray(rng.randn(tokens, h), jnp.float32)
    wi = jnp.asarray(rng.randn(e, h, 2, i) * 0.3, jnp.float32)
    wo = jnp.asarray(rng.randn(e, i, h) * 0.3, jnp.float32)
    logits = rng.randn(tokens, e)
    logits[:, 7] = -50.0  # no token chooses expert 7: an empty group
    weights, experts = route(jnp.asarray(logits), jnp.zeros(e), top_k=k)
    probe = jnp.asarray(rng.randn(tokens, h), jnp.float32)

    def loss(fn):
        return jax.value_and_grad(lambda x, wi, wo: jnp.sum(fn(x, weights, experts, wi, wo) * probe), (0, 1, 2))

    (ref, ref_grads) = loss(experts_dense)(x, wi, wo)
    for fn in (experts_ragged, experts_gather):
        np.testing.assert_allclose(np.asarray(fn(x, weights, experts, wi, wo)),
                                   np.asarray(experts_dense(x, weights, experts, wi, wo)), rtol=1e-5, atol=1e-5)
        val, grads = loss(fn)(x, wi, wo)
        np.testing.assert_allclose(float(val), float(ref), rtol=1e-5)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_batch1_decode_reads_only_the_chosen_experts():
    """A batch-1 decode step gathers its top-k experts' weights and multiplies those: no matmul touches the
    [experts, ...] stacks (12 experts, a size no other axis has); a prefill takes the ragged_dot path."""
    cfg = GLMConfig.from_preset("glm-moe-test", n_routed_experts=12, n_group=2)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    cache = init_cache(model, 1, 32)
    step = jax.make_jaxpr(lambda p, c, t: model.apply({"params": p, "cache": c}, t, decode=True, mutable=["cache"]))
    decode_step = step(params, cache, jnp.ones((1, 1), jnp.int32)).jaxpr
    dots = [(eqn.primitive.name, in_shapes(eqn)) for eqn in equations(decode_step)
            if eqn.primitive.name in ("dot_general", "ragged_dot_general")]
    assert dots and not any(name == "ragged_dot_general" for name, _ in dots)
    for _, ins in dots:  # only the router [embed, experts] sees all experts
        assert all(12 not in shape or len(shape) == 2 for shape in ins), ins
    k, h, i = cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    assert any((k, h, 2, i) in ins for _, ins in dots) and any((k, i, h) in ins for _, ins in dots)
    prefill = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, jnp.ones((1, 16), jnp.int32))
    assert "ragged_dot_general" in primitives(prefill.jaxpr)


# -------------------------------------------------------------------------- masks, packing, cache, generation
def test_decode_cache_and_packing_match_full_forward(saved):
    _, d = saved
    cfg, params = load_hf(d)
    ids, mask, _ = left_padded_batch([9, 5], 9, cfg.vocab_size, seed=4)
    full = forward(cfg, params, ids, mask)
    # the one-token steps: 2 rows x top-2 < 8 experts, the gather path
    assert_decode_matches_forward(cfg, params, ids, mask, prompt=6, cache_len=16)
    # Packed documents (segment ids) give each document's own logits (the left-padded rows above).
    packed = np.concatenate([ids[0], ids[1, 4:], np.zeros(4, np.int64)])[None].repeat(2, 0)
    segments = np.array([[1] * 9 + [2] * 5 + [0] * 4]).repeat(2, 0)
    out = forward(cfg, params, packed, segment_ids=segments)
    np.testing.assert_allclose(out[0, :9], full[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out[0, 9:14], full[1, 4:], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(tmp_path):
    ref = tiny_moe_model(seed=2, confident=True, vocab_size=256, n_group=4, topk_group=2)
    cfg, params = save_and_load(ref, tmp_path)
    model = GLMForCausalLM(cfg)
    rng = np.random.RandomState(8)
    for lengths in ([13, 4, 8], [10]):
        assert_greedy_matches_oracle(ref, model, params, lengths, new_tokens=16, rng=rng)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_hf_transformers_round_trip_with_mtp(tmp_path, saved, caplog):
    ref, d = saved
    src = tmp_path / "src"
    ref.save_pretrained(src)
    mtp = add_mtp_layer(src, ref)
    cfg, params = load_hf(src)
    assert cfg.num_mtp_layers == 1 and "mtp" in params["model"]
    n = cfg.num_layers
    np.testing.assert_array_equal(np.asarray(params["model"]["mtp"]["eh_proj"]["kernel"][0]),
                                  mtp[f"model.layers.{n}.eh_proj.weight"].T.reshape(2, 64, 64))
    np.testing.assert_array_equal(np.asarray(params["model"]["mtp"]["block"]["mlp"]["experts"]["wo"][0, 5]),
                                  mtp[f"model.layers.{n}.mlp.experts.5.down_proj.weight"].T)
    out = save_hf(cfg, params, tmp_path / "ours")
    written, source = np_load_file(str(out / "model.safetensors")), np_load_file(str(src / "model.safetensors"))
    assert sorted(written) == sorted(source)  # transformers 5's per-expert names, MTP layer included
    for name, value in source.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    assert written[f"model.layers.{n - 1}.mlp.gate.e_score_correction_bias"].dtype == np.float32
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "glm4_moe" and raw["rope_parameters"]["partial_rotary_factor"] == 0.5
    # transformers reads what we wrote (ignoring the MTP layer) and computes our logits.
    again = transformers.Glm4MoeForCausalLM.from_pretrained(out).eval()
    assert_matches_oracle(again, cfg, params, [24, 11], seed=9, rtol=RTOL)
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    assert_same_params(params, params2)
    # Without the MTP layers (num_mtp_layers=0): not loaded (and no warning about it), not written.
    caplog.clear()
    cfg3, params3 = load_hf(src, num_mtp_layers=0)
    assert "mtp" not in params3["model"] and cfg3.num_mtp_layers == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "glm_jax" in r.name]


def test_fused_experts_layout_loads(tmp_path, saved):
    """transformers 5's in-memory layout (experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]) as a
    checkpoint file loads into the same parameters as the per-expert layout, and transformers reads it too."""
    ref, d = saved
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    np_save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text((d / "config.json").read_text())
    _, per_expert = load_hf(d)
    _, from_fused = load_hf(fused)
    assert_same_params(per_expert, from_fused)
    reloaded = transformers.Glm4MoeForCausalLM.from_pretrained(fused).eval()
    ids = np.random.RandomState(2).randint(3, 128, (1, 12))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(ref, ids), rtol=1e-6, atol=1e-6)


def test_layer_layouts_and_streamed_loading(saved, monkeypatch):
    """scan_layers=False (one block per layer, dense and MoE blocks numbered across) gives the same logits;
    stack_layers inverts it; loading layer by layer into the device array gives the same parameters."""
    _, d = saved
    cfg, params = load_hf(d)
    cfg_u, unstacked = load_hf(d, scan_layers=False)
    assert sorted(k for k in unstacked["model"] if k.startswith("layers_")) == ["layers_0", "layers_1", "layers_2"]
    assert "router" in unstacked["model"]["layers_1"]["mlp"] and "wi" in unstacked["model"]["layers_0"]["mlp"]
    ids = np.random.RandomState(3).randint(3, 128, (2, 10))
    np.testing.assert_allclose(forward(cfg_u, unstacked, ids), forward(cfg, params, ids), rtol=1e-5, atol=1e-5)
    assert_same_params(stack_layers(unstack_layers(params)), params)
    monkeypatch.setattr(hf_convert, "STREAM_MIN_BYTES", 0)
    _, streamed = load_hf(d)
    assert_same_params(streamed, params)


# --------------------------------------------------------------------------------------- configs and presets
# zai-org/GLM-4.5-Air's published config.json (as ms-swift prints it: Glm4MoeConfig, transformers 4.54.1).
GLM45_AIR_CONFIG = {
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 10944, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8,
    "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "routed_scaling_factor": 1.0, "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.1", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552,
}


def test_config_layouts_and_presets():
    published = GLMConfig.from_hf_dict(GLM45_AIR_CONFIG)
    assert published == GLMConfig.from_preset("glm-4.5-air").replace(name="")
    # The layout transformers 5 writes for the same model (rope_parameters) reads the same.
    t5 = transformers.Glm4MoeConfig.from_dict(GLM45_AIR_CONFIG).to_dict()
    assert "rope_parameters" in t5 and "partial_rotary_factor" not in t5
    assert GLMConfig.from_hf_dict(t5) == published
    for name in ("glm-4.5", "glm-4.5-air", "glm-4.6", "glm-moe-test"):
        cfg = GLMConfig.from_preset(name).replace(name="")
        written = cfg.to_hf_dict("transformers")
        theirs = transformers.Glm4MoeConfig.from_dict(written)  # what transformers 5 reads from it
        assert (theirs.n_routed_experts, theirs.num_experts_per_tok, theirs.n_shared_experts, theirs.n_group,
                theirs.topk_group, theirs.first_k_dense_replace, theirs.num_mtp_layers, theirs.use_qk_norm,
                theirs.head_dim, theirs.routed_scaling_factor, theirs.moe_intermediate_size) == (
            cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.n_group, cfg.topk_group,
            cfg.first_k_dense_replace, cfg.num_mtp_layers, cfg.use_qk_norm, cfg.head_dim,
            cfg.routed_scaling_factor, cfg.moe_intermediate_size)
        assert theirs.rope_parameters["rope_theta"] == cfg.rope_theta
        assert theirs.rope_parameters["partial_rotary_factor"] == cfg.rotary_fraction
        assert GLMConfig.from_hf_dict(written) == cfg
        assert GLMConfig.from_hf_dict(theirs.to_dict()) == cfg
    # A key the file lacks takes transformers' default.
    minimal = {"model_type": "glm4_moe", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    ours, theirs = GLMConfig.from_hf_dict(minimal), transformers.Glm4MoeConfig.from_dict(minimal)
    assert (ours.n_routed_experts, ours.num_experts_per_tok, ours.n_shared_experts, ours.first_k_dense_replace,
            ours.qkv_bias, ours.num_mtp_layers, ours.rotary_fraction, ours.moe_intermediate_size) == (
        theirs.n_routed_experts, theirs.num_experts_per_tok, theirs.n_shared_experts, theirs.first_k_dense_replace,
        theirs.attention_bias, theirs.num_mtp_layers, theirs.rope_parameters["partial_rotary_factor"],
        theirs.moe_intermediate_size)
    # Published sizes: GLM-4.5 355B total / 32B active, GLM-4.5-Air 106B / 12B (embeddings aside, MTP aside).
    for name, total, active in (("glm-4.5", 355e9, 32e9), ("glm-4.5-air", 106e9, 12e9)):
        cfg = GLMConfig.from_preset(name, num_mtp_layers=0)
        assert abs(cfg.num_params() - total) / total < 0.04, cfg.num_params()
        assert abs(cfg.num_params(include_embedding=False, active=True) - active) / active < 0.03
    assert GLMConfig.from_preset("glm-4.6").max_seq_len == 202752
    with pytest.raises(ValueError, match="n_group"):
        GLMConfig.from_preset("glm-moe-test", n_group=3)
    with pytest.raises(ValueError, match="quantization"):
        GLMConfig.from_preset("glm-moe-test", quantization_bit=8)


def test_expert_parameters_carry_logical_axes():
    cfg = GLMConfig.from_preset("glm-moe-test", num_mtp_layers=1)
    boxed = param_specs(GLMForCausalLM(cfg))
    moe = boxed["model"]["moe_layers"]["mlp"]
    assert moe["experts"]["wi"].names == ("layers", "expert", "embed", None, "moe_mlp")
    assert moe["experts"]["wo"].names == ("layers", "expert", "moe_mlp", "embed")
    assert moe["router"]["kernel"].names == ("layers", "embed", None)
    assert moe["router"]["e_score_correction_bias"].value.dtype == jnp.float32
    assert boxed["model"]["mtp"]["block"]["mlp"]["experts"]["wi"].names[0] == "layers"
    assert boxed["model"]["layers"]["attention"]["query_norm"]["scale"].names == ("layers", "norm")
    assert tuple(logical_to_spec(("expert", "embed", None, "moe_mlp"))) == ("expert", ("fsdp", "sequence"), None,
                                                                               "tensor")
    assert dataclasses.replace(cfg, n_routed_experts=0, num_mtp_layers=0).num_moe_layers == 0


def test_gradients_reach_experts_and_router_but_not_the_correction_bias():
    """Training through a MoE block (ragged path): finite gradients for the experts, shared experts and router
    kernel; none for e_score_correction_bias (it only chooses; balancing sets it)."""
    cfg = GLMConfig.from_preset("glm-moe-test", num_layers=2, moe_impl="ragged")
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(1))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 8)))

    def loss(p):
        logits = model.apply({"params": p}, ids).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    grads = jax.jit(jax.grad(loss))(params)
    moe = grads["model"]["moe_layers"]["mlp"]
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    for g in (moe["experts"]["wi"], moe["experts"]["wo"], moe["router"]["kernel"], moe["shared_experts"]["wi"]["kernel"]):
        assert float(jnp.abs(g).max()) > 0
    assert float(jnp.abs(moe["router"]["e_score_correction_bias"]).max()) == 0.0


SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, numpy as np
jax.config.update("jax_platforms", "cpu")
from glm_jax import GLMConfig, GLMForCausalLM, init_params, make_mesh, param_shardings, param_specs
from glm_jax import generation as G
from glm_jax.sharding import axis_rules, use_mesh
cfg = GLMConfig.from_preset("glm-moe-test", num_heads=8, num_kv_heads=4, head_dim=8)
model = GLMForCausalLM(cfg)
params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, init_params(model, jax.random.key(0)))
ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (4, 16)); mask = np.ones_like(ids); mask[1, :5] = 0
apply = lambda p: model.apply({"params": p}, ids, attention_mask=mask)
single = np.asarray(jax.jit(apply)(params))
for sizes in (dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2)):
    mesh = make_mesh(**sizes)
    placed = jax.device_put(params, param_shardings(param_specs(model), mesh))
    with use_mesh(mesh), axis_rules():
        out = np.asarray(jax.jit(apply)(placed))
    assert np.abs(out - single).max() < 1e-4 * np.abs(single).max(), sizes
tokens = G.generate(model, params, ids, mask, max_new_tokens=8, stop_ids=())
sharded = G.generate(model, params, ids, mask, max_new_tokens=8, stop_ids=(), mesh=make_mesh(data=2, tensor=4))
np.testing.assert_array_equal(tokens, sharded)
# Loading onto the mesh layer by layer (each layer's slice placed in its shards) gives the same parameters.
import tempfile
from glm_jax import load_hf, save_hf
from glm_jax.convert import hf
d = save_hf(cfg, params, tempfile.mkdtemp())
hf.STREAM_MIN_BYTES = 0
mesh = make_mesh(data=2, fsdp=2, tensor=2)
_, loaded = load_hf(d, mesh=mesh)
wi = loaded["model"]["moe_layers"]["mlp"]["experts"]["wi"]
assert tuple(wi.sharding.spec) == (None, None, "fsdp", None, "tensor"), wi.sharding.spec
for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("SHARDED_OK")
"""


@pytest.mark.slow
def test_sharded_forward_and_generation_match_single_device():
    """Today's rules (experts split like a dense MLP: embed over fsdp, moe_mlp over tensor) on 8 fake devices:
    forward, generation and layer-by-layer loading onto the mesh equal the single-device results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [root]))
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
