"""Speculative decoding (glm_jax.speculative, docs/speculative.md): greedy output identical to plain greedy decoding
for MTP and n-gram drafts on glm4_moe, MLA and DSA models, batched with left padding; the MTP drafts are the MTP
layer's predictions over the whole sequence (the accepted counts replayed from them); sampled output keeps the
model's distribution (a chi-square test of the first two tokens' joint distribution against the model's own
probabilities); streaming yields generate's columns; bad settings are clear errors."""

import functools
import math

import jax
import numpy as np
import pytest

from glm_jax import GLMConfig, GLMForCausalLM, generate, init_params, load_hf, stream_generate
from glm_jax.model import MTPHead
from glm_jax.speculative import generate_speculative, ngram_drafts
from hf_models import left_padded_batch, mtp_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (cfg, params) of a tiny checkpoint with an MTP layer (DSA: 5 of its keys per query)."""
    out = {}
    for family, kw in (("glm4_moe", {}), ("glm4_moe_lite", {}), ("glm_moe_dsa", {"index_topk": 5})):
        d = tmp_path_factory.mktemp(family)
        mtp_checkpoint(family, d, seed=4, **kw)
        out[family] = load_hf(d)
    return out


# method, drafts per step, family, whether a stop id is checked too: MTP chains (k > 1) on every family, n-gram
# drafts on the DSA model
CASES = [("mtp", 2, "glm4_moe", True), ("mtp", 2, "glm4_moe_lite", False), ("mtp", 2, "glm_moe_dsa", False),
         ("ngram", 3, "glm_moe_dsa", False)]


@pytest.mark.parametrize("method,k,family,stop", CASES)
def test_greedy_output_is_greedy_decoding(checkpoints, method, k, family, stop):
    cfg, params = checkpoints[family]
    model = GLMForCausalLM(cfg)
    ids, mask, _ = left_padded_batch([13, 5, 9], 13, cfg.vocab_size, seed=1)
    expected = generate(model, params, ids, mask, max_new_tokens=16, stop_ids=())
    res = generate_speculative(model, params, ids, mask, speculative=method, num_speculative_tokens=k,
                               max_new_tokens=16, stop_ids=())
    np.testing.assert_array_equal(res.tokens, expected)
    assert (res.emitted == 15).all()  # the first token comes from the prefill
    assert ((res.verify_steps >= math.ceil(15 / (k + 1))) & (res.verify_steps <= 15)).all()
    if stop:  # a stop id ends a row where generate ends it (and pads the rest); streamed: the same columns
        stop_id = int(expected[0, 13 + 6])
        kw = dict(max_new_tokens=16, stop_ids=(stop_id,), pad_id=0)
        plain = generate(model, params, ids, mask, **kw)
        np.testing.assert_array_equal(
            generate(model, params, ids, mask, speculative=method, num_speculative_tokens=k, **kw), plain)
        columns = list(stream_generate(model, params, ids, mask, speculative=method, num_speculative_tokens=k,
                                       chunk=2, **kw))
        assert 7 <= len(columns) <= 16
        np.testing.assert_array_equal(np.stack(columns, 1), plain[:, 13:13 + len(columns)])
        assert (plain[:, 13 + len(columns):] == 0).all()


def test_mtp_drafts_are_the_mtp_layers_predictions(tmp_path):
    """k = 1: each step's draft is the MTP layer's argmax at the position before the new token, computed here over
    the finished sequence without a cache; a small vocabulary makes acceptances frequent. Replaying acceptance
    from those predictions must give the engine's per-row verify steps exactly."""
    mtp_checkpoint("glm4_moe", tmp_path, seed=7, vocab_size=10)
    cfg, params = load_hf(tmp_path)
    model, new = GLMForCausalLM(cfg), 16
    ids, mask, _ = left_padded_batch([11, 4, 8, 11], 11, cfg.vocab_size, seed=3)
    res = generate_speculative(model, params, ids, mask, speculative="mtp", num_speculative_tokens=1,
                               max_new_tokens=new, stop_ids=())
    full_mask = np.concatenate([mask, np.ones((4, new), mask.dtype)], axis=1)
    hidden = jax.jit(functools.partial(model.apply, return_hidden=True))({"params": params}, res.tokens,
                                                                         attention_mask=full_mask)
    logits, _, _ = jax.jit(MTPHead(cfg).apply)({"params": params}, hidden, res.tokens, segment_ids=full_mask)
    mtp_next_next = np.argmax(np.asarray(logits[0]), axis=-1)  # [B, S]: at slot j, the guess for slot j + 2
    expected_steps = []
    for b in range(4):
        slot, count, steps = ids.shape[1], 1, 0  # the first new token's slot; tokens so far; verify steps
        while count < new:
            steps += 1
            accepted = mtp_next_next[b, slot - 1] == res.tokens[b, slot + 1] and count + 2 <= new
            slot, count = slot + 1 + accepted, count + 1 + accepted
        expected_steps.append(steps)
    np.testing.assert_array_equal(res.verify_steps, expected_steps)
    assert (res.verify_steps < new - 1).any()  # some drafts were accepted: the check is not vacuous


