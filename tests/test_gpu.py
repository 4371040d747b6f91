"""GPU-only checks (skipped elsewhere): cuDNN flash attention equals the XLA reference within bf16 tolerance,
forward and backward, causal, left-padded and packed; and the whole model agrees across the two kernels.

Run on a GPU machine: python -m pytest -q tests/test_gpu.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLMConfig, GLMForCausalLM, init_params
from glm_jax.model.layers import attention as attn

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN attention)")


def _inputs(seed, b=2, s=512, n=8, g=2, d=128):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(b, s, n, d), jnp.bfloat16)
    k, v = (jnp.asarray(rng.randn(b, s, g, d), jnp.bfloat16) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("layout", ["causal", "left_padded", "packed"])
def test_cudnn_attention_matches_xla(layout):
    q, k, v = _inputs(0)
    b, s = q.shape[:2]
    seg = None
    if layout == "left_padded":
        seg = jnp.asarray(np.r_[[[1] * s], [[0] * 100 + [1] * (s - 100)]], jnp.int32)
    elif layout == "packed":
        seg = jnp.asarray(np.repeat([[1] * 200 + [2] * 250 + [3] * (s - 450)], b, 0), jnp.int32)

    def loss(impl, q, k, v):
        out = attn.dot_product_attention(q, k, v, seg, seg, impl=impl)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    # The cuDNN kernel really runs (a fallback to xla would make this comparison vacuous).
    hlo = jax.jit(lambda *a: attn.dot_product_attention(*a, seg, seg, impl="cudnn")).lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower()
    (_, ref), g_ref = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, out), g_out = jax.jit(jax.value_and_grad(lambda *a: loss("cudnn", *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    real = np.ones((b, s), bool) if seg is None else np.asarray(seg) > 0
    o, r = np.asarray(out, np.float32)[real], np.asarray(ref, np.float32)[real]
    assert np.max(np.abs(o - r)) < 2e-2 * np.max(np.abs(r)), np.max(np.abs(o - r))
    for a, c in zip(g_out, g_ref):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        assert np.max(np.abs(a - c)) < 3e-2 * np.max(np.abs(c))


@pytest.mark.parametrize("max_segments", [4, 2])  # 2 < the 3 documents of a row: the mask fallback
def test_cudnn_packed_layout_matches_xla(max_segments):
    """GLMConfig.max_segments: packed rows in cuDNN's ragged layout (or its fallback), forward and backward."""
    q, k, v = _inputs(1)
    b, s = q.shape[:2]
    seg = jnp.asarray(np.repeat([[1] * 200 + [2] * 250 + [3] * (s - 450)], b, 0), jnp.int32)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    packed = lambda q, k, v: attn.cudnn_attention(q, k, v, seg, seg, max_segments)  # noqa: E731
    xla = lambda q, k, v: attn.xla_attention(q, k, v, attn.make_mask(seg, seg, s, s))  # noqa: E731
    (_, out), g_out = jax.jit(jax.value_and_grad(lambda *a: loss(packed, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, ref), g_ref = jax.jit(jax.value_and_grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    o, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.max(np.abs(o - r)) < 2e-2 * np.max(np.abs(r))
    for a, c in zip(g_out, g_ref):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        assert np.max(np.abs(a - c)) < 3e-2 * np.max(np.abs(c))


def test_model_logits_agree_across_kernels():
    cfg = GLMConfig.from_preset("glm-test", num_heads=8, num_kv_heads=2, head_dim=128, dtype="bfloat16")
    params = init_params(GLMForCausalLM(cfg), jax.random.key(0))
    ids = jnp.asarray(np.random.RandomState(1).randint(3, cfg.vocab_size, (2, 256)))
    outs = {}
    for impl in ("xla", "cudnn"):
        fwd = jax.jit(GLMForCausalLM(cfg.replace(attention_impl=impl)).apply)
        assert ("cudnn" in fwd.lower({"params": params}, ids).compile().as_text().lower()) == (impl == "cudnn")
        outs[impl] = np.asarray(fwd({"params": params}, ids), np.float32)
    assert np.max(np.abs(outs["cudnn"] - outs["xla"])) < 2e-2 * np.max(np.abs(outs["xla"]))
