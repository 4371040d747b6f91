"""The serving engine (glm_jax/serve): greedy output equal to `glm_jax.generate` for every family, with and
without the prefix cache and under preemption; one compiled program per step kind whatever comes and goes;
per-request sampling, stops and aborts; bad requests refused with the field named; speculative decoding."""

import jax
import numpy as np
import pytest

from glm_jax import GLMConfig, GLMForCausalLM, generate, init_params, load_hf, save_hf
from glm_jax.model import decoding_layout
from glm_jax.serve import Engine, QueueFull, SamplingParams
from glm_jax.serve import drafts as drafts_lib
from glm_jax.serve import engine as E
from glm_jax.serve.__main__ import _arg_parser, build
from glm_jax.serve.pages import PagePool, page_keys
from glm_jax.speculative import generate_speculative
from glm_jax.tokenizers import SentencePieceTokenizer
from hf_models import mtp_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def tiny(preset):
    cfg = GLMConfig.from_preset(preset, dtype="float32", param_dtype="float32", max_seq_len=256)
    model = GLMForCausalLM(cfg)
    # scaled up so that random logits are far apart: greedy ties are not a coin toss between code paths
    params = jax.jit(lambda k: jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, init_params(model, k)))(
        jax.random.key(1))
    return model, params


@pytest.fixture(scope="module")
def dense():
    return tiny("glm-test")


def prompts_sharing_a_prefix(vocab, n=6, seed=0):
    rng = np.random.default_rng(seed)
    system = list(rng.integers(3, vocab, 24))
    out = [system + list(rng.integers(3, vocab, int(k))) for k in rng.integers(1, 20, n)]
    return out + [list(rng.integers(3, vocab, k)) for k in (5, 40, 3)]


def reference(model, params, prompts, n):
    """`generate` of each prompt alone (one program: every prompt in the same length bucket)."""
    return [generate(model, params, np.asarray(p, np.int32), max_new_tokens=n, temperature=0.0,
                     stop_ids=(), prompt_bucket=64)[len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("preset", ["glm-test", "glm-moe-test", "glm-mla-test", "glm-dsa-test"])
def test_greedy_equals_generate_with_prefix_cache_and_preemption(preset):
    """Dense GQA, MoE, MLA's latent cache and DSA's indexer keys: the same tokens as `generate`, with the prefix
    cache on (its hits counted), off, and with a KV budget so small that requests are preempted and resumed (the
    other families: that budget only, prefix hits included, with the blocks stacked and one buffer per block)."""
    model, params = tiny(preset)
    prompts = prompts_sharing_a_prefix(model.cfg.vocab_size)
    expected = reference(model, params, prompts, GREEDY.max_tokens)
    # max_model_len 64: page tables of 4 or 8 pages, a handful of step programs to compile
    cases = [({}, lambda s: s["hit_tokens"] >= 24 and not s.get("preemptions")),
             ({"prefix_caching": False}, lambda s: s["hit_tokens"] == 0),
             ({"num_pages": 10}, lambda s: s.get("preemptions", 0) > 0)]
    models = [(model, params)] * 3
    if preset != "glm-test":  # the cache layout is what differs: one engine that both hits and preempts
        cases = [({"num_pages": 10}, lambda s: s.get("preemptions", 0) > 0 and s["hit_tokens"] >= 24)] * 2
        cfg, blocks = decoding_layout(model.cfg, params)  # (the dense per-block model: tests/test_serve_http.py)
        models = [(model, params), (GLMForCausalLM(cfg), blocks)]
    for (options, check), (model, params) in zip(cases, models):
        engine = Engine(model, params, max_num_seqs=4, page_size=8, prefill_chunk=16, max_model_len=64, **options)
        outs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected, options
        stats = engine.stats()
        assert check(stats), (options, stats)
        assert stats["pages_used"] == 0 and stats["running"] == stats["waiting"] == 0  # everything released


def test_a_few_programs_per_step_kind_whatever_comes_and_goes(dense):
    """Requests of many lengths join and leave a running batch: the decode and prefill programs are traced once
    per shape bucket (rows 1, 2, 3; chunk 8; page-table width 4, 8, 10), never per request; the same traffic
    again traces nothing new."""
    model, params = dense
    engine = Engine(model, params, max_num_seqs=3, page_size=4, prefill_chunk=8, max_model_len=40)
    rng = np.random.default_rng(1)
    traffic = [(list(rng.integers(3, 500, int(k))), int(rng.integers(1, 8))) for k in rng.integers(1, 30, 12)]

    def wave():
        before = dict(E.TRACE_COUNTS)
        pending, finished = list(traffic), 0
        while pending or engine.has_unfinished():
            if pending and engine.stats()["waiting"] < 2:
                prompt, n = pending.pop()
                engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n))
            finished += sum(o.finished for o in engine.step())
        assert finished == len(traffic)
        return {k: E.TRACE_COUNTS[k] - before.get(k, 0) for k in ("decode", "prefill")}

    first = wave()
    assert 1 <= first["decode"] <= 3 * 3 and 1 <= first["prefill"] <= 2 * 3, first
    assert wave() == {"decode": 0, "prefill": 0}


