"""KV-cache generation: transformers parity (greedy, padding, stop ids, repetition penalty), bucketing without
recompiles, sampling semantics, streaming, and tensor-parallel generation on 8 fake CPU devices."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLMForCausalLM, init_cache, load_hf
from glm_jax import generation as G

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384


def tiny_torch_glm(seed=0, vocab=VOCAB, pad=0, eos=None):
    """A random fp32 transformers GlmForCausalLM whose logits are far from uniform (biases, norm scales too)."""
    torch.manual_seed(seed)
    config = transformers.GlmConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        pad_token_id=pad, eos_token_id=eos, tie_word_embeddings=False)
    model = transformers.GlmForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:  # ~unit-variance projections: confident, non-degenerate next-token distributions
                p.copy_(torch.randn_like(p) * 1.2 / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_torch_glm()
    d = tmp_path_factory.mktemp("glm") / "hf"
    ref.save_pretrained(d)
    cfg, params = load_hf(d)
    assert cfg.dtype == "float32"
    return ref, GLMForCausalLM(cfg), params


def left_padded(rng, lengths, total, vocab=VOCAB, pad=0):
    ids = np.full((len(lengths), total), pad, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for b, n in enumerate(lengths):
        ids[b, total - n:] = rng.randint(3, vocab, n)
        mask[b, total - n:] = 1
    return ids, mask


def hf_generate(ref, ids, mask, n, eos=None, **kw):
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=eos, **kw)
    return out.numpy()


def assert_matches_hf(ours, theirs, pad=0):
    """transformers trims columns once every row stopped; ours keeps max_new_tokens columns of pads."""
    assert ours.shape[1] >= theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == pad).all()


# --------------------------------------------------------------------------------------------- decode API itself
def test_cache_decode_matches_full_forward(pair):
    """Prefill + single steps through the model's decode mode give the logits of one full forward pass."""
    _, model, params = pair
    rng = np.random.RandomState(0)
    ids, mask = left_padded(rng, [9, 5], 9)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    cache = init_cache(model, 2, 16)
    apply = jax.jit(lambda c, x, m: model.apply({"params": params, "cache": c}, x, attention_mask=m, decode=True,
                                                mutable=["cache"]))
    logits, v = apply(cache, jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]))
    real = mask[:, :6] == 1
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :6][real], atol=1e-4, rtol=1e-4)
    for t in range(6, 9):
        logits, v = apply(v["cache"], jnp.asarray(ids[:, t:t + 1]), None)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
    assert int(v["cache"]["model"]["index"]) == 9
    np.testing.assert_array_equal(v["cache"]["model"]["position"], [9, 5])


# ---------------------------------------------------------------------------------------- transformers parity
def test_greedy_matches_transformers_unpadded(pair):
    ref, model, params = pair
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, 11))
    mask = np.ones_like(ids)
    theirs = hf_generate(ref, ids, mask, 16)
    ours = G.generate(model, params, ids, max_new_tokens=16, stop_ids=())
    assert ours.dtype == np.int32 and ours.shape == (2, 27)
    # Non-degenerate: the continuation is not one token repeated.
    assert len(set(theirs[0, 11:].tolist())) > 3
    assert_matches_hf(ours, theirs)


def test_greedy_matches_transformers_left_padded_with_stop(pair):
    ref, model, params = pair
    ids, mask = left_padded(np.random.RandomState(2), [13, 4, 8], 13)
    theirs = hf_generate(ref, ids, mask, 16)
    ours = G.generate(model, params, ids, mask, max_new_tokens=16, stop_ids=())
    assert_matches_hf(ours, theirs)
    # A stop id that row 0 produces at its 5th new token: that row stops there, is padded; the others go on.
    stop = int(theirs[0, 13 + 4])
    theirs = hf_generate(ref, ids, mask, 16, eos=stop)
    ours = G.generate(model, params, ids, mask, max_new_tokens=16, stop_ids=(stop, VOCAB - 1), pad_id=0)
    assert_matches_hf(ours, theirs)
    row0 = ours[0, 13:].tolist()
    assert row0.index(stop) <= 4 and all(t == 0 for t in row0[row0.index(stop) + 1:])


def test_greedy_repetition_penalty_matches_transformers(pair):
    ref, model, params = pair
    ids = np.random.RandomState(3).randint(3, VOCAB, (2, 7))
    mask = np.ones_like(ids)
    plain = G.generate(model, params, ids, max_new_tokens=16, stop_ids=())
    theirs = hf_generate(ref, ids, mask, 16, repetition_penalty=1.8)
    ours = G.generate(model, params, ids, max_new_tokens=16, repetition_penalty=1.8, stop_ids=())
    assert_matches_hf(ours, theirs)
    assert not (ours == plain).all()  # the penalty changed something, so the comparison means something


