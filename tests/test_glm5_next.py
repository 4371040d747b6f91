"""GLM-5.3-Flash (transformers glm5_next) against transformers' Glm5NextForConditionalGeneration, fp32: KDA layers
(chunked and recurrent), hyper-connections (4 streams and 1), MLA without rope with the pooled DSA indexer and a
"shared" indexer layer, clamped SwiGLU; logits on left-padded and packed rows, cached greedy generation, the
checkpoint both ways, and the structure (a chunked prefill, a decode step whose cost does not grow with the
sequence)."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from hf_models import (K, M, assert_decode_matches_forward, assert_greedy_matches_oracle, assert_matches_oracle,
                       forward, left_padded_batch, rel_err, saved_oracle, tiny_glm5_next_config, tiny_oracle,
                       torch_logits)
from jaxprs import out_shapes
from glm_jax import GLMConfig, GLMForCausalLM, load_hf, save_hf
from glm_jax import generation as G
from glm_jax.model import cache_specs, init_params, param_specs
from glm_jax.model.glm import hybrid_stacks
from glm_jax.model.layers import kda

# the oracle: transformers releases before glm5_next lack it
hf_next = pytest.importorskip("transformers.models.glm5_next.modeling_glm5_next")

# Two oracles: "mixed" = every layer kind (KDA dense / MoE, full and shared indexed MLA) with 4 streams; "units" =
# 8 layers (KDA, KDA, KDA, MLA) x 2 with one stream: one scanned unit repeated twice.
VARIANTS = {"mixed": {}, "units": dict(num_hidden_layers=8, hc_mult=1, layer_types=[K, K, K, M] * 2,
                                       indexer_types=["full"] * 8, mlp_layer_types=["sparse"] * 8)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def oracle(request, tmp_path_factory):
    ref, d = saved_oracle(tiny_oracle("glm5_next", seed=3, **VARIANTS[request.param]),
                          tmp_path_factory.mktemp(request.param))
    cfg, params = load_hf(d, kda_chunk_size=8)
    return request.param, ref, d, cfg, params


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    ref, d = saved_oracle(tiny_oracle("glm5_next", seed=5, confident=True), tmp_path_factory.mktemp("confident"))
    cfg, params = load_hf(d, kda_chunk_size=8)
    return ref, d, cfg, params


def test_config_reads_every_layout(oracle):
    name, ref, d, cfg, _ = oracle
    text = ref.config.text_config
    assert cfg.model_type == "glm5_next" and cfg.layer_types == tuple(text.layer_types)
    assert (cfg.hc_mult, cfg.index_kpool, cfg.swiglu_limit, cfg.qk_rope_head_dim) == (text.hc_mult, 2, 1.5, 0)
    if name == "mixed":
        assert cfg.indexer_types == ("full", "full", "shared", "full", "full")
        assert [(kinds, first, n) for _, kinds, first, n in hybrid_stacks(cfg)][1] == (((False, True, True),), 1, 1)
    else:  # (KDA, KDA, KDA, MLA) scanned twice
        assert [(len(kinds), first, n) for _, kinds, first, n in hybrid_stacks(cfg)] == [(4, 0, 2)]
    raw = json.loads((d / "config.json").read_text())
    flat = {**raw["text_config"], "model_type": "glm5_next"}  # a text-only checkpoint's top-level layout
    assert GLMConfig.from_hf_dict(flat) == GLMConfig.from_hf_dict(raw)
    kimi = {k: v for k, v in raw["text_config"].items() if k not in ("layer_types", "linear_num_heads")}
    kimi["linear_attn_config"] = {"num_heads": 2, "head_dim": 8, "short_conv_kernel_size": 4,
                                  "gate_lower_bound": -5.0, "kda_layers": [i for i, t in enumerate(cfg.layer_types)
                                                                          if t == K]}
    kimi["layer_types"] = None
    assert GLMConfig.from_hf_dict(kimi) == GLMConfig.from_hf_dict(raw["text_config"])
    released = dict(raw["text_config"], layer_types=[t if t == K else "deepseek_sparse_attention"
                                                     for t in cfg.layer_types])
    assert GLMConfig.from_hf_dict(released).layer_types == cfg.layer_types
    assert GLMConfig.from_hf_dict(cfg.to_hf_dict(), kda_chunk_size=8) == cfg  # the chunk is ours, not the file's


def test_presets_count_the_published_parameters():
    """glm-5.3-flash: 313.33B parameters, the count the published checkpoint's engines report; the formula equals
    the parameter tree of the test preset."""
    flash = GLMConfig.from_preset("glm-5.3-flash")
    assert flash.num_params() == 313_326_811_966 and flash.num_kda_layers == 34
    small = GLMConfig.from_preset("glm5-next-test")
    tree = nn.unbox(param_specs(GLMForCausalLM(small)))
    assert small.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("chunk", [4, 8, 64])
def test_kda_chunked_and_recurrent_match_transformers(chunk):
    rng = np.random.default_rng(chunk)
    b, s, h, d = 2, 21, 2, 8
    q, k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(3))
    g = (-5 / (1 + np.exp(-rng.normal(size=(b, s, h, d))))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.normal(size=(b, s, h))))).astype(np.float32)
    t = torch.tensor
    ref, ref_state = hf_next.chunk_kimi_delta_attention(t(q), t(k), t(v), t(g), t(beta), chunk_size=16,
                                                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    qn, kn = kda.l2norm(q) * d ** -0.5, kda.l2norm(k)
    for out, state in (kda.kda_chunked(qn, kn, v, g, beta, chunk_size=chunk), kda.kda_recurrent(qn, kn, v, g, beta)):
        np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=2e-5)
        np.testing.assert_allclose(np.asarray(state), ref_state.numpy(), atol=2e-5)
    # a document starting at token 9 of row 0: the state resets, as if the row began there
    starts = np.zeros((b, s), bool)
    starts[0, 9] = True
    out, _ = kda.kda_chunked(qn, kn, v, g, beta, starts=jnp.asarray(starts), chunk_size=chunk)
    alone, _ = kda.kda_recurrent(qn[:1, 9:], kn[:1, 9:], v[:1, 9:], g[:1, 9:], beta[:1, 9:])
    np.testing.assert_allclose(np.asarray(out)[0, 9:], np.asarray(alone)[0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out)[1], ref.numpy()[1], atol=2e-5)


def test_logits_match_transformers_left_padded(oracle):
    _, ref, _, cfg, params = oracle
    out = assert_matches_oracle(ref, cfg, params, [21, 14, 6], seed=1)
    assert np.abs(out.theirs).max() > 0.1


def test_packed_rows_match_separate_documents(mixed):
    """Two documents in one row (segment ids): each one's logits are transformers' on that document alone (KDA
    state, convolution, pools and attention all restart)."""
    ref, _, cfg, params = mixed
    rng = np.random.RandomState(7)
    a, b = rng.randint(3, cfg.vocab_size, 13), rng.randint(3, cfg.vocab_size, 10)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 13 + [2] * 10])
    ours = forward(cfg, params, packed, segment_ids=seg)[0]
    for doc, span in ((a, slice(0, 13)), (b, slice(13, 23))):
        theirs = torch_logits(ref, doc[None])[0]
        assert rel_err(ours[span], theirs) < 1e-4


def test_greedy_generation_matches_transformers(mixed):
    ref, _, cfg, params = mixed
    assert_greedy_matches_oracle(ref, GLMForCausalLM(cfg), params, [9, 5], 12, np.random.RandomState(0))


def test_cached_decoding_matches_the_forward_pass(mixed):
    """One token per call (the recurrent KDA step) and several (the chunked form from the cached state), through
    every block kind (the "shared" indexer layer's carried selection included)."""
    _, _, cfg, params = mixed
    ids, mask, _ = left_padded_batch([17, 11], 17, cfg.vocab_size, seed=4)
    cache = assert_decode_matches_forward(cfg, params, ids, mask, prompt=9, cache_len=24, steps=[1, 3, 1, 3],
                                          prefill=True)
    assert cache["model"]["kda_state"].dtype == jnp.float32


def test_checkpoint_round_trip_through_transformers(mixed, tmp_path, caplog):
    ref, d, cfg, params = mixed
    with caplog.at_level(logging.WARNING):
        load_hf(d)
    assert "vision-tower tensors" in caplog.text  # reported, not dropped silently
    out = save_hf(cfg, params, tmp_path / "out")
    config = transformers.AutoConfig.from_pretrained(out)
    config.vision_config = ref.config.vision_config
    back = transformers.Glm5NextForConditionalGeneration.from_pretrained(out, config=config).eval()
    ids = np.random.RandomState(2).randint(3, cfg.vocab_size, (2, 15))
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(ref, ids))
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg.replace(kda_chunk_size=64)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_prefill_is_chunked_no_seq_by_seq_tensor():
    """A 96-token forward (KDA chunks of 8, DSA blocks of 16) makes no array with two axes of the sequence length."""
    cfg = GLMConfig.from_preset("glm5-next-test")
    params = init_params(GLMForCausalLM(cfg), jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda p, x: GLMForCausalLM(cfg).apply({"params": p}, x))(
        params, jnp.zeros((1, 96), jnp.int32))
    shapes = out_shapes(jaxpr.jaxpr)
    assert any(8 in s and 96 not in s for s in shapes)  # chunk-sized blocks exist
    assert not [s for s in shapes if list(s).count(96) >= 2]