def test_warm_up_compiles_everything_traffic_needs(dense):
    """After `warm_up`, requests of every length and both default kinds of rows trace no new program; the warm-up
    leaves no trace in the pool or the outputs."""
    model, params = dense
    engine = Engine(model, params, max_num_seqs=2, page_size=8, prefill_chunk=32, max_model_len=48)
    before = dict(E.TRACE_COUNTS)
    # 2 kinds of rows x (decode: rows 1, 2 x widths 4, 6 + prefill: rows 1, 2 x chunks 16, 32 x widths 4, 6)
    assert engine.warm_up() == 2 * (2 * 2 + 2 * 2 * 2)
    assert E.TRACE_COUNTS["decode"] > before.get("decode", 0) and engine.stats()["pages_used"] == 0
    warmed = dict(E.TRACE_COUNTS)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(3, 500, int(k))) for k in (1, 9, 17, 30, 36)]
    outs = engine.generate(prompts, [GREEDY, SamplingParams(max_tokens=6, seed=1)] * 2 + [GREEDY])
    assert dict(E.TRACE_COUNTS) == warmed
    greedy = [0, 2, 4]
    assert [outs[i].token_ids for i in greedy] == reference(model, params, [prompts[i] for i in greedy], 10)


def test_sampling_is_per_request_and_reproducible(dense):
    """A seeded request draws the same tokens alone or beside others; greedy rows stay greedy in a mixed batch;
    top_k=1 is greedy; a different seed gives another stream."""
    model, params = dense
    prompt = [5, 17, 42, 7]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12)
    alone = Engine(model, params, max_num_seqs=4, page_size=4).generate([prompt], seeded)[0].token_ids
    engine = Engine(model, params, max_num_seqs=4, page_size=4)
    outs = engine.generate([prompt, [9, 9, 9], prompt, prompt],
                           [seeded, SamplingParams(temperature=0.7, seed=1, max_tokens=12), GREEDY,
                            SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=10)])
    greedy = reference(model, params, [prompt], 10)[0]
    assert outs[0].token_ids == alone
    assert outs[2].token_ids == greedy and outs[3].token_ids == greedy
    other = Engine(model, params, page_size=4).generate([prompt], SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=8, max_tokens=12))[0].token_ids
    assert other != alone