def test_all_rows_stop_early(pair):
    _, model, params = pair
    ids = np.random.RandomState(4).randint(3, VOCAB, (2, 5))
    free = G.generate(model, params, ids, max_new_tokens=12, stop_ids=())
    stops = (int(free[0, 5 + 2]), int(free[1, 5 + 3]))
    out, steps = G.generate(model, params, ids, max_new_tokens=12, stop_ids=stops, pad_id=7, return_num_steps=True)
    assert out.shape == (2, 17)
    for b in range(2):
        row = out[b, 5:].tolist()
        k = next(j for j, t in enumerate(row) if t in stops)
        assert row[:k + 1] == free[b, 5:5 + k + 1].tolist()
        assert all(t == 7 for t in row[k + 1:])
    assert steps <= 4 < 12  # the loop exited early


# ------------------------------------------------------------------------------------------- compile buckets
def test_bucketing_compiles_once_per_bucket(pair):
    _, model, params = pair
    G.clear_cache()
    rng = np.random.RandomState(5)
    for n, new in [(5, 10), (9, 12), (16, 9)]:  # prompt bucket 16, new-token bucket 16: one trace
        out = G.generate(model, params, rng.randint(3, VOCAB, (3, n)), max_new_tokens=new, stop_ids=())
        assert out.shape == (3, n + new)
    assert G.TRACE_COUNTS["generate"] == 1
    G.generate(model, params, rng.randint(3, VOCAB, (3, 17)), max_new_tokens=4, stop_ids=())  # prompt bucket 32
    assert G.TRACE_COUNTS["generate"] == 2
    # Sampling numbers and stop ids are runtime values: no retrace.
    G.generate(model, params, rng.randint(3, VOCAB, (3, 20)), max_new_tokens=4, temperature=0.7, top_p=0.9, seed=1,
               stop_ids=(5,))
    G.generate(model, params, rng.randint(3, VOCAB, (3, 20)), max_new_tokens=4, temperature=1.3, top_p=0.5, seed=2,
               stop_ids=(6, 7, 8))
    assert G.TRACE_COUNTS["generate"] == 3


def test_bucket_padding_does_not_change_tokens(pair):
    _, model, params = pair
    ids, mask = left_padded(np.random.RandomState(6), [6, 3], 6)
    a = G.generate(model, params, ids, mask, max_new_tokens=10, stop_ids=())
    b = G.generate(model, params, ids, mask, max_new_tokens=10, stop_ids=(), prompt_bucket=64, new_bucket=40)
    np.testing.assert_array_equal(a, b)
    assert [G.bucket_length(n) for n in (1, 16, 17, 100, 512, 513, 1500)] == [16, 16, 32, 128, 512, 1024, 1536]


