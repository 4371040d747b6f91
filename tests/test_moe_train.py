"""Training a glm4_moe model (docs/training.md, "MoE models"), against transformers' Glm4MoeForCausalLM (fp32) as
the oracle for routing: the per-layer expert load the step reports and the correction-bias update equal what
transformers' routers choose; the bias gets no gradient and no optimizer / weight-decay update; the sequence-wise
balance loss equals a numpy formula; LoRA on attention and on the stacked experts merges and exports to a
checkpoint that transformers loads with the same logits; and a train.py run logs the moe metrics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from glm_jax import GLMForCausalLM, save_hf
from glm_jax.convert.hf import get_path
from glm_jax.train import lora as lora_lib
from glm_jax.train.config import TrainSection
from glm_jax.train.optimizer import make_optimizer
from glm_jax.train.step import StepBuilder, make_state
from hf_models import forward, rel_err, save_and_load, tiny_moe_model, torch_logits

BIAS = ("model", "moe_layers", "mlp", "router", "e_score_correction_bias")
KERNEL = ("model", "moe_layers", "mlp", "router", "kernel")
RATE = 0.01
SEQ = 16


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(transformers model, our config, our params, ids [2 microbatches, 1 row, SEQ]); 2 MoE layers after a dense
    one, group-limited top-2 of 8 experts, random non-zero correction biases."""
    hf = tiny_moe_model(seed=3)
    cfg, params = save_and_load(hf, tmp_path_factory.mktemp("moe_hf"))
    ids = np.random.default_rng(0).integers(1, 128, (2, 1, SEQ)).astype(np.int32)
    return hf, cfg, params, ids


def hf_routing(hf, ids):
    """transformers' router outputs per MoE layer on rows `ids` [B, S]: (logits [B*S, E], chosen experts)."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: seen.append((o[0].numpy(), o[2].numpy())))
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        hf(torch.tensor(ids))
    for h in hooks:
        h.remove()
    return seen


def builder_and_state(cfg, params, **kw):
    t = TrainSection(lr=1e-2, warmup_steps=0, weight_decay=0.1, schedule="constant")
    tx, schedule = make_optimizer(t, frozen=("e_score_correction_bias", "mtp"))
    model = GLMForCausalLM(cfg)
    return StepBuilder(model, tx, schedule, "lm", **kw), make_state(params, tx, 0)


def lm_batch(ids):
    return {"input_ids": jnp.asarray(ids), "targets": jnp.roll(jnp.asarray(ids), -1, axis=-1),
            "loss_mask": jnp.ones(ids.shape, jnp.int32)}


@pytest.fixture(scope="module")
def stepped(moe):
    """One train step (2 microbatches, balance loss on) and transformers' routing of the same 2 sequences."""
    hf, cfg, params, ids = moe
    builder, state = builder_and_state(cfg, params, moe_bias_update_rate=RATE, moe_balance_loss=0.1)
    old = jax.tree.map(np.asarray, params)
    new_state, metrics = jax.jit(builder.train_step)(state, {}, lm_batch(ids), {
        "lr": jnp.float32(1e-2), "skip_nonfinite": jnp.bool_(False)})
    routing = hf_routing(hf, ids[:, 0])
    counts = np.stack([np.bincount(e.reshape(-1), minlength=cfg.n_routed_experts) for _, e in routing])
    return old, jax.tree.map(np.asarray, new_state), jax.device_get(metrics), routing, counts


def test_load_metrics_equal_transformers_routing(stepped):
    _, _, m, _, counts = stepped
    assert counts.shape == (2, 8) and counts.sum() == 2 * 2 * SEQ * 2  # 2 layers, 2 sequences, top-2
    np.testing.assert_array_equal(m["moe_load_min"], counts.min(-1))
    np.testing.assert_array_equal(m["moe_load_max"], counts.max(-1))
    np.testing.assert_allclose(m["moe_load_cv"], counts.std(-1) / counts.mean(-1), rtol=1e-5)