def test_stops_logprobs_and_abort(dense):
    model, params = dense
    prompt = [5, 17, 42, 7]
    greedy = reference(model, params, [prompt], 10)[0]
    engine = Engine(model, params, max_num_seqs=2, page_size=4)
    stop_at = greedy[3]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,),
                                                   logprobs=3))[0]
    assert out.token_ids == greedy[:greedy.index(stop_at) + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids) and all(len(lp["top"]) == 3 for lp in out.logprobs)
    assert all(lp["top"][0][0] == t and lp["logprob"] <= 0 for lp, t in zip(out.logprobs, out.token_ids))
    assert engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4))[0].finish_reason == "length"
    # abort: slot and pages come back at once
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["pages_used"] > 0
    assert engine.abort(rid) and not engine.abort(rid)
    assert engine.stats()["running"] == 0 and engine.stats()["pages_used"] == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("prompt,sampling,match", [
    ([], GREEDY, "^prompt: must hold at least one token"),
    ([1, 10 ** 6], GREEDY, "^prompt: token id 1000000 is outside the vocabulary"),
    ([1] * 64, GREEDY, "^prompt: 64 tokens leave no room in the context of 64"),
    ([1] * 60, SamplingParams(max_tokens=10), "^max_tokens: 60 prompt tokens \\+ max_tokens 10 exceed"),
])
def test_bad_requests_are_refused_naming_the_field(dense, prompt, sampling, match):
    model, params = dense
    engine = Engine(model, params, max_model_len=64, page_size=8)
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, sampling)
    assert engine.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=2))[0].finished  # still serving


def test_sampling_params_and_queue_limits(dense):
    with pytest.raises(ValueError, match="^top_p: must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="^logprobs: must be in"):
        SamplingParams(logprobs=21)
    assert SamplingParams(stop="x").stop == ("x",)
    model, params = dense
    engine = Engine(model, params, max_waiting=1, page_size=8, num_pages=4)
    with pytest.raises(ValueError, match="need more KV pages than the cache has"):
        engine.add_request([1] * 20, SamplingParams(max_tokens=10))
    engine.add_request([1, 2], GREEDY)
    with pytest.raises(QueueFull):
        engine.add_request([1, 2], GREEDY)


def test_page_pool_reference_counts_and_prefix_keys():
    pool = PagePool(5, 2)
    a, b = pool.allocate(), pool.allocate()
    keys = page_keys([1, 2, 3, 4, 5], 2, 2)
    assert keys == page_keys([1, 2, 3, 4, 9], 2, 2) and keys[1] != page_keys([0, 2, 3, 4], 2, 2)[1]
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.match(keys) == [a, b] and pool.refs[a] == 2
    pool.release([a, b])
    pool.release([a, b])
    assert pool.used == 0 and pool.available == 4 and pool.match(keys[:1]) == [a]  # cached, not freed
    pool.release([a])
    taken = [pool.allocate() for _ in range(4)]  # the two free pages, then the cached ones (evicted)
    assert sorted(taken) == [1, 2, 3, 4] and pool.allocate() is None and pool.match(keys) == []


def test_a_checkpoint_without_tokenizer_files_is_served_with_the_shipped_one(tmp_path, capsys):
    """As in the chat CLI: the small SentencePiece tokenizer stands in, with one warning line."""
    cfg = GLMConfig.from_preset("glm-test", vocab_size=SentencePieceTokenizer().vocab_size + 8, max_seq_len=64)
    ckpt = save_hf(cfg, init_params(GLMForCausalLM(cfg), jax.random.key(0)), tmp_path / "ckpt", format="transformers")
    _, engine = build(_arg_parser().parse_args(["--checkpoint", str(ckpt), "--max-num-seqs", "1"]))
    assert isinstance(engine.tokenizer, SentencePieceTokenizer)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {ckpt} has no tokenizer.json, tokenizer.model or ice_text.model: using the small SentencePiece "
        f"tokenizer shipped with glm_jax (pass --tokenizer for the model's own)"]
    # glm-serve decodes from one weight buffer per block unless --scan-layers keeps the stack
    assert not engine.model.cfg.scan_layers and "layers_1" in engine.params["model"]
    _, stacked = build(_arg_parser().parse_args(["--checkpoint", str(ckpt), "--max-num-seqs", "1", "--scan-layers"]))
    assert stacked.model.cfg.scan_layers and "layers" in stacked.params["model"]
    with pytest.raises(ValueError, match=rf"^--knowledge: {tmp_path}: not a knowledge index"):  # before loading
        build(_arg_parser().parse_args(["--checkpoint", str(tmp_path / "nope"), "--knowledge", str(tmp_path)]))


