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