def test_bias_update_is_rate_times_sign_and_untouched_by_the_optimizer(stepped):
    old, new, _, _, counts = stepped
    b0, b1 = get_path(old, BIAS), get_path(new["params"], BIAS)
    assert np.abs(b0).min() > 0  # weight decay (lr * 0.1 * bias) would show on these
    expected = b0 + RATE * np.sign(counts.mean(-1, keepdims=True) - counts)
    np.testing.assert_allclose(b1, expected, rtol=0, atol=1e-7)
    assert np.abs(b1 - b0).max() == pytest.approx(RATE)
    # the router kernel itself is trained (gradient + Adam + weight decay)
    assert np.abs(get_path(new["params"], KERNEL) - get_path(old, KERNEL)).max() > 1e-4


def test_bias_gets_no_gradient_but_the_kernel_does(moe):
    _, cfg, params, ids = moe
    builder, _ = builder_and_state(cfg, params, moe_balance_loss=0.1)
    batch = jax.tree.map(lambda x: x[0], lm_batch(ids))

    def loss(p):
        obj, aux = builder.sums(p, batch, moe_stats=True)
        return obj + sum(r["balance_terms"].sum() for r in aux["moe"].values())

    g = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(get_path(g, BIAS)).max()) == 0.0
    assert float(jnp.abs(get_path(g, KERNEL)).max()) > 0.0


def test_balance_loss_equals_numpy_formula(moe, stepped):
    _, cfg, _, _ = moe
    _, _, m, routing, _ = stepped
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    total = 0.0
    for logits, experts in routing:  # DeepSeek-V3 eq. 17-20, per sequence, averaged over the 2 sequences
        for s in range(2):
            sc = 1 / (1 + np.exp(-logits.reshape(2, SEQ, e)[s].astype(np.float64)))
            f = np.bincount(experts.reshape(2, SEQ, k)[s].reshape(-1), minlength=e) * e / (k * SEQ)
            p = (sc / sc.sum(-1, keepdims=True)).mean(0)
            total += (f * p).sum() / 2
    assert float(m["moe_balance"]) == pytest.approx(total, rel=1e-5)


def test_lora_on_attention_and_experts_exports_to_transformers(moe, tmp_path):
    _, cfg, params, ids = moe
    targets = ["query", "value", "out", "wi", "wo", "experts_wi", "experts_wo"]
    lora = lora_lib.init_lora(jax.random.key(1), params, targets, rank=4)
    assert lora["moe_layers"]["experts_wi"]["a"].shape == (2, 8, 64, 4)  # [L, E, embed, r]
    assert lora["moe_layers"]["experts_wo"]["b"].shape == (2, 8, 4, 64)
    assert lora["moe_layers"]["wi"]["a"].shape == (2, 64, 4)  # the shared experts
    assert set(lora) == {"query", "value", "out", "wi", "wo", "moe_layers"}  # model/layers: the dense block
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora = jax.tree.map(lambda x: x if x.ndim and x.shape[-2] != 4 else 0.05 * jax.random.normal(next(keys), x.shape),
                        lora)  # B != 0 (B is [.., r, out]): the merge changes every targeted kernel
    merged = lora_lib.merge(params, lora, alpha=8.0, rank=4)
    for path in [("model", "moe_layers", "mlp", "experts", "wi"), ("model", "moe_layers", "mlp", "experts", "wo"),
                 ("model", "moe_layers", "attention", "query", "kernel"), ("model", "layers", "mlp", "wi", "kernel")]:
        assert float(jnp.abs(get_path(merged, path) - get_path(params, path)).max()) > 1e-3, path
    np.testing.assert_array_equal(get_path(merged, KERNEL), get_path(params, KERNEL))  # the router is frozen
    out = save_hf(cfg, merged, tmp_path / "merged")
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    rows = ids[:, 0]
    assert rel_err(forward(cfg, merged, rows), torch_logits(hf, rows)) < 1e-4


