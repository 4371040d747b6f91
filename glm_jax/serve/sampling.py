"""Per-request sampling for the serving engine: the per-row sampler of its compiled steps (`SamplingParams`,
shared with `generate`, lives in glm_jax/generation.py).

Each row of a decode step belongs to another request with its own settings, so here every knob is a [B] array
and a row with temperature 0 is greedy. The processing order and the filters are `glm_jax.generation`'s
(repetition penalty -> temperature -> top_k -> top_p, the same `apply_repetition_penalty` and the same top-p
rule), so a request gives what `generate` gives with the same settings; only the random stream differs: a
request draws from `fold_in(key(seed), n)` for its n-th token, whatever else runs beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from glm_jax.generation import MAX_LOGPROBS, SamplingParams, apply_repetition_penalty


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """What about a step's rows changes its compiled program: any sampled row, any row with top_k / top_p, any
    repetition penalty, top logprobs wanted. At most 16 programs per shape, each compiled once."""

    sample: bool = False
    filter: bool = False
    penalty: bool = False
    top_logprobs: bool = False

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> "RowSpec":
        sampled = [p for p in params if not p.greedy]
        return cls(sample=bool(sampled), filter=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
                   penalty=any(p.repetition_penalty != 1.0 for p in params),
                   top_logprobs=any(p.logprobs for p in params))


def sample_rows(logits, seen, knobs: dict, spec: RowSpec):
    """Next token of each row from logits [B, V]; `knobs` holds [B] arrays temperature, top_p, top_k,
    repetition_penalty, seed, count (tokens the request has generated) and the scalar vocab_limit. Returns
    (tokens [B], logprob of each [B], (top ids, top logprobs) [B, MAX_LOGPROBS] or None), log-probabilities of the
    model's distribution before any processing, as OpenAI reports them."""
    raw = logits.astype(jnp.float32)
    vocab = raw.shape[-1]
    raw = jnp.where(jnp.arange(vocab) < knobs["vocab_limit"], raw, -jnp.inf)
    logits = apply_repetition_penalty(raw, seen, knobs["repetition_penalty"][:, None]) if spec.penalty else raw
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if spec.sample:
        temperature = knobs["temperature"]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(knobs["seed"], knobs["count"])
        if spec.filter:
            values, ids = jax.lax.top_k(scaled, vocab)  # sorted; each row's own top_k / top_p below
            k = knobs["top_k"][:, None]
            values = jnp.where((k <= 0) | (jnp.arange(vocab)[None] < k), values, -jnp.inf)
            probs = jax.nn.softmax(values, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            keep = (before < knobs["top_p"][:, None]).at[:, 0].set(True)
            values = jnp.where(keep, values, -jnp.inf)
            pick = jax.vmap(jax.random.categorical)(keys, values)
            drawn = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
        else:
            drawn = jax.vmap(jax.random.categorical)(keys, scaled)
        tokens = jnp.where(temperature > 0, drawn.astype(jnp.int32), tokens)
    logp = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top = None
    if spec.top_logprobs:
        top_lp, top_ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, logp.shape[-1]))
        top = (top_ids.astype(jnp.int32), top_lp)
    return tokens, chosen, top


def row_log_probs(logits, knobs: dict, spec: RowSpec):
    """log p of the distribution each row samples from (`sample_rows`' processing: vocabulary limit, repetition
    penalty is not applied, temperature, top_k, top_p), -inf outside it, for logits [B, S, V] and [B] knobs; a
    greedy row (temperature 0) gets the one-hot of its argmax. Speculative decoding's acceptance reads it."""
    b, s, vocab = logits.shape
    raw = jnp.where(jnp.arange(vocab) < knobs["vocab_limit"], logits.astype(jnp.float32), -jnp.inf)
    greedy = jax.nn.one_hot(jnp.argmax(raw, axis=-1), vocab, dtype=jnp.float32)
    if not spec.sample:
        return jnp.log(greedy)
    temperature = knobs["temperature"][:, None, None]
    scaled = raw / jnp.where(temperature > 0, temperature, 1.0)
    if spec.filter:
        flat = scaled.reshape(b * s, vocab)
        values, ids = jax.lax.top_k(flat, vocab)  # sorted; each row's own top_k / top_p, as sample_rows
        k = jnp.repeat(knobs["top_k"], s)[:, None]
        values = jnp.where((k <= 0) | (jnp.arange(vocab)[None] < k), values, -jnp.inf)
        probs = jax.nn.softmax(values, axis=-1)
        keep = ((jnp.cumsum(probs, axis=-1) - probs) < jnp.repeat(knobs["top_p"], s)[:, None]).at[:, 0].set(True)
        values = jnp.where(keep, values, -jnp.inf)
        scaled = jnp.full_like(flat, -jnp.inf).at[jnp.arange(b * s)[:, None], ids].set(values).reshape(b, s, vocab)
    return jnp.where(temperature > 0, jax.nn.log_softmax(scaled, axis=-1), jnp.log(greedy))
