"""Model behaviour beyond parity: KV-cache decoding, packed sequences, remat, kernel fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from glm_jax import GLMConfig, GLMForCausalLM, init_cache, init_params
from glm_jax.model import decoding_layout, positions_from_segments, stack_layers, unstack_layers
from glm_jax.model.layers import attention as attn

CFG = GLMConfig.from_preset("glm-test")


@pytest.fixture(scope="module")
def params():
    return init_params(GLMForCausalLM(CFG), jax.random.key(0))


def test_param_tree_carries_logical_axes():
    boxed = jax.eval_shape(GLMForCausalLM(CFG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    q = boxed["model"]["layers"]["attention"]["query"]["kernel"]
    assert q.names == ("layers", "embed", "q_heads", "head_dim")
    assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")
    assert boxed["model"]["layers"]["mlp"]["wi"]["kernel"].names == ("layers", "embed", None, "mlp")


@pytest.mark.parametrize("prefill", [False, True])
def test_prefill_plus_decode_equals_full_forward(params, prefill):
    """Left-padded prompt prefilled into the cache, then one token at a time: same logits as one full pass.
    prefill=True (empty cache) attends within the prompt only; it must give the same result."""
    model = GLMForCausalLM(CFG)
    rng = np.random.RandomState(0)
    prompt_len, new = 10, 6
    ids = rng.randint(3, CFG.vocab_size, (2, prompt_len + new))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    ids[1, :4] = 0
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    cache = init_cache(model, 2, 32)
    out, v = model.apply({"params": params, "cache": cache}, jnp.asarray(ids[:, :prompt_len]),
                         attention_mask=jnp.asarray(mask[:, :prompt_len]), decode=True, prefill=prefill,
                         mutable=["cache"])
    steps = [np.asarray(out)]
    if prefill:
        last, _ = model.apply({"params": params, "cache": cache}, jnp.asarray(ids[:, :prompt_len]),
                              attention_mask=jnp.asarray(mask[:, :prompt_len]), decode=True, prefill=True,
                              last_logits_only=True, mutable=["cache"])
        np.testing.assert_allclose(np.asarray(last), steps[0][:, -1:], rtol=1e-5, atol=1e-5)
    cache = v["cache"]
    for t in range(prompt_len, prompt_len + new):
        out, v = model.apply({"params": params, "cache": cache}, jnp.asarray(ids[:, t:t + 1]), decode=True,
                             mutable=["cache"])
        cache = v["cache"]
        steps.append(np.asarray(out))
    decoded = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(decoded[real], full[real], rtol=1e-5, atol=1e-5)
    assert int(cache["model"]["index"]) == prompt_len + new
    # The cache holds the KV groups only: [layers, batch, max_len, kv_heads, head_dim].
    assert cache["model"]["cached_key"].shape == (CFG.num_layers, 2, 32, CFG.num_kv_heads,
                                                                   CFG.head_dim)


def test_bf16_on_cpu_takes_xlas_fast_forms(params):
    """A bf16 model on CPU (docs/serving.md, "bf16 on CPU"): every weight product has an fp32 result and at least
    two rows (Linear's `contract`; XLA's bf16-result and one-row forms are 3-5x slower) and the decode cache is
    fp32 (`cache_dtype`: a bf16 cache write copies the whole buffer); one decode step gives the full pass's
    logits, and both stay those of the fp32 model within bf16 rounding."""
    from jaxprs import equations

    cfg = CFG.replace(dtype="bfloat16")
    model = GLMForCausalLM(cfg)
    ids = jnp.asarray(np.random.RandomState(3).randint(3, CFG.vocab_size, (1, 6)))
    cache = init_cache(model, 1, 8)
    floats = {x.dtype for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    _, v = model.apply({"params": params, "cache": cache}, ids[:, :5], decode=True, mutable=["cache"])
    step = lambda c, tok: model.apply({"params": params, "cache": c}, tok, decode=True, mutable=["cache"])  # noqa: E731
    dots = [e for e in equations(jax.make_jaxpr(step)(v["cache"], ids[:, 5:]).jaxpr)  # weight products: no batch axes
            if e.primitive.name == "dot_general" and e.params["dimension_numbers"][1] == ((), ())]
    assert len(dots) >= 5  # the scanned block's query / key / value / output / MLP products and the vocabulary's
    for eqn in dots:
        assert eqn.params["preferred_element_type"] == jnp.float32 and eqn.invars[0].aval.dtype == jnp.bfloat16
        assert eqn.invars[0].aval.size >= 2 * eqn.invars[0].aval.shape[-1], eqn.invars[0].aval
    decoded = np.asarray(step(v["cache"], ids[:, 5:])[0], np.float32)[0, -1]
    full = np.asarray(model.apply({"params": params}, ids), np.float32)[0, -1]
    exact = np.asarray(GLMForCausalLM(CFG).apply({"params": params}, ids))[0, -1]
    np.testing.assert_allclose(decoded, full, atol=0.05 * np.abs(exact).max())
    np.testing.assert_allclose(full, exact, atol=0.05 * np.abs(exact).max())


def test_packed_segments_do_not_attend_across_documents(params):
    model = GLMForCausalLM(CFG)
    rng = np.random.RandomState(1)
    a, b = rng.randint(3, CFG.vocab_size, (1, 7)), rng.randint(3, CFG.vocab_size, (1, 9))
    packed = np.concatenate([a, b, np.zeros((1, 4), int)], axis=1)
    seg = np.array([[1] * 7 + [2] * 9 + [0] * 4])
    out = np.asarray(model.apply({"params": params}, jnp.asarray(packed), segment_ids=jnp.asarray(seg)))
    alone_a = np.asarray(model.apply({"params": params}, jnp.asarray(a)))
    alone_b = np.asarray(model.apply({"params": params}, jnp.asarray(b)))
    np.testing.assert_allclose(out[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:16], alone_b, rtol=1e-5, atol=1e-5)


def test_positions_restart_per_segment():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(np.asarray(positions_from_segments(seg)), [[0, 1, 0, 1, 2, 0, 1, 0]])


def test_segment_runs_describe_cudnn_packed_layout():
    """The (lengths, starts) arrays of cuDNN's packed layout: one entry per run of equal id, -1 after the last."""
    rng = np.random.RandomState(0)
    seg = np.sort(rng.randint(0, 5, (3, 40)), axis=1)  # left padding (0) then documents 1..4
    seg[2] = 1
    lengths, starts, n_runs = (np.asarray(x) for x in attn.segment_runs(jnp.asarray(seg), 6))
    for row, ln, st in zip(seg, lengths, starts):
        ids, first, counts = np.unique(row, return_index=True, return_counts=True)
        k = len(ids)
        np.testing.assert_array_equal(ln, [*counts, *[-1] * (6 - k)])
        np.testing.assert_array_equal(st, [*first, *[-1] * (7 - k)])
    assert n_runs == max(len(np.unique(r)) for r in seg)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_keep_values_and_gradients(params, policy):
    ids = jnp.asarray(np.random.RandomState(2).randint(3, CFG.vocab_size, (2, 12)))

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(GLMForCausalLM(cfg).apply({"params": p}, ids)) ** 2)

    g0 = jax.grad(loss)(params, CFG)
    g1 = jax.grad(loss)(params, CFG.replace(remat_policy=policy))
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def prefill_and_step(cfg, params, ids):
    """Logits of a prefill of ids[:, :8] into an empty cache, then of one cached decode step with ids[:, 8]."""
    model = GLMForCausalLM(cfg)
    logits, v = model.apply({"params": params, "cache": init_cache(model, 2, 16)}, ids[:, :8], decode=True,
                            prefill=True, mutable=["cache"])
    step, _ = model.apply({"params": params, "cache": v["cache"]}, ids[:, 8:9], decode=True, mutable=["cache"])
    return np.concatenate([np.asarray(logits), np.asarray(step)], axis=1)


