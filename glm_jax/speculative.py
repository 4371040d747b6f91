"""Speculative decoding: cheap drafts of the next k tokens, verified by ONE forward pass of the model over k + 1
positions (docs/speculative.md).

    out = generate(model, params, ids, mask, max_new_tokens=64, speculative="mtp", num_speculative_tokens=1)
    res = generate_speculative(model, params, ids, mask, speculative="ngram", num_speculative_tokens=3)
    res.tokens, res.accept_length                     # tokens as generate's; emitted tokens per verify step per row

Drafts
  * "mtp": the checkpoint's multi-token-prediction layer (`MTPHead`), applied k times in a chain: the first step
    reads the model's final hidden state at the last accepted position and the token after it, each further step
    its own previous output and draft (vLLM's and SGLang's scheme for GLM-4.5+). It has its own paged KV cache.
  * "ngram" (prompt lookup, any model): the k tokens that followed the latest earlier occurrence of the context's
    last NGRAM_MAX .. NGRAM_MIN tokens (the longest n-gram that occurs).

Verification (one compiled step per shape, in a `lax.while_loop`): the model runs [last token, d_1 .. d_k] at
their positions. Greedy: drafts are accepted while they equal the model's argmax, then the model's own token
follows, so the output is exactly greedy decoding's. Sampling: draft d_i is accepted with probability
min(1, p(d_i) / q(d_i)); at the first rejection a token is drawn from normalise(max(p - q, 0)), after k acceptances
from p (Leviathan et al. 2023, Chen et al. 2023): every token is distributed as p, the model's processed
distribution (temperature, top_k, top_p). q is the MTP layer's processed distribution, or one-hot for n-gram drafts.

The cache is paged (layers/kv_cache.py) with a fixed page table per row, so that every row keeps its own length:
a row that accepted n of k drafts continues at its own position, and the keys written for rejected drafts lie
past its length, masked until they are overwritten (the roll-back costs nothing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import generation as G
from glm_jax.model import MTPHead, PagedIndex, init_paged_cache, init_paged_mtp_cache, output_head
from glm_jax.sharding import LOGICAL_RULES, run_sharded

METHODS = ("mtp", "ngram")
DEFAULT_TOKENS = {"mtp": 1, "ngram": 3}  # vLLM's GLM-4.5 recipe runs one MTP token; prompt lookup drafts more
NGRAM_MAX, NGRAM_MIN = 3, 1
PAGE_SIZE = 16


@dataclasses.dataclass
class SpeculativeResult:
    """`tokens`: as `generate` returns them. Per row: `verify_steps` (forward passes after the prefill),
    `emitted` (tokens those produced) and `accept_length` = emitted / verify_steps (1 .. k + 1)."""

    tokens: np.ndarray
    verify_steps: np.ndarray
    emitted: np.ndarray

    @property
    def accept_length(self) -> np.ndarray:
        return self.emitted / np.maximum(self.verify_steps, 1)


def check(model, method: str, num_tokens: int | None, *, penalty: bool = False) -> int:
    """ValueError naming the problem for a speculative setting this model cannot run (`penalty`: a repetition
    penalty is asked for); else k."""
    if method not in METHODS:
        raise ValueError(f"speculative: must be one of {', '.join(METHODS)}, got {method!r}")
    k = DEFAULT_TOKENS[method] if num_tokens is None else num_tokens
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 16:
        raise ValueError(f"num_speculative_tokens: must be in [1, 16], got {num_tokens!r}")
    if getattr(model.cfg, "is_glm5_next", False):
        raise ValueError("speculative: not implemented for glm5_next (a verify step would have to roll its KDA "
                         "layers' recurrent state back to the last accepted draft)")
    if method == "mtp" and not model.cfg.num_mtp_layers:
        raise ValueError("speculative: 'mtp' needs a model with MTP layers (config num_nextn_predict_layers > 0); "
                         "'ngram' works for every model")
    if penalty:
        raise ValueError("repetition_penalty: speculative decoding keeps the model's distribution only without a "
                         "repetition penalty (it depends on the drafts being accepted)")
    return int(k)


# ------------------------------------------------------------------------------------------------- distributions
def limit_vocab(logits, knobs):
    """Logits in float32 with the ids past knobs["vocab_limit"] (padded embedding rows) at -inf."""
    logits = logits.astype(jnp.float32)
    return jnp.where(jnp.arange(logits.shape[-1]) < knobs["vocab_limit"], logits, -jnp.inf)


def processed_log_probs(logits, spec: G.SamplingSpec, knobs):
    """log p of the distribution sampling draws from (vocab limit, temperature, top_k, top_p), -inf outside it;
    logits [..., V]."""
    logits = limit_vocab(logits, knobs) / knobs["temperature"]
    if spec.top_k > 0 or spec.use_top_p:
        flat = logits.reshape(-1, logits.shape[-1])
        values, ids = G.top_k_top_p_candidates(flat, spec.top_k, knobs["top_p"], spec.use_top_p)
        flat = jnp.full_like(flat, -jnp.inf).at[jnp.arange(flat.shape[0])[:, None], ids].set(values)
        logits = flat.reshape(logits.shape)
    return jax.nn.log_softmax(logits, axis=-1)


def accept_greedy(drafts, logits, knobs):
    """(accepted count n [B], emitted [B, k+1]): drafts kept while they equal the argmax; emitted[:n+1] are the
    tokens to append (the accepted drafts are the argmax too, then the model's own token)."""
    targets = jnp.argmax(limit_vocab(logits, knobs), axis=-1).astype(jnp.int32)
    n = jnp.sum(jnp.cumprod(drafts == targets[:, :-1], axis=1), axis=1)
    return n, targets


def accept_sampled(drafts, draft_logq, target_logp, keys):
    """Speculative sampling. drafts [B, k]; draft_logq [B, k, V] (None: n-gram drafts, q one-hot); target_logp
    [B, k+1, V]; keys [B]: each row's random key. Returns (n [B], emitted [B, k+1]): emitted[:n] = the accepted
    drafts, emitted[n] the corrected (or, after k acceptances, the extra) token. With one-hot p and q (greedy rows
    and greedy drafts) this is exactly greedy acceptance."""
    b, k = drafts.shape
    accept_keys, final_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    p = jnp.exp(target_logp)
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype) if draft_logq is None else jnp.exp(draft_logq)
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(accept_keys) * q_draft < p_draft
    n = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)
    rows = jnp.arange(b)
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # after k acceptances: draw from p itself
    residual = jnp.maximum(p[rows, n] - q_pad[rows, n], 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p[rows, n])  # p == q: any draw of p
    final = jax.vmap(jax.random.categorical)(final_keys, jnp.log(residual)).astype(jnp.int32)
    emitted = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    return n, emitted.at[rows, n].set(final)