def test_kda_decoding_cost_does_not_grow_with_the_sequence():
    """All-KDA layers: the decode cache is a fixed-size state per row, and one decode step costs the same FLOPs
    whether the cache could hold 64 or 2048 tokens."""
    cfg = GLMConfig.from_preset("glm5-next-test", num_layers=2, layer_types=(K,) * 2, indexer_types=())
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    small, big = cache_specs(model, 2, 64)["model"], cache_specs(model, 2, 2048)["model"]
    assert small["kda_state"].shape == big["kda_state"].shape == (2, 2, 2, 16, 16)
    assert small["kda_conv"].shape == big["kda_conv"].shape and "cached_latent" not in small

    def step_flops(cache):
        f = jax.jit(lambda p, c, x: model.apply({"params": p, "cache": c}, x, decode=True, mutable=["cache"]))
        cost = f.lower(params, cache, jnp.zeros((2, 1), jnp.int32)).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    zeros = lambda specs: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs)  # noqa: E731
    assert step_flops(zeros(cache_specs(model, 2, 64))) == pytest.approx(step_flops(zeros(cache_specs(model, 2, 2048))),
                                                                         rel=0.02)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="layer 4 is 'shared'"):  # transformers hands a selection on to the next
        GLMConfig.from_preset("glm5-next-test", indexer_types=("full", "full", "full", "full", "shared"))  # layer only
    with pytest.raises(ValueError, match="multiple of index_kpool"):
        GLMConfig.from_preset("glm5-next-test", index_kpool=3)
    with pytest.raises(ValueError, match="layer_types"):
        GLMConfig.from_preset("glm5-next-test", layer_types=(K, M))
    with pytest.raises(ValueError, match="layer_types .*unknown"):
        GLMConfig.from_hf_dict({"model_type": "glm5_next", "num_hidden_layers": 2, "layer_types": [K, "sliding"]})


