"""glm4_moe_lite (GLM-4.7-Flash): our multi-head latent attention model against transformers'
Glm4MoeLiteForCausalLM (fp32, random tiny configs): logits with left padding (query bottleneck or a plain query,
interleaved or split-half rotary, attention biases, dense first layers); cached decoding (the absorbed form over
the latent cache) against the full forward; greedy generation token for token; save_hf -> transformers -> same
logits, MTP layer kept; both config.json layouts; and the latent cache's size, read from the cache's arrays."""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file as np_load_file

from glm_jax import GLMConfig, GLMForCausalLM, init_cache, load_hf, save_hf
from glm_jax.model import cache_specs, glm as glm_module
from hf_models import (RTOL, add_mtp_layer, assert_decode_matches_forward, assert_greedy_matches_oracle,
                       assert_matches_oracle, assert_same_params, left_padded_batch, save_and_load, saved_oracle, tiny_lite_model)
from jaxprs import out_shapes


# ------------------------------------------------------------------------------------------ the oracle models
# tiny_lite_model / tiny_lite_config (tests/hf_models.py): random fp32 Glm4MoeLiteForCausalLM, distinct sizes.
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The default tiny model (query bottleneck, interleaved rotary, one dense layer) saved by transformers."""
    return saved_oracle(tiny_lite_model(seed=1), tmp_path_factory.mktemp("lite") / "hf")


# ------------------------------------------------------------------------------------------------ the logits
CASES = {
    # no query bottleneck (q_proj), split-half rotary, biases on q/kv_a and o_proj, two dense layers, and YaRN
    # (DeepSeek-V3's form: interpolated frequencies, cos / sin scaled, softmax scale times mscale^2) at base 5e5
    "plainq-neox-bias-yarn": dict(q_lora_rank=None, rope_interleave=False, attention_bias=True,
                                  mlp_layer_types=["dense", "dense", "sparse"],
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0,
                                                   "original_max_position_embeddings": 16, "mscale": 0.7,
                                                   "mscale_all_dim": 1.0}),
}


def _check_logits(ref, d):
    cfg, params = load_hf(d)
    assert cfg.is_mla and cfg.model_type == "glm4_moe_lite"
    assert_matches_oracle(ref, cfg, params, [40, 23, 7], seed=3, rtol=RTOL)
    return cfg, params


def test_logits_match_transformers(saved):
    ref, d = saved
    cfg, _ = _check_logits(ref, d)
    assert cfg.q_lora_rank == 24 and cfg.rope_interleaved and cfg.num_dense_layers == 1


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_variants(tmp_path, case):
    ref = tiny_lite_model(seed=len(case), **CASES[case])
    ref.save_pretrained(tmp_path)
    cfg, params = _check_logits(ref, tmp_path)
    assert cfg.rope_scaling_params["factor"] == 8.0 and GLMConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert cfg.q_lora_rank == 0 and not cfg.rope_interleaved and cfg.qkv_bias and cfg.num_dense_layers == 2
    assert "query" in params["model"]["layers"]["attention"] and "bias" in params["model"]["layers"]["attention"]["out"]


# ------------------------------------------------------------------------------------ cache and generation
def test_cached_decoding_equals_full_forward_without_expanding_the_cache(saved):
    """Prefill (expanded form) then one-token and multi-token steps (absorbed form over the latent cache) give the
    full forward's logits; no value of a decode step has per-head keys or values for the cached tokens."""
    _, d = saved
    cfg, params = load_hf(d)
    model = GLMForCausalLM(cfg)
    ids, mask, _ = left_padded_batch([12, 7], 12, cfg.vocab_size, seed=4)
    # three one-token steps, then three tokens against the cache at once
    cache = assert_decode_matches_forward(cfg, params, ids, mask, prompt=6, cache_len=32, steps=[1, 1, 1, 3],
                                          prefill=True)
    # The cache holds the latent and the rotary key only; a step never builds [.., max_len, heads, dim].
    step = lambda c, x: model.apply({"params": params, "cache": c}, x, decode=True, mutable=["cache"])  # noqa: E731
    shapes = out_shapes(jax.make_jaxpr(step)(cache, jnp.ones((2, 1), jnp.int32)).jaxpr)
    n, dims = cfg.num_heads, {cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim}
    assert (2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim) in shapes
    assert not [s for s in shapes if 32 in s and n in s and s[-1] in dims], "expanded keys/values in a decode step"