def test_unrolled_layer_scan_keeps_values_gradients_and_decoding(params):
    """scan_unroll only changes the compiled code: same parameter tree, logits, gradients and cached decoding."""
    unrolled = CFG.replace(scan_unroll=CFG.num_layers)
    ids = jnp.asarray(np.random.RandomState(5).randint(3, CFG.vocab_size, (2, 12)))

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(GLMForCausalLM(cfg).apply({"params": p}, ids)) ** 2)

    for x, y in zip(jax.tree.leaves(jax.grad(loss)(params, CFG)), jax.tree.leaves(jax.grad(loss)(params, unrolled))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    hlo = jax.jit(lambda p: GLMForCausalLM(unrolled).apply({"params": p}, ids)).lower(params).as_text()
    assert "while" not in hlo  # really unrolled: no loop left in the program
    np.testing.assert_allclose(prefill_and_step(CFG, params, ids), prefill_and_step(unrolled, params, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unstacked_layers_give_the_same_model(params, remat):
    """scan_layers=False (one weight buffer per block) with unstack_layers(params): same logits, gradients and
    cached decoding as the stacked scan; stack_layers gives the original tree back."""
    flat = CFG.replace(scan_layers=False, remat_policy=remat)
    per_block = unstack_layers(params)
    assert "layers" not in per_block["model"] and per_block["model"]["layers_1"]["mlp"]["wi"]["kernel"].shape == \
        params["model"]["layers"]["mlp"]["wi"]["kernel"].shape[1:]
    shapes = jax.eval_shape(GLMForCausalLM(flat).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(per_block)
    back = stack_layers(per_block)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ids = jnp.asarray(np.random.RandomState(6).randint(3, CFG.vocab_size, (2, 12)))

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(GLMForCausalLM(cfg).apply({"params": p}, ids)) ** 2)

    g_flat = stack_layers(jax.grad(loss)(per_block, flat))
    for x, y in zip(jax.tree.leaves(jax.grad(loss)(params, CFG)), jax.tree.leaves(g_flat)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prefill_and_step(CFG, params, ids), prefill_and_step(flat, per_block, ids),
                               rtol=1e-5, atol=1e-5)


def test_decoding_layout_splits_the_stacks_and_can_free_them(params):
    """decoding_layout: the per-block layout (glm5_next and a per-block tree are returned as they are); with
    free_stacked the stacked arrays are deleted once split and the blocks hold the same values."""
    copy = jax.tree.map(jnp.array, params)  # decoding_layout(free_stacked=True) consumes its stacks
    cfg, per_block = decoding_layout(CFG, copy, free_stacked=True)
    assert not cfg.scan_layers and "layers" not in per_block["model"]
    assert jax.tree.leaves(copy["model"]["layers"])[0].is_deleted()
    for x, y in zip(jax.tree.leaves(stack_layers(per_block)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for given in [(cfg, per_block), (GLMConfig.from_preset("glm5-next-test"), params)]:
        assert all(a is b for a, b in zip(decoding_layout(*given), given))


def test_unavailable_kernel_falls_back_with_a_log(params, caplog):
    ids = jnp.asarray(np.random.RandomState(3).randint(3, CFG.vocab_size, (1, 8)))
    attn._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        out = GLMForCausalLM(CFG.replace(attention_impl="cudnn")).apply({"params": params}, ids)
    assert "falling back to xla" in caplog.text
    ref = GLMForCausalLM(CFG.replace(attention_impl="xla")).apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_bf16_activations_stay_close_to_fp32(params):
    ids = jnp.asarray(np.random.RandomState(4).randint(3, CFG.vocab_size, (2, 16)))
    ref = np.asarray(GLMForCausalLM(CFG).apply({"params": params}, ids))
    out = GLMForCausalLM(CFG.replace(dtype="bfloat16")).apply({"params": params}, ids)
    assert out.dtype == jnp.bfloat16
    assert np.max(np.abs(np.asarray(out, np.float32) - ref)) < 0.05 * np.max(np.abs(ref))


def test_splash_kernel_matches_xla_in_interpret_mode():
    """The TPU splash path (run by the Pallas interpreter on CPU) agrees with the reference, segments included."""
    rng = np.random.RandomState(5)
    b, s, n, g, d = 1, 256, 4, 2, 128
    q = jnp.asarray(rng.randn(b, s, n, d), jnp.float32)
    k, v = (jnp.asarray(rng.randn(b, s, g, d), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[0] * 10 + [1] * 100 + [2] * 146], jnp.int32)
    out = np.asarray(attn.splash_attention(q, k, v, seg, seg, interpret=True))
    ref = np.asarray(attn.xla_attention(q, k, v, attn.make_mask(seg, seg, s, s)))
    real = np.asarray(seg)[0] > 0
    np.testing.assert_allclose(out[:, real], ref[:, real], rtol=1e-4, atol=1e-4)


def test_ptuning_prefix_acts_as_cached_keys_values(params, tmp_path):
    """A P-tuning v2 prefix equals K/V already sitting in the cache before the sequence (THUDM feeds the prefix
    as past_key_values): prefill tokens A into a cache, copy their K/V into the prefix, then run tokens B with
    unshifted positions both ways."""
    from glm_jax import load_hf, save_hf

    p_len = 5
    cfg_p = CFG.replace(pre_seq_len=p_len)
    model = GLMForCausalLM(CFG)
    rng = np.random.RandomState(6)
    a = jnp.asarray(rng.randint(3, CFG.vocab_size, (1, p_len)))
    b = jnp.asarray(rng.randint(3, CFG.vocab_size, (1, 9)))
    cache = init_cache(model, 1, 16)
    _, v = model.apply({"params": params, "cache": cache}, a, decode=True, mutable=["cache"])
    pos = jnp.arange(9)[None]
    want, _ = model.apply({"params": params, "cache": v["cache"]}, b, position_ids=pos, decode=True, mutable=["cache"])

    kv = v["cache"]["model"]
    prefix = jnp.stack([kv["cached_key"][:, 0, :p_len], kv["cached_value"][:, 0, :p_len]], axis=1)
    params_p = {**params, "model": {**params["model"], "prefix": prefix}}
    got = GLMForCausalLM(cfg_p).apply({"params": params_p}, b, position_ids=pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(got) - np.asarray(model.apply({"params": params}, b)))) > 1e-3

    # THUDM layout round trip: transformer.prefix_encoder.embedding.weight [pre_seq_len, L*2*groups*hd].
    out = save_hf(cfg_p, params_p, tmp_path / "pt", format="thudm")
    from safetensors.numpy import load_file
    emb = load_file(str(out / "model.safetensors"))["transformer.prefix_encoder.embedding.weight"]
    assert emb.shape == (p_len, CFG.num_layers * 2 * CFG.num_kv_heads * CFG.head_dim)
    layer1_value = emb.reshape(p_len, CFG.num_layers * 2, CFG.num_kv_heads, CFG.head_dim)[:, 2 * 1 + 1]
    np.testing.assert_array_equal(layer1_value, np.asarray(prefix[1, 1]))
    cfg2, params2 = load_hf(out)
    assert cfg2.pre_seq_len == p_len
    np.testing.assert_array_equal(np.asarray(params2["model"]["prefix"]), np.asarray(prefix))


def test_classifier_reads_the_last_real_token_of_right_padded_rows():
    from glm_jax import GLMForSequenceClassification

    cfg = CFG.replace(num_labels=3)
    model = GLMForSequenceClassification(cfg)
    params = init_params(model, jax.random.key(2))
    rng = np.random.RandomState(7)
    row = rng.randint(3, cfg.vocab_size, (1, 9))
    padded = np.concatenate([row, np.zeros((1, 7), int)], axis=1)
    padded[0, 12] = 5  # garbage after the end: only segment ids say where the row ends
    seg = np.array([[1] * 9 + [0] * 7])
    alone = model.apply({"params": params}, jnp.asarray(row))
    got = model.apply({"params": params}, jnp.asarray(padded), segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(got), np.asarray(alone), rtol=1e-5, atol=1e-5)