def test_speculative_decoding_is_refused():
    cfg = GLMConfig.from_preset("glm5-next-test")
    with pytest.raises(ValueError, match="KDA"):
        G.generate(GLMForCausalLM(cfg), None, np.ones((1, 4), np.int32), speculative="ngram")


@pytest.mark.slow
def test_train_py_run_learns_and_exports(tmp_path):
    """glm5-next-test trained by train.py on the shipped corpus: the loss falls, the routers balance (their biases
    move), and the transformers export holds the trained weights: transformers' logits equal ours. (Exact resume
    is the trainer's, whatever the model: tests/test_train_run.py, tests/test_moe_train.py.)"""
    from glm_jax.checkpoints import load_checkpoint
    from test_train_run import train

    export = tmp_path / "export"
    # one scanned unit (KDA, MLA) x 2 of MoE blocks: one compiled body (the parity tests cover every block kind)
    options = ["model.preset=glm5-next-test", "train.steps=12", "data.eval_fraction=0", "train.eval_every=0",
               "checkpoint.every=12", "model.overrides={vocab_size: 8192, num_layers: 4, first_k_dense_replace: 0, "
               "indexer_types: [], layer_types: [linear_attention, indexed_attention, linear_attention, "
               "indexed_attention]}"]
    train(tmp_path / "run", *options, f"export.path={export}", "export.format=transformers")
    steps = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    assert sorted(steps) == list(range(1, 13))
    assert np.mean([steps[s]["loss"] for s in (10, 11, 12)]) < steps[1]["loss"] - 1.0, steps
    assert all(len(r["moe/load_cv_layers"]) == 4 for r in steps.values())  # 4 MoE layers

    cfg, final = load_checkpoint(tmp_path / "run")
    router = final["model"]["hybrid_0"]["block_1"]["mlp"]["router"]["e_score_correction_bias"]
    assert np.abs(np.asarray(router)).max() > 0
    config = transformers.AutoConfig.from_pretrained(export)
    config.vision_config = tiny_glm5_next_config().vision_config
    theirs = transformers.Glm5NextForConditionalGeneration.from_pretrained(export, config=config).eval()
    # 9 tokens: every pool is selected. The indexer is not trained (as in transformers): its 4 heads of random
    # init score many pools exactly 0 on longer rows, top-k ties that torch and XLA break differently.
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 9))
    assert rel_err(forward(cfg, final, ids), torch_logits(theirs, ids)) < 1e-4