# ------------------------------------------------------------------------------------------------- drafts
def ngram_drafts(context, length, k: int):
    """[B, k] drafts from `context` [B, T] (tokens by position, `length` [B] of them): the tokens after the latest
    earlier occurrence of the longest suffix n-gram (NGRAM_MAX .. NGRAM_MIN) found; none found: the last token."""
    b, t = context.shape
    pos = jnp.arange(t)
    start = jnp.full((b,), -1, jnp.int32)
    for n in range(NGRAM_MIN, NGRAM_MAX + 1):  # a longer match overrides a shorter one
        suffix = jnp.take_along_axis(context, jnp.clip(length[:, None] - n + jnp.arange(n)[None], 0, t - 1), axis=1)
        match = jnp.ones((b, t), bool)
        for i in range(n):  # an occurrence at j: context[j + i] == suffix[i], followed by a known token
            match &= jnp.roll(context, -i, axis=1) == suffix[:, i:i + 1]
        match &= (pos[None] + n < length[:, None]) & (length[:, None] >= n + 1)
        latest = jnp.max(jnp.where(match, pos[None], -1), axis=1)
        start = jnp.where(latest >= 0, latest + n, start)
    idx = jnp.where(start[:, None] >= 0, start[:, None] + jnp.arange(k)[None], length[:, None] - 1)
    return jnp.take_along_axis(context, jnp.clip(idx, 0, jnp.maximum(length[:, None] - 1, 0)), axis=1)