def test_latent_cache_size_from_its_arrays():
    """Bytes per token of the decode cache, summed over the cache's own arrays: MLA keeps kv_lora + rope values
    per layer; the GQA cache of the same model (keys and values of every head, what expanding would store) many
    times more. The README's table comes from the same computation on the glm-4.7-flash preset, for an accelerator
    (a CPU keeps a bf16 cache in fp32: glm_jax.model.glm.cache_dtype)."""
    for name in ("glm-mla-test", "glm-4.7-flash"):
        cfg = GLMConfig.from_preset(name)
        with mock.patch.object(glm_module, "current_platform", return_value="gpu"):
            mla, gqa = cache_bytes_per_token(cfg), cache_bytes_per_token(gqa_equivalent(cfg))
        item = jnp.dtype(cfg.dtype).itemsize
        assert mla == cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * item
        assert gqa == cfg.num_layers * cfg.num_heads * 2 * cfg.head_dim * item
        if name == "glm-4.7-flash":
            assert (mla, gqa) == (54144, 962560)  # 47 x 576 x 2 bytes; 47 x 20 heads x (256 + 256) x 2 bytes
    cfg = GLMConfig.from_preset("glm-mla-test")
    cache = init_cache(GLMForCausalLM(cfg), 2, 16)  # the allocated arrays themselves
    assert sorted(cache["model"]) == ["cached_latent", "index", "position", "segment_ids"]
    assert cache["model"]["cached_latent"].nbytes == 2 * 16 * cache_bytes_per_token(cfg)


def gqa_equivalent(cfg):
    """The same model with grouped-query attention over every head (head_dim = the query/key head)."""
    return cfg.replace(attention_type="gqa", num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim)


def cache_bytes_per_token(cfg, batch=2, length=64):
    """Per-token bytes of the key/value buffers in the cache `cache_specs` describes (nothing allocated)."""
    specs = cache_specs(GLMForCausalLM(cfg), batch, length)["model"]
    buffers = [s for k, s in specs.items() if k.startswith("cached_")]
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in buffers) // (batch * length)