def test_lora_targets_reach_every_unit_block_and_export(mixed, tmp_path):
    """LoRA on KDA (kda_q, kda_o), MLA (q_b, kv_b) and routed experts: one pair per kernel of every unit block
    that has it; the merged model exports to a checkpoint transformers runs with the same logits."""
    from glm_jax.train import lora as lora_lib

    ref, _, cfg, params = mixed
    targets = ["kda_q", "kda_o", "q_b", "kv_b", "experts_wi"]
    sites = lora_lib.sites(params, targets)
    kda_blocks = {s[1][1:3] for s in sites if s[0][-1] == "kda_q"}
    assert kda_blocks == {(name, f"block_{j}") for name, kinds, _, _ in hybrid_stacks(cfg)
                          for j, kind in enumerate(kinds) if kind[0]}
    tree = lora_lib.init_lora(jax.random.key(0), params, targets, rank=4)
    tree = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), tree)
    merged = lora_lib.merge(params, tree, alpha=8.0, rank=4)
    ids = np.random.RandomState(3).randint(3, cfg.vocab_size, (2, 9))
    ours = forward(cfg, merged, ids)
    assert rel_err(ours, forward(cfg, params, ids)) > 1e-3  # the adapters change the model
    out = save_hf(cfg, merged, tmp_path / "merged")
    config = transformers.AutoConfig.from_pretrained(out)
    config.vision_config = ref.config.vision_config
    theirs = transformers.Glm5NextForConditionalGeneration.from_pretrained(out, config=config).eval()
    assert rel_err(ours, torch_logits(theirs, ids)) < 1e-4