def test_train_py_moe_run_logs_load_moves_the_bias_and_trains_the_mtp_layer(tmp_path):
    """A glm4_moe model with an MTP layer (train.mtp_loss_weight 0.3) trained 30 steps on the shipped corpus: the
    expert load and the MTP loss and accuracy are logged per step and the bias moves by +-rate per step; a run
    resumed from step 15 repeats steps 16-30 exactly, MTP loss included; the MTP layer changes between the
    checkpoints, the transformers export holds the trained layer, and it has learnt: next-next-token accuracy far
    above chance and greedy MTP drafts accepted at more than 1.3 tokens per verify step with k = 1 (docs/mtp.md)."""
    import shutil

    import orbax.checkpoint as ocp

    from glm_jax import load_hf
    from glm_jax.checkpoints import default_tokenizer, load_checkpoint, tokenizer_or_shipped
    from glm_jax.speculative import generate_speculative
    from test_train_run import ROOT, train

    export, rate = tmp_path / "export", 1e-3  # the default rate (0.01 reroutes so much that the MTP layer lags)
    options = ["model.preset=glm-moe-test", "model.overrides.num_mtp_layers=1", "train.mtp_loss_weight=0.3",
               "train.steps=30", "data.eval_fraction=0", "train.eval_every=0", "checkpoint.every=15",
               f"train.moe_bias_update_rate={rate}", "train.moe_balance_loss=1e-4"]
    train(tmp_path / "run", *options, f"export.path={export}", "export.format=transformers")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    assert sorted(steps) == list(range(1, 31))
    for r in steps.values():  # glm-moe-test: 2 MoE layers of 8 experts; 8 rows x 32 tokens x top-2 per layer
        assert len(r["moe/load_cv_layers"]) == 2 and r["moe/load_cv"] >= 0 and r["moe/balance_loss"] > 0
        assert all(lo <= 8 * 32 * 2 / 8 <= hi for lo, hi in zip(r["moe/load_min"], r["moe/load_max"]))
        assert 0 <= r["mtp_accuracy"] <= 1 and np.isfinite(r["mtp_loss"])
    assert steps[30]["mtp_loss"] < steps[1]["mtp_loss"] - 2.0, steps
    assert np.mean([steps[s]["mtp_accuracy"] for s in range(26, 31)]) > 0.1  # chance: 1 / 8192
    restore = lambda step: ocp.StandardCheckpointer().restore(  # noqa: E731
        (tmp_path / "run" / "checkpoints" / str(step) / "state").absolute())["params"]
    at_15, at_30 = restore(15), restore(30)
    bias = np.asarray(get_path(at_15, BIAS))  # initialised at 0, then 15 steps of +-rate or 0
    steps_taken = bias / rate
    np.testing.assert_allclose(steps_taken, np.round(steps_taken), atol=1e-3)
    assert np.abs(bias).max() > 0 and np.abs(bias).max() <= 15 * rate + 1e-6

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "30")
    train(resumed, *options)
    again = {r["step"]: r for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    assert sorted(again) == list(range(16, 31))
    for s in again:
        assert abs(again[s]["loss"] - steps[s]["loss"]) <= 1e-6
        assert abs(again[s]["mtp_loss"] - steps[s]["mtp_loss"]) <= 1e-6

    cfg, exported = load_hf(export)
    _, final = load_checkpoint(tmp_path / "run")
    assert cfg.num_mtp_layers == 1
    for path in (("eh_proj", "kernel"), ("block", "mlp", "experts", "wi")):
        get = lambda t: np.asarray(get_path(t["model"]["mtp"], path))  # noqa: E731
        np.testing.assert_allclose(get(exported), get(final), atol=1e-6)
        np.testing.assert_allclose(get(final), get(at_30), atol=1e-6)
        assert np.abs(get(at_30) - get(at_15)).max() > 1e-4, path
    # speculative decoding with the trained layer: greedy continuations of corpus lines
    tok = tokenizer_or_shipped(default_tokenizer(tmp_path / "run"))
    lines = [line for line in (ROOT / "data" / "corpus" / "bible_asv_en.txt").read_text().splitlines()
             if len(line) > 80][100:108]
    ids = np.asarray([tok.encode(line)[:16] for line in lines], np.int32)
    res = generate_speculative(GLMForCausalLM(cfg), exported, ids, speculative="mtp", num_speculative_tokens=1,
                               max_new_tokens=64, stop_ids=())
    assert res.accept_length.mean() > 1.3, res.accept_length


def test_dense_model_sows_nothing_and_its_step_is_unchanged():
    from flax import linen as nn

    from glm_jax import GLMConfig, param_specs

    model = GLMForCausalLM(GLMConfig.from_preset("glm-test"))
    shapes = nn.unbox(param_specs(model))
    _, sown = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((2, 8), jnp.int32),
                                                   mutable=["intermediates"]), shapes)
    assert sown == {}
    tx, schedule = make_optimizer(TrainSection())
    assert not StepBuilder(model, tx, schedule, "lm", moe_bias_update_rate=RATE).moe  # applies without `mutable`