# ------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("top_k,top_p", [(0, 0.7), (5, 1.0), (8, 0.6), (0, 0.05)])
def test_filter_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.RandomState(7).randn(4, 50).astype(np.float32) * 2
    theirs = torch.tensor(logits)
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    ours = np.asarray(G.filter_logits(logits, top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs.numpy()))
    np.testing.assert_allclose(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


def test_repetition_penalty_semantics():
    logits = jnp.array([[2.0, -2.0, 3.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(G.apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 3.0, -1.0]])


def test_sampling_distribution():
    """Empirical frequencies of choose_tokens follow softmax(logits / T) restricted to top_k/top_p."""
    logits = jnp.log(jnp.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 6000)

    def freq(temperature, top_k, top_p):
        spec = G.make_spec(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.0, num_stop=1,
                           vocab_size=6)
        knobs = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
        toks = jax.vmap(lambda k: G.choose_tokens(logits, None, k, spec, knobs))(keys)[:, 0]
        return np.bincount(np.asarray(toks), minlength=6) / len(keys)

    p = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    np.testing.assert_allclose(freq(1.0, 0, 1.0), p, atol=0.025)
    np.testing.assert_allclose(freq(1.0, 3, 1.0), np.r_[p[:3] / p[:3].sum(), 0, 0, 0], atol=0.025)
    # top_p 0.7: 0.4 + 0.25 < 0.7, so the third token is kept too.
    np.testing.assert_allclose(freq(1.0, 0, 0.7), np.r_[p[:3] / p[:3].sum(), 0, 0, 0], atol=0.025)
    q = p ** 2 / (p ** 2).sum()  # temperature 0.5
    np.testing.assert_allclose(freq(0.5, 0, 1.0), q, atol=0.025)
    assert freq(0.0, 0, 1.0)[0] == 1.0


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, model, params = pair
    ids = np.random.RandomState(8).randint(3, VOCAB, (2, 6))
    kw = dict(max_new_tokens=12, stop_ids=(), temperature=1.5)
    a = G.generate(model, params, ids, seed=1, **kw)
    assert (a == G.generate(model, params, ids, seed=1, **kw)).all()
    assert not (a == G.generate(model, params, ids, seed=2, **kw)).all()
    greedy = G.generate(model, params, ids, max_new_tokens=12, stop_ids=())
    np.testing.assert_array_equal(G.generate(model, params, ids, seed=3, top_k=1, top_p=0.5, **kw), greedy)


def test_sampling_params_passed_whole_equal_the_keywords(pair):
    """`sampling=SamplingParams(...)` is the loose keywords under one name: same tokens from generate and
    stream_generate; stop_token_ids join the stop ids, ignore_eos drops them; stop strings need a tokenizer."""
    _, model, params = pair
    ids = np.random.RandomState(8).randint(3, VOCAB, (2, 6))
    sp = G.SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5, max_tokens=10,
                          ignore_eos=True)
    loose = G.generate(model, params, ids, max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9,
                       repetition_penalty=1.3, seed=5, stop_ids=())
    np.testing.assert_array_equal(G.generate(model, params, ids, stop_ids=(1, 2), sampling=sp), loose)
    steps = list(G.stream_generate(model, params, ids, sampling=sp))
    np.testing.assert_array_equal(np.stack(steps, 1), loose[:, 6:])
    stop = int(loose[0, 6 + 2])
    stopped = G.generate(model, params, ids, stop_ids=(), sampling=G.SamplingParams(
        temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5, max_tokens=10, stop_token_ids=(stop,)))
    k = loose[0, 6:].tolist().index(stop)
    assert stopped[0, 6:6 + k + 1].tolist() == loose[0, 6:6 + k + 1].tolist()
    with pytest.raises(ValueError, match="^stop: stop strings need a tokenizer"):
        G.generate(model, params, ids, sampling=G.SamplingParams(stop=["x"]))


# ------------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("chunk,sampling", [(1, {}), (3, dict(temperature=0.9, top_k=20, top_p=0.9,
                                                               repetition_penalty=1.3, seed=5))])
def test_stream_equals_generate(pair, chunk, sampling):
    _, model, params = pair
    ids, mask = left_padded(np.random.RandomState(9), [7, 4], 7)
    full = G.generate(model, params, ids, mask, max_new_tokens=11, stop_ids=(), **sampling)
    steps = list(G.stream_generate(model, params, ids, mask, max_new_tokens=11, stop_ids=(), chunk=chunk, **sampling))
    assert len(steps) == 11 and all(s.shape == (2,) for s in steps)
    np.testing.assert_array_equal(np.stack(steps, 1), full[:, 7:])


def test_stream_stops_on_stop_id_single_row(pair):
    _, model, params = pair
    ids = np.random.RandomState(10).randint(3, VOCAB, (9,))
    free = G.generate(model, params, ids, max_new_tokens=12, stop_ids=())
    assert free.shape == (21,)
    stop = int(free[9 + 3])
    got = list(G.stream_generate(model, params, ids, max_new_tokens=12, stop_ids=(stop,)))
    assert all(isinstance(t, int) for t in got)
    k = free[9:].tolist().index(stop)
    assert got == free[9:9 + k + 1].tolist()


