"""Multi-token prediction (docs/mtp.md): the MTP layer's forward pass against the published definition written
in torch around transformers' own decoder layer (transformers does not run MTP layers; the definition is vLLM's
glm4_moe_mtp.py / DeepSeek-V3's: eh_proj([enorm(embed(x[t+1])) ; hnorm(h[t])]) -> decoder block ->
shared_head.norm -> lm_head, h = the main model's output after its final norm), for glm4_moe, glm4_moe_lite (MLA)
and glm_moe_dsa (DSA) checkpoints; the training loss against its definition. A train.py run that trains, resumes
and exports the MTP layer: tests/test_moe_train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from glm_jax import GLMConfig, GLMForCausalLM, init_params, load_hf
from glm_jax.model import MTPHead
from glm_jax.train import lora as lora_lib
from glm_jax.train.data import lm_examples
from glm_jax.train.step import StepBuilder
from hf_models import mtp_checkpoint, rel_err


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
    main_obj, main_aux = jax.jit(plain.sums)(params, batch)
    obj, aux = jax.jit(with_mtp.sums)(params, batch)

    hidden = model.apply({"params": params}, tokens, segment_ids=segments, return_hidden=True)
    logits, _, _ = jax.jit(MTPHead(cfg).apply)({"params": params}, hidden, tokens, segment_ids=segments)
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


def test_mtp_loss_trains_lora_adapters_of_the_main_layers():
    """train.mode lora: the MTP loss reaches the main layers' adapters (their gradient changes with its weight);
    the MTP layer itself, a frozen base parameter, is only read."""
    cfg = GLMConfig.from_preset("glm-moe-test", num_mtp_layers=1)
    model = GLMForCausalLM(cfg)
    base = init_params(model, jax.random.key(3))
    adapters = lora_lib.init_lora(jax.random.key(4), base, ["query", "value"], rank=2)
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0: the adapters change the model
    tokens = np.random.RandomState(1).randint(3, cfg.vocab_size, size=(2, 16))
    batch = {k: jnp.asarray(v) for k, v in lm_examples(tokens, np.ones_like(tokens)).items()}
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0}

    def grads(weight):
        builder = StepBuilder(model, optax.sgd(0.0), lambda s: 0.0, "lm", lora=lora, mtp_loss_weight=weight)
        loss = lambda p: builder.sums(builder.effective_params(p, base), batch)[0]  # noqa: E731
        return jax.jit(jax.grad(loss))(adapters)

    plain, with_mtp = grads(0.0), grads(0.3)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_mtp)))
    assert diff > 1e-6