@pytest.mark.parametrize("method,k", [("mtp", 2), ("ngram", 3)])
def test_speculative_engine_gives_generate_tokens_and_speculative_steps(tmp_path, method, k):
    """An engine with speculative decoding: greedy requests give `generate`'s tokens, also when preempted and
    resumed; its verify steps and accepted drafts are exactly `generate_speculative`'s for the same prompts (whose
    MTP drafts tests/test_speculative.py replays against the MTP layer's whole-sequence predictions); a sampled
    request with top logprobs runs to its end; a repetition penalty is refused."""
    mtp_checkpoint("glm4_moe", tmp_path, seed=7, vocab_size=10)  # few words: many drafts accepted
    cfg, params = load_hf(tmp_path)
    model, new = GLMForCausalLM(cfg), 16
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 10, n).tolist() for n in (5, 11, 8, 13)]
    ids, mask = np.zeros((4, 13), np.int32), np.zeros((4, 13), np.int32)
    for b, p in enumerate(prompts):
        ids[b, 13 - len(p):], mask[b, 13 - len(p):] = p, 1
    res = generate_speculative(model, params, ids, mask, speculative=method, num_speculative_tokens=k,
                               max_new_tokens=new, stop_ids=())
    greedy = SamplingParams(temperature=0, max_tokens=new)
    for options in ({}, {"num_pages": 7})[:2 if method == "mtp" else 1]:  # n-gram drafts keep no state to resume
        engine = Engine(model, params, max_num_seqs=4, max_model_len=48, speculative=method,
                        num_speculative_tokens=k, **options)
        outs = engine.generate(prompts, greedy)
        assert [o.token_ids for o in outs] == res.tokens[:, 13:].tolist(), options
        if not options:  # per request, as generate_speculative's rows
            np.testing.assert_allclose([o.accept_length for o in outs], res.accept_length)
        stats = engine.stats()
        if options:
            assert stats.get("preemptions", 0) > 0
        else:
            assert stats["spec_steps"] == res.verify_steps.sum()
            assert stats["spec_emitted"] == res.emitted.sum() and stats["spec_accepted"] > 0
            assert engine.accept_length() == pytest.approx(res.emitted.sum() / res.verify_steps.sum())
    if method != "mtp":
        return
    outs = engine.generate(prompts[:2], [SamplingParams(temperature=0.8, top_k=4, max_tokens=new, seed=3),
                                         SamplingParams(temperature=0, max_tokens=new, logprobs=2)])
    assert len(outs[0].token_ids) == new and outs[1].token_ids == res.tokens[1, 13:].tolist()
    assert len(outs[1].logprobs) == new and all(len(lp["top"]) == 2 for lp in outs[1].logprobs)
    with pytest.raises(ValueError, match="repetition_penalty: not with speculative decoding"):
        engine.add_request(prompts[0], SamplingParams(repetition_penalty=1.1))
    # warm-up compiles the MTP prefill and verify programs that traffic then uses (one row, one chunk, one width)
    small = Engine(model, params, max_num_seqs=1, max_prefill_rows=1, max_model_len=32, prefill_chunk=16,
                   speculative=method, num_speculative_tokens=k)
    assert small.warm_up([greedy]) == 2
    traced = dict(drafts_lib.TRACE_COUNTS)
    assert small.generate(prompts[1:2], greedy)[0].token_ids == res.tokens[1, 13:].tolist()
    assert dict(drafts_lib.TRACE_COUNTS) == traced
