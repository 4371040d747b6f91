"""Optimizer: weight-decay mask, schedule, and equality with optax.adamw (lr applied by the step)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glm_jax.train.config import TrainSection
from glm_jax.train.optimizer import decay_mask, make_optimizer, make_schedule


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {"model": {"layers": {"input_norm": {"scale": jnp.ones((2, 4))},
                                 "attention": {"query": {"kernel": jax.random.normal(k[0], (2, 4, 2, 2)),
                                                         "bias": jax.random.normal(k[1], (2, 2, 2))}}},
                      "final_norm": {"scale": jnp.ones((4,))}},
            "lm_head": {"kernel": jax.random.normal(k[2], (4, 8))}}


def test_decay_mask_skips_norms_and_biases_even_when_stacked():
    m = decay_mask(_params())
    assert m["model"]["layers"]["input_norm"]["scale"] is False  # 2-D because of the layer axis
    assert m["model"]["layers"]["attention"]["query"]["bias"] is False
    assert m["model"]["final_norm"]["scale"] is False
    assert m["model"]["layers"]["attention"]["query"]["kernel"] is True and m["lm_head"]["kernel"] is True


def test_schedule_warmup_then_cosine_to_min():
    t = TrainSection(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    s = make_schedule(t)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(100)) - 0.1) < 1e-6 and float(s(55)) < float(s(30))
    lin = make_schedule(TrainSection(steps=20, lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear"))
    assert abs(float(lin(10)) - 0.5) < 1e-6


def test_matches_optax_adamw_with_clipping():
    t = TrainSection(steps=10, lr=0.1, warmup_steps=3, weight_decay=0.1, clip_norm=0.5)
    tx, schedule = make_optimizer(t)
    ref = optax.chain(optax.clip_by_global_norm(0.5),
                      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=0.1, mask=decay_mask))
    p1 = p2 = _params()
    s1, s2 = tx.init(p1), ref.init(p2)
    for step in range(5):
        g = jax.tree.map(lambda x: jnp.sin(x * (step + 1)), p1)
        u1, s1 = tx.update(g, s1, p1)
        p1 = optax.apply_updates(p1, jax.tree.map(lambda u: -schedule(step) * u, u1))
        u2, s2 = ref.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(p1["lm_head"]["kernel"], _params()["lm_head"]["kernel"])


def test_chunked_cross_entropy_equals_full_logits():
    """train.loss_chunk gives the same loss and gradients as materialising all logits."""
    from glm_jax import GLMConfig, GLMForCausalLM, init_params
    from glm_jax.train.step import StepBuilder

    cfg = GLMConfig.from_preset("glm-test")
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.RandomState(0)
    batch = {"input_ids": jnp.asarray(rng.randint(3, cfg.vocab_size, (2, 32))),
             "targets": jnp.asarray(rng.randint(3, cfg.vocab_size, (2, 32))),
             "segment_ids": jnp.asarray(np.r_[[[1] * 20 + [2] * 12], [[1] * 32]]),
             "loss_mask": jnp.asarray((rng.rand(2, 32) > 0.3).astype(np.int32))}
    tx, schedule = make_optimizer(TrainSection())
    results = []
    for chunk in (0, 8):
        b = StepBuilder(model, tx, schedule, "lm", z_loss=1e-3, loss_chunk=chunk)
        (obj, aux), grads = jax.value_and_grad(b.sums, has_aux=True)(params, batch)
        results.append((obj, aux, grads))
    (o0, a0, g0), (o1, a1, g1) = results
    np.testing.assert_allclose(float(o1), float(o0), rtol=1e-5)
    np.testing.assert_allclose(float(a1["loss_sum"]), float(a0["loss_sum"]), rtol=1e-5)
    assert float(a1["count"]) == float(a0["count"]) == float(batch["loss_mask"].sum())
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