@pytest.mark.parametrize("preset,turns,bucket", [("glm-test", 4, 128), ("glm-dsa-test", 2, 64)])  # DSA: top-8
def test_conversation_cache_runs_only_the_new_tokens_and_changes_nothing(preset, turns, bucket):
    """Turns of a conversation (each prompt = the last prompt + the reply + a new message; once a reply is cut
    short, as templates drop old reasoning): with a ConversationCache, each turn reuses the common prefix (rolling
    back where the prompt diverges, growing the cache by buckets) and samples exactly the tokens a from-scratch
    generation samples. One prompt bucket for every from-scratch call keeps the compiles few."""
    from glm_jax import GLMConfig, init_params

    cfg = GLMConfig.from_preset(preset)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.RandomState(0)
    conv = G.ConversationCache()
    prompt, lengths, last_prompt = rng.randint(3, cfg.vocab_size, 20).tolist(), [], 0
    traces = G.TRACE_COUNTS["extend"]
    for turn in range(turns):
        kw = dict(max_new_tokens=12, stop_ids=(), temperature=0.9, top_p=0.9, seed=turn, prompt_bucket=bucket)
        fresh = [int(t) for t in G.stream_generate(model, params, np.asarray(prompt, np.int32), **kw)]
        ours = [int(t) for t in G.stream_generate(model, params, np.asarray(prompt, np.int32), conversation=conv,
                                                  chunk=3, **kw)]
        assert ours == fresh, turn
        # reused: nothing at first; then the last prompt and the reply but its last token (sampled, never fed),
        # or, after the cut, the last prompt and the 4 reply tokens kept
        expected = 0 if turn == 0 else last_prompt + (4 if turn == 3 else 11)
        assert conv.reused == expected, (turn, conv.reused, expected)
        last_prompt = len(prompt)
        lengths.append(conv.cache["model"]["segment_ids"].shape[1])
        cut = ours[:4] if turn == 2 else ours
        prompt = prompt + cut + rng.randint(3, cfg.vocab_size, 7).tolist()
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]  # grown, never shrunk
    assert G.TRACE_COUNTS["extend"] > traces
    # Not reused for a left-padded prompt: a full prefill, nothing kept.
    mask = np.ones(len(prompt), np.int32)
    mask[0] = 0
    list(G.stream_generate(model, params, np.asarray(prompt, np.int32), mask, conversation=conv, **kw))
    assert conv.reused == 0 and conv.cache is None


def test_input_validation(pair):
    _, model, params = pair
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="LEFT padding"):
        G.generate(model, params, ids, np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.generate(model, params, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        G.generate(model, params, ids, max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="token ids"):
        G.generate(model, params, np.array([[5, VOCAB]]), max_new_tokens=2)


# -------------------------------------------------------------------------------------------------- sharding
SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, numpy as np
    jax.config.update("jax_platforms", "cpu")
    from glm_jax import GLMConfig, GLMForCausalLM, init_params, make_mesh
    from glm_jax import generation as G
    assert jax.device_count() == 8, jax.devices()
    cfg = GLMConfig.from_preset("glm-test", num_heads=8, num_kv_heads=4, head_dim=8)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, (2, 10)); mask = np.ones_like(ids); mask[1, :4] = 0
    single = G.generate(model, params, ids, mask, max_new_tokens=16, stop_ids=())
    mesh = make_mesh(data=2, tensor=4)
    sharded = G.generate(model, params, ids, mask, max_new_tokens=16, stop_ids=(), mesh=mesh)
    placed = G.shard_params(model, params, mesh)
    spec = placed["model"]["layers"]["attention"]["query"]["kernel"].sharding.spec
    assert "tensor" in tuple(spec), spec
    streamed = np.stack(list(G.stream_generate(model, params, ids, mask, max_new_tokens=16, stop_ids=(), mesh=mesh,
                                               chunk=4)), 1)
    assert len(set(single[0, 10:].tolist())) > 3, single
    np.testing.assert_array_equal(sharded, single)
    np.testing.assert_array_equal(streamed, single[:, 10:])
    # a conversation kept sharded between turns (its cache growing) samples what one device does
    conv, prompt = G.ConversationCache(), ids[0].tolist()
    for turn in range(3):
        kw = dict(max_new_tokens=8, stop_ids=(), temperature=0.9, seed=turn, prompt_bucket=64)
        one = [int(t) for t in G.stream_generate(model, params, np.asarray(prompt), **kw)]
        kept = [int(t) for t in G.stream_generate(model, params, np.asarray(prompt), mesh=mesh, conversation=conv,
                                                  chunk=4, **kw)]
        assert kept == one and (conv.reused > 0) == (turn > 0), (turn, kept, one, conv.reused)
        prompt = prompt + kept + rng.randint(3, cfg.vocab_size, 12 * (turn + 1)).tolist()
    # the serving engine over the mesh (KV heads of its page pool over "tensor") gives the same greedy tokens
    from glm_jax import Engine, SamplingParams
    engine = Engine(model, params, max_num_seqs=2, page_size=4, mesh=mesh)
    assert "tensor" in tuple(engine.cache["model"]["cached_key"].sharding.spec), engine.cache["model"]["cached_key"].sharding
    outs = engine.generate([ids[0].tolist(), ids[1, 4:].tolist()], SamplingParams(temperature=0, max_tokens=16))
    assert [o.token_ids for o in outs] == single[:, 10:].tolist(), (outs, single)
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_sharded_generation_matches_single_device():
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