class Drafter:
    """The model calls of a speculative program over a paged cache with page tables `pages`: the verify / prefill
    forward and the MTP layer's drafts. `draw(logits [B, V], j) -> (tokens [B], log q [B, V] or None)` picks draft
    j from the MTP layer's logits (greedy or sampled, as the caller's rows are). Used by `generate` here and by the
    serving engine."""

    def __init__(self, model, params, pages, k: int, draw=None):
        self.model, self.params, self.pages, self.k, self.draw = model, params, pages, k, draw
        cfg = model.cfg
        if cfg.num_mtp_layers:  # drafts come from the first MTP layer (GLM checkpoints have one)
            self.mtp = MTPHead(cfg.replace(num_mtp_layers=1))
            model_params = dict(params["model"], mtp=jax.tree.map(lambda x: x[:1], params["model"]["mtp"]))
            self.mtp_params = {"model": model_params, "lm_head": params["lm_head"]}

    def index(self, offset, seq: int, new=None):
        return PagedIndex(pages=self.pages, offset=offset, new=jnp.full_like(offset, seq) if new is None else new)

    def forward(self, pool, tokens, index):
        """(logits [B, S, V], final hidden states, pool) of the model over `tokens` at `index`."""
        hidden, out = self.model.apply({"params": self.params, "cache": pool}, tokens, paged=index,
                                       return_hidden=True, mutable=["cache"])
        return output_head(self.model.cfg).apply({"params": self.params["lm_head"]}, hidden), hidden, out["cache"]

    def mtp_step(self, mtp_pool, hidden, tokens, index):
        logits, hidden, mtp_pool = self.mtp.apply({"params": self.mtp_params}, hidden, tokens, paged=index,
                                                  kv_cache=mtp_pool)
        return logits[0], hidden, mtp_pool

    def mtp_drafts(self, mtp_pool, hidden, ahead, index, pick, pos):
        """The MTP layer over the positions of `index` (main hidden states and the tokens after them: its cache),
        then a chain of k - 1 steps from row position `pick` (whose next token sits at position `pos` [B]).
        Returns drafts [B, k], their log q [B, k, V] (None when `draw` gives none) and the MTP pool."""
        logits, h, mtp_pool = self.mtp_step(mtp_pool, hidden, ahead, index)
        rows = jnp.arange(pick.shape[0])
        drafts, logqs = [], []
        logits, h = logits[rows, pick], h[rows, pick][:, None]
        for j in range(self.k):
            if j:  # the MTP at position pos + j - 1 reads its own last output and the previous draft
                logits, h, mtp_pool = self.mtp_step(mtp_pool, h, drafts[-1][:, None], self.index(pos + j - 1, 1))
                logits = logits[:, 0]
            tok, logq = self.draw(logits, j)
            drafts.append(tok)
            logqs.append(logq)
        return jnp.stack(drafts, 1), None if logqs[0] is None else jnp.stack(logqs, 1), mtp_pool


def _draw_fn(spec: G.SamplingSpec, knobs, rng):
    """`generate`'s draft picker: the argmax (greedy), else a draw from the processed distribution."""
    def draw(logits, j):
        if spec.greedy:
            return jnp.argmax(limit_vocab(logits, knobs), axis=-1).astype(jnp.int32), None
        logq = processed_log_probs(logits, spec, knobs)
        return jax.random.categorical(jax.random.fold_in(rng, j), logq, axis=-1).astype(jnp.int32), logq

    return draw


