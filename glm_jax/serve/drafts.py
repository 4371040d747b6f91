"""The serving engine's speculative decoding programs (docs/speculative.md, docs/serving.md "Speculative decoding").

With `Engine(speculative="mtp" | "ngram", num_speculative_tokens=k)` a generating request's decode step is a
verify step: its last token and k drafts run at its own positions over its page table, the drafts are accepted
(greedy rows: while they equal the argmax; sampled rows: speculative sampling against the row's processed
distribution) and 1 .. k+1 tokens come back. Drafts:
  * "ngram": computed inside the verify program from the request's tokens (`context`), before the forward pass;
  * "mtp": the MTP layer runs over the verified positions after the forward pass (and over every prefill chunk),
    with its own page pool on the same page tables, and proposes the next step's k drafts; a sampled row's draft
    distributions stay on the device, one [k, V] block per decode slot.
Rejected drafts' keys lie past the request's length and are overwritten by its next step, in both pools.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from glm_jax.model import PagedIndex
from glm_jax.generation import MAX_LOGPROBS
from glm_jax.serve.sampling import RowSpec, row_log_probs, sample_rows
from glm_jax.speculative import Drafter, accept_sampled, limit_vocab, ngram_drafts

TRACE_COUNTS: collections.Counter = collections.Counter()  # "verify" / "prefill" traces of these programs


def row_keys(knobs, tag: int):
    """Each row's random key for this step: the request's seed and its token count (as `sample_rows`), then
    `tag` (acceptance, drafts)."""
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(knobs["seed"], knobs["count"])
    return jax.vmap(lambda key: jax.random.fold_in(key, tag))(keys)


def _draw(knobs, spec: RowSpec):
    """The engine's draft picker: each row draws from its processed distribution (a greedy row: the argmax)."""
    def draw(logits, j):
        logq = row_log_probs(logits[:, None], knobs, spec)[:, 0]
        return jax.vmap(jax.random.categorical)(row_keys(knobs, 2 + j), logq).astype(jnp.int32), logq

    return draw


@functools.lru_cache(maxsize=64)
def verify_program(model, spec: RowSpec, method: str, k: int, top_logprobs: bool):
    """verify(params, cache, mtp_cache, logq, tokens [B, k+1], context [B, C], length [B], pages, slots, knobs) ->
    (accepted n [B], emitted [B, k+1], their logprobs [B, k+1], top logprobs or None, next drafts [B, k] or None,
    cache, mtp_cache, logq). tokens[:, 0] is each row's last token at position length - 1; its drafts are
    tokens[:, 1:] ("mtp") or found in `context` (the row's tokens by position, "ngram")."""
    def run(params, cache, mtp_cache, logq, tokens, context, length, pages, slots, knobs):
        TRACE_COUNTS["verify"] += 1
        drafter = Drafter(model, params, pages, k, _draw(knobs, spec))
        if method == "ngram":
            tokens = tokens.at[:, 1:].set(ngram_drafts(context, length, k))
        index = drafter.index(length - 1, k + 1)
        logits, hidden, cache = drafter.forward(cache, tokens, index)
        target = row_log_probs(logits, knobs, spec)
        draft_logq = logq[slots] if method == "mtp" else None
        n, emitted = accept_sampled(tokens[:, 1:], draft_logq, target, row_keys(knobs, 1))
        raw = jax.nn.log_softmax(limit_vocab(logits, knobs), axis=-1)  # the model's own, as OpenAI reports
        chosen = jnp.take_along_axis(raw, emitted[..., None], axis=-1)[..., 0]
        top = None
        if top_logprobs:
            top_lp, top_ids = jax.lax.top_k(raw, min(MAX_LOGPROBS, raw.shape[-1]))
            top = (top_ids.astype(jnp.int32), top_lp)
        drafts = None
        if method == "mtp":  # the MTP layer over the verified positions (tokens after them: emitted), then drafts
            drafts, new_logq, mtp_cache = drafter.mtp_drafts(mtp_cache, hidden, emitted, index, n, length + n)
            logq = logq.at[slots].set(new_logq)
        return n, emitted, chosen, top, drafts, cache, mtp_cache, logq

    return jax.jit(run, donate_argnums=(1, 2, 3))


@functools.lru_cache(maxsize=64)
def mtp_prefill_program(model, spec: RowSpec, k: int):
    """The engine's prefill step with MTP drafts: (params, cache, mtp_cache, logq, seen, tokens, pages, offset, new,
    slots, sampled, knobs, ahead) -> (first tokens, logprobs, top, cache, seen, drafts, mtp_cache, logq). As the
    plain prefill (engine._step_program) it samples the next token after each row's chunk; then the MTP layer runs
    over the chunk (`ahead` [B, S]: the token after each position, -1 where it is the token just sampled)."""
    def run(params, cache, mtp_cache, logq, seen, tokens, pages, offset, new, slots, sampled, knobs, ahead):
        TRACE_COUNTS["prefill"] += 1
        drafter = Drafter(model, params, pages, k, _draw(knobs, spec))
        index = PagedIndex(pages=pages, offset=offset, new=new)
        logits, hidden, cache = drafter.forward(cache, tokens, index)
        tok, lp, top = sample_rows(logits[:, -1], seen[slots], knobs, spec)
        seen = seen.at[slots, tok].max(sampled)
        ahead = jnp.where(ahead < 0, tok[:, None], ahead)
        seq = tokens.shape[1]
        drafts, new_logq, mtp_cache = drafter.mtp_drafts(mtp_cache, hidden, ahead, index,
                                                         jnp.full(tokens.shape[:1], seq - 1), offset + seq)
        return tok, lp, top, cache, seen, drafts, mtp_cache, logq.at[slots].set(new_logq)

    return jax.jit(run, donate_argnums=(1, 2, 3, 4))
