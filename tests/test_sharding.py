"""The forward pass sharded over 8 fake CPU devices equals the single-device one.

Runs in a subprocess: the device count must be fixed before jax is first imported.
"""

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
    import jax, jax.numpy as jnp, numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from glm_jax import GLMConfig, GLMForCausalLM, load_hf, make_mesh, param_shardings, save_hf
    from glm_jax.sharding import axis_rules, use_mesh

    assert jax.device_count() == 8
    cfg = GLMConfig.from_preset("glm-test", num_heads=8, num_kv_heads=2)
    model = GLMForCausalLM(cfg)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (8, 24)))
    mask = jnp.asarray(np.r_[np.ones((7, 24)), [[0] * 5 + [1] * 19]].astype(np.int32))
    params = nn.unbox(model.init(jax.random.key(0), ids))["params"]
    single = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask))(params))

    shapes = [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8), dict(tensor=8), dict(data=2, tensor=4),
              dict(fsdp=2, sequence=2, tensor=2)]  # sequence (context) parallel: activations split along length
    for shape in shapes:
        mesh = make_mesh(**shape)
        boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
        shardings = param_shardings(boxed, mesh)
        sharded = jax.device_put(params, shardings)
        # 2 KV heads over 8-way tensor parallelism cannot split: that dimension must be replicated, not fail.
        if shape.get("tensor") == 8:
            spec = shardings["model"]["layers"]["attention"]["key"]["kernel"].spec
            assert spec[2] is None, spec
            assert shardings["model"]["layers"]["attention"]["query"]["kernel"].spec[2] == "tensor"
        batch = NamedSharding(mesh, P(("data", "fsdp"), "sequence"))

        @jax.jit
        def fwd(p, i, m):
            with axis_rules():
                return model.apply({"params": p}, i, attention_mask=m)

        with use_mesh(mesh):
            out = fwd(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))
        assert len(out.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-5)
        print("ok", shape, flush=True)

    # load_hf straight onto the mesh: every parameter arrives with its target sharding.
    import tempfile
    d = tempfile.mkdtemp()
    save_hf(cfg, params, d, format="thudm")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg2, loaded = load_hf(d, mesh=mesh)
    want = param_shardings(jax.eval_shape(model.init, jax.random.key(0), ids)["params"], mesh)
    for x, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
        assert x.sharding == s, (x.sharding, s)
    wi = loaded["model"]["layers"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.spec == P(None, "fsdp", None, "tensor"), wi.sharding.spec
    with use_mesh(mesh):
        out = fwd(loaded, ids, mask)
    np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-5)
    print("ok load_hf", flush=True)
""")


@pytest.mark.slow
def test_sharded_forward_equals_single_device(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", SCRIPT, repo], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("ok") == 6, r.stdout