def _speculative_fns(model, batch: int, prompt_len: int, out_len: int, spec, method: str, k: int, mesh, rules):
    """(prefill, loop): prefill(params, ids, mask, knobs) -> the loop state after the prompt and the first token;
    loop(params, state, knobs, steps) -> the state after up to `steps` more verify steps (or all rows done)."""
    cfg = model.cfg
    pages_per_row = math.ceil((prompt_len + out_len + k + 1) / PAGE_SIZE)
    num_pages = batch * pages_per_row + 1  # page 0: the null page padding writes into
    ctx_len = prompt_len + out_len + k

    def runner(params, knobs, rng):
        pages = 1 + jnp.arange(batch * pages_per_row, dtype=jnp.int32).reshape(batch, pages_per_row)
        return Drafter(model, params, pages, k, _draw_fn(spec, knobs, rng))

    def prefill(params, ids, mask, knobs):
        G.TRACE_COUNTS["speculative"] += 1
        r = runner(params, knobs, jax.random.fold_in(knobs["rng"], 1))
        rows = jnp.arange(batch)
        length = jnp.sum(mask, axis=1).astype(jnp.int32)
        index = r.index(length - prompt_len, prompt_len, new=length)  # the left padded prompt at 0 .. length - 1
        logits, hidden, pool = r.forward(init_paged_cache(cfg, num_pages, PAGE_SIZE), ids, index)
        first = G.choose_tokens(logits[:, -1], None, jax.random.fold_in(knobs["rng"], 0), spec, knobs)
        # context by position (n-gram drafts): the prompt moved to the left, then the generated tokens
        shift = (jnp.arange(prompt_len)[None] + (prompt_len - length)[:, None]) % prompt_len
        context = jnp.zeros((batch, ctx_len), jnp.int32).at[:, :prompt_len].set(
            jnp.take_along_axis(ids, shift, axis=1)).at[rows, length].set(first)
        state = dict(pool=pool, tok=first, pos=length, context=context, count=jnp.ones((batch,), jnp.int32),
                     done=G._is_stop(first, knobs["stop_ids"]) | (knobs["max_new"] <= 1),
                     out=jnp.full((batch, out_len), knobs["pad_id"], jnp.int32).at[:, 0].set(first),
                     steps=jnp.zeros((batch,), jnp.int32), emitted=jnp.zeros((batch,), jnp.int32),
                     i=jnp.int32(1), logq=None)
        if method == "mtp":
            ahead = jnp.concatenate([ids[:, 1:], first[:, None]], axis=1)
            state["drafts"], state["logq"], state["mtp_pool"] = r.mtp_drafts(
                init_paged_mtp_cache(cfg, num_pages, PAGE_SIZE), hidden, ahead, index,
                jnp.full((batch,), prompt_len - 1), length)
        else:
            state["drafts"] = ngram_drafts(context, length + 1, k)
        return state

    def loop(params, state, knobs, steps):
        G.TRACE_COUNTS["speculative"] += 1
        limit = state["i"] + steps

        def step(s):
            rng = jax.random.fold_in(knobs["rng"], 2 + s["i"])
            return _verify(runner(params, knobs, jax.random.fold_in(rng, 1)), s, method, spec, knobs, rng)

        return jax.lax.while_loop(lambda s: ~jnp.all(s["done"]) & (s["i"] < limit), step, state)

    key = (model, batch, prompt_len, out_len, spec, method, k, mesh, rules)
    return (G._compiled("speculative_prefill", key, lambda: jax.jit(prefill)),
            G._compiled("speculative_loop", key, lambda: jax.jit(loop, donate_argnums=(1,))))


def _verify(r: Drafter, s: dict, method: str, spec: G.SamplingSpec, knobs, rng) -> dict:
    """One verify step: the model over [token, drafts], the accepted tokens appended, the next drafts."""
    k = r.k
    batch = s["tok"].shape[0]
    rows, cols = jnp.arange(batch), jnp.arange(k + 1)
    verify = r.index(s["pos"], k + 1)
    logits, hidden, pool = r.forward(s["pool"], jnp.concatenate([s["tok"][:, None], s["drafts"]], axis=1), verify)
    if spec.greedy:
        n, emitted = accept_greedy(s["drafts"], logits, knobs)
    else:
        n, emitted = accept_sampled(s["drafts"], s["logq"], processed_log_probs(logits, spec, knobs),
                                    jax.random.split(jax.random.fold_in(rng, 0), batch))
    # what each row keeps: n + 1 tokens, fewer at a stop id or at max_new; nothing once done
    stop = G._is_stop(emitted.reshape(-1), knobs["stop_ids"]).reshape(batch, k + 1) & (cols[None] <= n[:, None])
    first_stop = jnp.argmax(stop, axis=1)
    take = jnp.minimum(jnp.where(stop.any(1), first_stop + 1, n + 1), knobs["max_new"] - s["count"])
    take = jnp.where(s["done"], 0, take)
    keep = cols[None] < take[:, None]
    out_cols = jnp.where(keep, s["count"][:, None] + cols[None], s["out"].shape[1])
    ctx_cols = jnp.where(keep, s["pos"][:, None] + 1 + cols[None], s["context"].shape[1])
    count = s["count"] + take
    active = ~s["done"]
    new = dict(s, pool=pool, out=s["out"].at[rows[:, None], out_cols].set(emitted, mode="drop"),
               context=s["context"].at[rows[:, None], ctx_cols].set(emitted, mode="drop"), count=count,
               done=s["done"] | stop.any(1) | (count >= knobs["max_new"]),
               tok=jnp.where(active, emitted[rows, n], s["tok"]), pos=jnp.where(active, s["pos"] + n + 1, s["pos"]),
               steps=s["steps"] + active, emitted=s["emitted"] + take, i=s["i"] + 1)
    if method == "mtp":  # the MTP layer over the verified positions (the tokens after them: emitted), then drafts
        new["drafts"], new["logq"], new["mtp_pool"] = r.mtp_drafts(s["mtp_pool"], hidden, emitted, verify, n,
                                                                   new["pos"])
    else:
        new["drafts"] = ngram_drafts(new["context"], new["pos"] + 1, k)
    return new