def chi_square_critical(df: int, z: float = 3.72) -> float:
    """The chi-square quantile for a standard-normal z (3.72: p = 1e-4), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("method,k,sampling", [("ngram", 2, dict(temperature=1.0)),
                                               ("mtp", 2, dict(temperature=0.7, top_k=6))])
def test_sampled_tokens_keep_the_models_distribution(tmp_path, method, k, sampling):
    """N rows with the same prompt; the first token comes from the prefill, the second from a verify step
    (an accepted draft or the corrected draw). Their joint frequencies must match p(t1) p(t2 | t1) computed from
    the model's logits with the same processing."""
    mtp_checkpoint("glm4_moe", tmp_path, seed=2, vocab_size=8)
    cfg, params = load_hf(tmp_path)
    model, n_rows, vocab = GLMForCausalLM(cfg), 3000, cfg.vocab_size
    # a prompt that ends in a repeated token, so that n-gram drafts find a match
    prompt = np.array([3, 5, 4, 7, 3, 5, 4, 6, 3, 5], np.int32)
    res = generate_speculative(model, params, np.tile(prompt, (n_rows, 1)), speculative=method,
                               num_speculative_tokens=k, max_new_tokens=2, stop_ids=(), seed=11, **sampling)
    pairs = res.tokens[:, -2] * vocab + res.tokens[:, -1]
    observed = np.bincount(pairs, minlength=vocab * vocab)

    def probs(logits):
        z = np.asarray(logits, np.float64) / sampling["temperature"]
        if sampling.get("top_k"):
            z = np.where(z >= np.sort(z, axis=-1)[..., -sampling["top_k"]][..., None], z, -np.inf)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    first = probs(model.apply({"params": params}, prompt[None])[0, -1])
    seconds = np.concatenate([np.tile(prompt, (vocab, 1)), np.arange(vocab)[:, None]], axis=1)
    second = probs(model.apply({"params": params}, seconds)[:, -1])
    expected = (first[:, None] * second).reshape(-1) * n_rows
    big = expected >= 5  # cells with fewer expected draws are pooled into one
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert observed[expected == 0].sum() == 0  # nothing outside the processed distribution's support
    stat = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-9)))
    assert stat < chi_square_critical(len(obs) - 1), (stat, len(obs))
    assert (res.emitted <= 1).all() and res.verify_steps.max() == 1


def test_ngram_drafts_follow_the_latest_longest_match():
    context = np.array([[5, 6, 7, 9, 5, 6, 7, 8, 1, 5, 6, 7, 0, 0],
                        [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0]], np.int32)
    drafts = np.asarray(ngram_drafts(context, np.array([12, 8]), 3))
    # row 0: suffix "5 6 7" last occurred at 4 -> 8 1 5; row 1: no earlier 8 -> the last token repeated
    np.testing.assert_array_equal(drafts, [[8, 1, 5], [8, 8, 8]])


def test_bad_settings_are_clear_errors():
    cfg = GLMConfig.from_preset("glm-test")
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="'mtp' needs a model with MTP layers"):
        generate(model, params, ids, speculative="mtp")
    with pytest.raises(ValueError, match="speculative: must be one of mtp, ngram"):
        generate(model, params, ids, speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens: must be in"):
        generate(model, params, ids, speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, params, ids, speculative="ngram", repetition_penalty=1.2)
