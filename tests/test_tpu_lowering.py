"""TPU path without a TPU: on 8 fake CPU devices, the splash kernel under the sharding rules (1) computes the
reference attention when interpreted per shard and (2) lowers, forward and backward, for the TPU platform on a
v5p-8-shaped (fsdp x tensor) mesh, (3) as does train.py's whole train step. Runs in a subprocess: the device count is fixed at jax import."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    from unittest import mock
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from glm_jax import GLMConfig, GLMForCausalLM, make_mesh, param_shardings
    from glm_jax.model.layers import attention as attn
    from glm_jax.sharding import axis_rules, use_mesh

    # (1) per-shard interpreted splash == reference, batch over fsdp and KV groups over tensor
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(4, 256, 4, 128), jnp.float32)
    k, v = (jnp.asarray(rng.randn(4, 256, 2, 128), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 156], 4, 0), jnp.int32)
    mesh = make_mesh(fsdp=4, tensor=2)
    with use_mesh(mesh):
        out = jax.jit(lambda *a: attn.sharded_splash_attention(*a, interpret=True))(q, k, v, seg, seg)
    ref = attn.xla_attention(q, k, v, attn.make_mask(seg, seg, 256, 256))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    # queries split over the sequence axis (context parallelism): each shard its causal offset, same result
    with use_mesh(make_mesh(fsdp=2, sequence=2, tensor=2)):
        out = jax.jit(lambda *a: attn.sharded_splash_attention(*a, interpret=True))(q, k, v, seg, seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    print("ok numerics", flush=True)

    # (2) forward + backward of the model with attention_impl=splash lowers for TPU under the mesh
    cfg = GLMConfig.from_preset("glm-test", num_heads=8, num_kv_heads=2, head_dim=128, dtype="bfloat16",
                                attention_impl="splash")
    model = GLMForCausalLM(cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))["params"]
    shardings = param_shardings(boxed, mesh)
    params = jax.tree.map(lambda b, s: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=s), boxed,
                          shardings, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    ids = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(p, i):
        with axis_rules():
            return jnp.mean(model.apply({"params": p}, i, segment_ids=jnp.ones_like(i)).astype(jnp.float32))

    with mock.patch.object(attn, "current_platform", return_value="tpu"), use_mesh(mesh):
        exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=("tpu",))(params, ids)
    text = exported.mlir_module()
    # splash forward, and its dq and dkv backward kernels
    assert text.count("tpu_custom_call") >= 3, text.count("tpu_custom_call")
    print("ok lowering", flush=True)

    # (3) the whole train step of train.py (AdamW, donated sharded state) lowers for TPU the same way
    from glm_jax.train.config import TrainSection
    from glm_jax.train.optimizer import make_optimizer
    from glm_jax.train.step import StepBuilder, batch_shardings, make_state, state_shardings

    tx, schedule = make_optimizer(TrainSection())
    builder = StepBuilder(model, tx, schedule, "lm", loss_chunk=128)
    abstract = jax.eval_shape(lambda p: make_state(p, tx, 0), params)
    s_shard = state_shardings(abstract, shardings, tx, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, s_shard)
    host = {k: np.zeros((1, 8, 512), np.int32) for k in ("input_ids", "targets", "segment_ids", "loss_mask")}
    b_shard = batch_shardings(mesh, host)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shard[k]) for k, v in host.items()}
    hyper = {"lr": jax.ShapeDtypeStruct((), jnp.float32), "skip_nonfinite": jax.ShapeDtypeStruct((), jnp.bool_)}
    with mock.patch.object(attn, "current_platform", return_value="tpu"), use_mesh(mesh):
        step = jax.export.export(builder.jit_train(s_shard, {}, b_shard), platforms=("tpu",))(state, {}, batch, hyper)
    assert step.mlir_module().count("tpu_custom_call") >= 3
    print("ok train step", flush=True)
""")


@pytest.mark.slow
def test_splash_path_shards_and_lowers_for_tpu():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", SCRIPT, repo], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("ok") == 3, r.stdout