def test_serving_engine_equals_generate_with_chunked_prefill_preemption_and_reused_slots(mixed):
    """The serving engine on every layer kind: each KDA layer's state lives in its request's decode slot (a prompt
    of 20 tokens is prefilled in two chunks, the second from the first's state), a slot handed to the next request
    starts from zero state, preempted requests are recomputed; prefix caching is off (a cached prefix's pages would
    come without the KDA state after them), though two prompts share two full pages. Greedy tokens = `generate`."""
    from glm_jax.serve import Engine, SamplingParams

    _, _, cfg, params = mixed
    model = GLMForCausalLM(cfg)
    rng = np.random.default_rng(2)
    shared = list(rng.integers(3, cfg.vocab_size, 16))
    prompts = [shared + [5, 6, 7, 8], list(rng.integers(3, cfg.vocab_size, 5)), shared + [9],
               list(rng.integers(3, cfg.vocab_size, 12)), list(rng.integers(3, cfg.vocab_size, 3))]
    expected = [G.generate(model, params, np.asarray(p, np.int32), max_new_tokens=6, temperature=0.0, stop_ids=(),
                           prompt_bucket=32)[len(p):].tolist() for p in prompts]
    # 2 slots, 5 usable pages of 8 (a request needs up to 4): preemptions; max_model_len 32: one page-table width
    engine = Engine(model, params, max_num_seqs=2, page_size=8, num_pages=6, prefill_chunk=16, max_model_len=32)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [o.token_ids for o in outs] == expected
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["hit_tokens"] == 0 and stats["pages_used"] == 0, stats
    assert engine.cache["model"]["kda_state"].shape[:2] == (cfg.num_kda_layers, 2)  # a state per slot, not per page


SHARDED = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from glm_jax import GLMConfig, GLMForCausalLM, init_params, make_mesh, param_shardings, param_specs
from glm_jax.sharding import axis_rules, use_mesh
UNIT = dict(num_layers=4, first_k_dense_replace=0, indexer_types=(),
            layer_types=("linear_attention", "indexed_attention") * 2)  # one scanned unit: one compiled body
cfg = GLMConfig.from_preset("glm5-next-test", moe_impl="ragged", **UNIT)
model = GLMForCausalLM(cfg)
params = init_params(model, jax.random.key(0))
ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (8, 20)); mask = np.ones_like(ids); mask[1, :4] = 0
fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))
single = np.asarray(fwd(params, ids, mask))
mesh = make_mesh(expert=2, fsdp=2, tensor=2)
shardings = param_shardings(param_specs(model), mesh)
block = shardings["model"]["hybrid_0"]
assert block["block_0"]["attention"]["q"]["kernel"].spec[2] == "tensor"  # [repeats, embed, KDA heads, head_dim]
assert block["block_0"]["attention"]["o"]["kernel"].spec[1] == "tensor"  # [repeats, KDA heads, head_dim, embed]
assert block["block_1"]["mlp"]["experts"]["wi"].spec[1] == "expert"  # [repeats, experts, embed, 2, moe_mlp]
with use_mesh(mesh), axis_rules():
    out = np.asarray(fwd(jax.device_put(params, shardings), ids, mask))
err = float(np.abs(out - single).max() / np.abs(single).max())
assert err < 1e-5, err
print("ok", err)
"""


@pytest.mark.slow
def test_sharded_forward_equals_one_device(tmp_path):
    """On 8 CPU devices, expert 2 x fsdp 2 x tensor 2: KDA heads split over tensor, experts over expert (the
    all-to-all path), and the logits of a left-padded batch equal one device's."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    r = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=600,
                       cwd=root)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_conversation_cache_is_not_reused():
    """Chat turns with a ConversationCache (glm_jax.generation): glm5_next prefills every turn (its KDA state cannot
    roll back; docs/glm5-next.md) and samples exactly what a from-scratch generation samples."""
    cfg = GLMConfig.from_preset("glm5-next-test")
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.RandomState(0)
    conv, prompt = G.ConversationCache(), rng.randint(3, cfg.vocab_size, 12).tolist()
    for turn in range(2):
        kw = dict(max_new_tokens=6, stop_ids=(), temperature=0.9, top_p=0.9, seed=turn, prompt_bucket=64)
        fresh = [int(t) for t in G.stream_generate(model, params, np.asarray(prompt, np.int32), **kw)]
        ours = [int(t) for t in G.stream_generate(model, params, np.asarray(prompt, np.int32), conversation=conv,
                                                  **kw)]
        assert ours == fresh and conv.reused == 0, (turn, conv.reused)
        prompt = prompt + ours + rng.randint(3, cfg.vocab_size, 5).tolist()