def test_greedy_generation_matches_transformers(tmp_path):
    ref = tiny_lite_model(seed=2, confident=True, vocab_size=256)
    cfg, params = save_and_load(ref, tmp_path)
    assert_greedy_matches_oracle(ref, GLMForCausalLM(cfg), params, [13, 4, 8], new_tokens=12,
                                 rng=np.random.RandomState(8))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_hf_round_trip_with_mtp(tmp_path, saved):
    """load_hf (with an MTP layer) -> save_hf -> the same tensors under transformers' names; transformers loads
    the written checkpoint and computes our logits; load_hf of it gives the same parameters."""
    ref, _ = saved
    src = tmp_path / "src"
    ref.save_pretrained(src)
    mtp = add_mtp_layer(src, ref)
    cfg, params = load_hf(src)
    n = cfg.num_layers
    assert cfg.num_mtp_layers == 1
    np.testing.assert_array_equal(np.asarray(params["model"]["mtp"]["block"]["attention"]["kv_b"]["kernel"][0]),
                                  mtp[f"model.layers.{n}.self_attn.kv_b_proj.weight"].T.reshape(20, 4, 22))
    out = save_hf(cfg, params, tmp_path / "ours")
    written, source = np_load_file(str(out / "model.safetensors")), np_load_file(str(src / "model.safetensors"))
    assert sorted(written) == sorted(source)
    for name, value in source.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "glm4_moe_lite" and raw["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    again = transformers.Glm4MoeLiteForCausalLM.from_pretrained(out).eval()
    no_mtp = {**params, "model": {k: v for k, v in params["model"].items() if k != "mtp"}}
    # The forward pass does not use MTP layers; the batch has the shapes compiled above.
    assert_matches_oracle(again, cfg.replace(num_mtp_layers=0), no_mtp, [40, 23, 7], seed=9, rtol=RTOL)
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg
    assert_same_params(params, params2)


# --------------------------------------------------------------------------------------- configs and presets
def test_config_layouts_and_presets():
    """The published config.json layout and transformers 5's give the same GLMConfig; the preset round-trips
    through transformers' Glm4MoeLiteConfig; GLM-4.7-Flash is ~30B parameters, ~3B active."""
    flash = GLMConfig.from_preset("glm-4.7-flash").replace(name="")
    published = {  # the published key set (top-level rope_theta, first_k_dense_replace, q_lora_rank as a number)
        "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "vocab_size": 154880,
        "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536, "num_hidden_layers": 47,
        "num_attention_heads": 20, "num_key_value_heads": 20, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "attention_bias": False, "max_position_embeddings": 202752, "rope_theta": 1000000.0, "rope_scaling": None,
        "partial_rotary_factor": 1.0, "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "v_head_dim": 256, "n_routed_experts": 64, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "routed_scaling_factor": 1.8, "n_group": 1,
        "topk_group": 1, "topk_method": "noaux_tc", "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "dtype": "bfloat16", "pad_token_id": 154820,
        "eos_token_id": [154820, 154827, 154829]}
    assert GLMConfig.from_hf_dict(published) == flash
    t5 = transformers.Glm4MoeLiteConfig.from_dict(published).to_dict()
    assert "rope_parameters" in t5 and t5["mlp_layer_types"][:2] == ["dense", "sparse"]
    assert GLMConfig.from_hf_dict(t5) == flash
    for name in ("glm-4.7-flash", "glm-mla-test"):
        cfg = GLMConfig.from_preset(name).replace(name="")
        written = cfg.to_hf_dict("transformers")
        theirs = transformers.Glm4MoeLiteConfig.from_dict(written)
        assert (theirs.q_lora_rank, theirs.kv_lora_rank, theirs.qk_head_dim, theirs.v_head_dim,
                theirs.rope_interleave, theirs.mlp_layer_types.count("dense")) == (
            cfg.q_lora_rank, cfg.kv_lora_rank, cfg.head_dim, cfg.v_head_dim, cfg.rope_interleaved,
            cfg.num_dense_layers)
        assert GLMConfig.from_hf_dict(written) == cfg and GLMConfig.from_hf_dict(theirs.to_dict()) == cfg
    assert 29e9 < flash.replace(num_mtp_layers=0).num_params() < 31e9
    assert 2.5e9 < flash.num_params(active=True) < 4e9
    with pytest.raises(ValueError, match="mla"):
        GLMConfig.from_preset("glm-mla-test", kv_lora_rank=0)
    with pytest.raises(ValueError, match="mlp_layer_types"):
        GLMConfig.from_hf_dict({**published, "mlp_layer_types": ["sparse", "dense"] + ["sparse"] * 45})


# ------------------------------------------------------------------------------------------------ 8 devices
SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, numpy as np
jax.config.update("jax_platforms", "cpu")
from flax import linen as nn
from glm_jax import GLMConfig, GLMForCausalLM, make_mesh, param_shardings, param_specs
from glm_jax import generation as G
from glm_jax.sharding import axis_rules, use_mesh
cfg = GLMConfig.from_preset("glm-mla-test")
model = GLMForCausalLM(cfg)
rng = np.random.RandomState(0)  # random weights on the host (no compiled init): matrices ~0.12, vectors ~1
params = jax.tree.map(lambda s: (rng.randn(*s.shape) * (0.12 if len(s.shape) >= 2 else 0.1)
                                 + (len(s.shape) < 2)).astype(np.float32), nn.unbox(param_specs(model)))
ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (4, 16)); mask = np.ones_like(ids); mask[1, :5] = 0
apply = lambda p: model.apply({"params": p}, ids, attention_mask=mask)
single = np.asarray(jax.jit(apply)(params))
for sizes in (dict(data=2, fsdp=2, tensor=2),):
    mesh = make_mesh(**sizes)
    shardings = param_shardings(param_specs(model), mesh)
    attn = shardings["model"]["moe_layers"]["attention"]
    assert attn["kv_b"]["kernel"].spec[2] == "tensor" and attn["q_b"]["kernel"].spec[2] == "tensor"
    assert attn["kv_a"]["kernel"].spec[2] is None and "fsdp" in str(attn["kv_a"]["kernel"].spec[1])
    with use_mesh(mesh), axis_rules():
        out = np.asarray(jax.jit(apply)(jax.device_put(params, shardings)))
    assert np.abs(out - single).max() < 1e-4 * np.abs(single).max(), sizes
tokens = G.generate(model, params, ids, mask, max_new_tokens=6, stop_ids=())
assert len(set(tokens[:, -6:].ravel().tolist())) > 4  # not degenerate
np.testing.assert_array_equal(tokens, G.generate(model, params, ids, mask, max_new_tokens=6, stop_ids=(),
                                                 mesh=make_mesh(fsdp=4, tensor=2)))
print("SHARDED_OK")
"""


@pytest.mark.slow
def test_sharded_forward_and_generation_match_single_device():
    """On 8 fake CPU devices (data / fsdp / tensor meshes): the forward pass and greedy generation with the
    latent cache equal the single-device results; q_b / kv_b split over heads, kv_a over embed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [root]))
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
