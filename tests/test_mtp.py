"""Multi-token prediction (docs/mtp.md): the MTP layer's forward pass against the published definition written
in torch around transformers' own decoder layer (transformers does not run MTP layers; the definition is vLLM's
glm4_moe_mtp.py / DeepSeek-V3's: eh_proj([enorm(embed(x[t+1])) ; hnorm(h[t])]) -> decoder block ->
shared_head.norm -> lm_head, h = the main model's output after its final norm), for glm4_moe, glm4_moe_lite (MLA)
and glm_moe_dsa (DSA) checkpoints."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch

from glm_jax import GLMConfig, GLMForCausalLM, init_params, load_hf
from glm_jax.chat import load_checkpoint
from glm_jax.convert.hf import get_path
from glm_jax.model import MTPHead
from glm_jax.train.data import lm_examples
from glm_jax.train.step import StepBuilder
from hf_models import mtp_checkpoint, rel_err
from test_train_run import ROOT, env_for


def torch_mtp_logits(main, block, extra, ids):
    """The MTP layer's logits at positions 0 .. S-2 (each predicts token t + 2), written from the definition."""
    eps = main.config.rms_norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    with torch.no_grad():
        ids = torch.tensor(ids)
        hidden = main.model(ids).last_hidden_state[:, :-1]  # after the final norm
        ahead = main.model.embed_tokens(ids[:, 1:])
        x = torch.cat([rms(ahead, extra["enorm.weight"]), rms(hidden, extra["hnorm.weight"])], -1)
        x = x @ extra["eh_proj.weight"].T
        s = x.shape[1]
        pos = torch.arange(s)[None]
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = block(x, attention_mask=mask, position_ids=pos, position_embeddings=main.model.rotary_emb(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        return main.lm_head(rms(out, extra["shared_head.norm.weight"])).numpy()


# DSA: every key selected (index_topk >= the sequence), since the indexer's ReLU scores tie at 0 and torch and XLA
# break top-k ties differently; the sparse selection itself is proven in test_dsa.py, the MTP block is the same.
@pytest.mark.parametrize("family,kw", [("glm4_moe", {}), ("glm4_moe_lite", {}), ("glm_moe_dsa", {"index_topk": 16})])
def test_mtp_logits_match_the_definition(tmp_path, family, kw):
    main, block, extra = mtp_checkpoint(family, tmp_path, seed=4, **kw)
    cfg, params = load_hf(tmp_path)
    assert cfg.num_mtp_layers == 1
    ids = np.random.RandomState(2).randint(3, cfg.vocab_size, size=(2, 12))
    expected = torch_mtp_logits(main, block, extra, ids)
    hidden = GLMForCausalLM(cfg).apply({"params": params}, ids, return_hidden=True)
    logits, _, _ = jax.jit(MTPHead(cfg).apply)({"params": params}, hidden, ids)
    assert logits.shape == (1, 2, 12, cfg.vocab_size)
    assert rel_err(np.asarray(logits[0, :, :-1]), expected) < 1e-4


def test_mtp_loss_is_the_next_next_token_loss():
    """The train step's MTP sums against the definition computed here from MTPHead's logits: at every position t
    whose tokens t .. t + 2 are one document and whose token t + 2 is a target, -log p(x[t+2]); the objective adds
    mtp_loss_weight times it to the main loss (packed rows: two documents and padding)."""
    cfg = GLMConfig.from_preset("glm-moe-test", num_mtp_layers=1)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(3))
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, cfg.vocab_size, size=(2, 16))
    segments = np.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4])
    batch = {k: jnp.asarray(v) for k, v in lm_examples(tokens, segments).items()}
    plain = StepBuilder(model, optax.sgd(0.0), lambda s: 0.0, "lm")
    with_mtp = StepBuilder(model, optax.sgd(0.0), lambda s: 0.0, "lm", mtp_loss_weight=0.3)
    main_obj, main_aux = plain.sums(params, batch)
    obj, aux = with_mtp.sums(params, batch)

    hidden = model.apply({"params": params}, tokens, segment_ids=segments, return_hidden=True)
    logits, _, _ = MTPHead(cfg).apply({"params": params}, hidden, tokens, segment_ids=segments)
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    nll, hits, count = 0.0, 0, 0
    for b in range(2):
        for t in range(14):
            if segments[b, t] > 0 and segments[b, t] == segments[b, t + 1] == segments[b, t + 2]:
                nll -= float(logp[b, t, tokens[b, t + 2]])
                hits += int(np.argmax(logp[b, t]) == tokens[b, t + 2])
                count += 1
    assert count == 7 + 5 + 10
    assert float(aux["mtp_count"]) == count and float(aux["mtp_hits"]) == hits
    np.testing.assert_allclose(float(aux["mtp_loss_sum"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss_sum"]), float(main_aux["loss_sum"]), rtol=1e-6)
    np.testing.assert_allclose(float(obj), float(main_obj) + 0.3 * nll, rtol=1e-5)


MTP_RUN = ["model.overrides={num_mtp_layers: 1, hidden_size: 64, num_layers: 2, num_heads: 4, head_dim: 16, "
           "moe_intermediate_size: 32, ffn_hidden_size: 96}", "data.seq_len=32", "data.max_tokens=20000",
           "train.steps=8", "train.global_batch_size=8", "train.warmup_steps=1", "train.eval_every=4",
           "train.eval_batches=2", "checkpoint.every=4", "checkpoint.keep=3"]


def run_train(run_dir, *overrides):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "moe-tiny.yaml"),
                        *MTP_RUN, *overrides, f"run_dir={run_dir}"], cwd=ROOT, env=env_for(1), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_train_py_trains_the_mtp_layer_resumes_exactly_and_exports_it(tmp_path):
    """configs/moe-tiny.yaml (train.mtp_loss_weight 0.3) shrunk: metrics.jsonl has the MTP loss and accuracy (and
    their eval values); a run resumed from step 4 repeats steps 5-8 exactly, MTP loss included; the MTP layer
    changes between the checkpoints, and the transformers export holds the trained layer."""
    export = tmp_path / "export"
    recs = run_train(tmp_path / "run", f"export.path={export}", "export.format=transformers")
    steps = {r["step"]: r for r in recs if "mtp_loss" in r}
    assert sorted(steps) == list(range(1, 9))
    assert all(0 <= r["mtp_accuracy"] <= 1 and np.isfinite(r["mtp_loss"]) for r in steps.values())
    assert steps[8]["mtp_loss"] < steps[1]["mtp_loss"] - 0.5, steps
    assert sum("eval_mtp_loss" in r and "eval_mtp_accuracy" in r for r in recs) >= 2

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "8")
    again = {r["step"]: r for r in run_train(resumed) if "mtp_loss" in r}
    assert sorted(again) == [5, 6, 7, 8]
    for s in again:
        assert abs(again[s]["loss"] - steps[s]["loss"]) <= 1e-6 and abs(again[s]["mtp_loss"] - steps[s]["mtp_loss"]) <= 1e-6

    at_4 = ocp.StandardCheckpointer().restore((tmp_path / "run" / "checkpoints" / "4" / "state").absolute())["params"]
    cfg, exported = load_hf(export)
    assert cfg.num_mtp_layers == 1
    _, final = load_checkpoint(tmp_path / "run")
    for path in (("eh_proj", "kernel"), ("block", "mlp", "experts", "wi")):
        get = lambda t: np.asarray(get_path(t["model"]["mtp"], path))  # noqa: E731
        np.testing.assert_allclose(get(exported), get(final), atol=1e-6)
        assert np.abs(get(final) - get(at_4)).max() > 1e-4, path