def generate_speculative(model, params, input_ids, attention_mask=None, *, speculative: str = "mtp",
                         num_speculative_tokens: int | None = None, max_new_tokens: int = 32,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         repetition_penalty: float = 1.0, stop_ids=None,
                         pad_id: int | None = None, seed: int = 0, mesh=None, rules=None, prompt_bucket=None,
                         new_bucket=None, vocab_limit: int | None = None,
                         sampling: G.SamplingParams | None = None) -> SpeculativeResult:
    """`generate` with speculative decoding (module docstring): the same arguments and output tokens (greedy:
    identical to `generate`'s; sampled: distributed like them), plus per-row verify steps and accept lengths.
    `num_speculative_tokens`: drafts per step, default 1 for "mtp" and 3 for "ngram"."""
    rules = LOGICAL_RULES if rules is None else tuple(rules)
    loose = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed, stop_ids=stop_ids)
    prep = G._prepare(model, params, input_ids, attention_mask, pad_id=pad_id, mesh=mesh, rules=rules,
                      prompt_bucket=prompt_bucket, new_bucket=new_bucket, vocab_limit=vocab_limit,
                      **G._sampling_keywords(sampling, loose))
    prefill, loop = _prepared_fns(model, prep, speculative, num_speculative_tokens, mesh, rules)
    state = run_sharded(mesh, rules, prefill, prep.params, prep.ids, prep.mask, prep.knobs)
    state = run_sharded(mesh, rules, loop, prep.params, state, prep.knobs, np.int32(prep.out_bucket))
    new = np.asarray(jax.device_get(state["out"]))[:, :prep.max_new_tokens]
    tokens = np.concatenate([prep.orig_ids, new], axis=1)
    steps, emitted = np.asarray(state["steps"]), np.asarray(state["emitted"])
    if prep.squeeze:
        tokens, steps, emitted = tokens[0], steps[0], emitted[0]
    return SpeculativeResult(tokens, steps, emitted)


def _prepared_fns(model, prep, method, num_tokens, mesh, rules):
    k = check(model, method, num_tokens, penalty=prep.spec.use_penalty)
    return _speculative_fns(model, prep.ids.shape[0], prep.prompt_bucket, prep.out_bucket, prep.spec, method, k,
                            mesh, rules)


def stream_speculative(model, prep, method: str, num_tokens: int | None, *, chunk: int = 1, mesh=None,
                       rules=LOGICAL_RULES) -> Iterator:
    """`stream_generate`'s loop with speculative decoding (`prep`: its prepared inputs): `chunk` verify steps per
    device call; yields each token column ([batch], an int for a 1-D prompt) once every row has it (a finished
    row's columns are `pad_id`)."""
    prefill, loop = _prepared_fns(model, prep, method, num_tokens, mesh, rules)
    state = run_sharded(mesh, rules, prefill, prep.params, prep.ids, prep.mask, prep.knobs)
    produced = 0
    while True:
        count, done, out = jax.device_get((state["count"], state["done"], state["out"]))
        # a column is out once every unfinished row has it; all finished: up to the last row's stop
        ready = int(np.max(count) if done.all() else np.min(np.where(done, prep.max_new_tokens, count)))
        for j in range(produced, min(ready, prep.max_new_tokens)):
            yield int(out[0, j]) if prep.squeeze else np.asarray(out[:, j]).copy()
        produced = max(produced, ready)
        if done.all() or produced >= prep.max_new_tokens:
            return
        state = run_sharded(mesh, rules, loop, prep.params, state, prep.knobs, np.int32(chunk))