def test_padding_is_routed_but_not_counted(moe):
    """load_stats with a token mask equals load_stats of the real tokens alone (counts and the sequence-wise
    balance term); through the model, the sown counts of a left-padded batch sum to real tokens x top-k."""
    from glm_jax.model.layers.moe import load_stats

    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2 * 6, 8)), jnp.float32)
    experts = jnp.asarray(np.argsort(-np.asarray(logits), axis=1)[:, :2], jnp.int32)
    mask = np.ones(12, bool)
    mask[[0, 1, 6]] = False  # two pads in the first sequence, one in the second
    counts, balance = load_stats(logits, experts, 8, 2, jnp.asarray(mask))
    parts = [load_stats(logits[s * 6:(s + 1) * 6][mask[s * 6:(s + 1) * 6]],
                        experts[s * 6:(s + 1) * 6][mask[s * 6:(s + 1) * 6]], 8, 1) for s in range(2)]
    np.testing.assert_allclose(counts, parts[0][0] + parts[1][0])
    np.testing.assert_allclose(balance, parts[0][1] + parts[1][1], rtol=1e-6)
    assert float(load_stats(logits, experts, 8, 2)[0].sum()) == 24.0  # without a mask every token counts

    _, cfg, params, ids = moe
    attention_mask = np.ones(ids[0].shape, np.int32)
    attention_mask[0, :5] = 0
    _, inter = GLMForCausalLM(cfg).apply({"params": params}, ids[0], attention_mask=attention_mask,
                                         mutable=["intermediates"])
    sown = [x for path, x in jax.tree_util.tree_flatten_with_path(inter)[0] if "expert_counts" in str(path)]
    assert sown and all(float(x.sum()) == (ids[0].size - 5) * cfg.num_experts_per_tok * (x.size // 8) for x in sown)


def test_mtp_layers_and_the_bias_are_frozen_and_get_no_optimizer_state():
    """A full fine-tune step with weight decay leaves model/mtp (kept for export, trained by no loss) exactly as
    it was, and the optimizer holds Adam moments only for the trained leaves."""
    from glm_jax import GLMConfig, init_params
    from glm_jax.train.config import Config
    from glm_jax.train.build import step_builder

    cfg = GLMConfig.from_preset("glm-moe-test", num_mtp_layers=1)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    run = Config()
    run.train.lr, run.train.weight_decay, run.train.warmup_steps = 1e-2, 0.1, 0
    builder = step_builder(run, model, "lm")
    state = make_state(params, builder.tx, 0)
    ids = np.random.default_rng(0).integers(1, 512, (1, 2, SEQ)).astype(np.int32)
    new, _ = jax.jit(builder.train_step)(state, {}, lm_batch(ids), {"lr": jnp.float32(1e-2),
                                                                   "skip_nonfinite": jnp.bool_(False)})
    mtp_old, mtp_new = params["model"]["mtp"], new["params"]["model"]["mtp"]
    assert jax.tree.leaves(mtp_old)
    for a, b in zip(jax.tree.leaves(mtp_old), jax.tree.leaves(mtp_new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = get_path(new["params"], ("model", "moe_layers", "mlp", "router", "kernel"))
    assert np.abs(np.asarray(moved) - np.asarray(get_path(params, KERNEL))).max() > 1e-4
    n_trained = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                    if not any(getattr(k, "key", None) in ("mtp", "e_score_correction_bias") for k in p))
    n_state = sum(x.size for x in jax.tree.leaves(new["opt_state"]) if x.ndim)
    assert n_state == 2 * n_trained  # mu and nu, nothing for the frozen leaves
