"""Autoregressive generation with a preallocated KV cache: batched, bucketed, streaming, optionally sharded.

    from glm_jax import generate, stream_generate   # or glm_jax.generation.generate
    out = generate(model, params, input_ids, attention_mask, max_new_tokens=64, temperature=0.8, top_p=0.8,
                   stop_ids=(2,))                     # np.int32 [batch, prompt + 64]
    for tokens in stream_generate(model, params, ids, max_new_tokens=64):   # np.int32 [batch] per step
        ...

How it runs
  * `generate` compiles ONE function per shape bucket: it allocates the cache, prefills the (left padded)
    prompt, samples the first token, then runs the decode loop in a `lax.while_loop` that stops after
    `max_new_tokens` tokens or as soon as every row has produced a stop id.
  * Shapes are bucketed so that new prompt lengths do not recompile: the prompt is LEFT padded up to
    `bucket_length(prompt_len)` (powers of two from 16, then multiples of 512) and the number of new tokens is
    bucketed the same way; `max_new_tokens` itself is a runtime value. Compiled functions live in a module-level
    cache keyed by (model, batch, buckets, static sampling options, mesh); `TRACE_COUNTS` counts the traces.
  * Sampling knobs that are plain numbers (temperature, top_p, repetition_penalty, seed, stop ids, pad id) are
    runtime values; only what changes the program is static: greedy or not, top_k (a `lax.top_k` size), whether
    top_p / repetition penalty are active, and the number of stop ids rounded up to a multiple of 4.
  * `stream_generate` prefills with the same kind of compiled function, then runs the same loop body `chunk`
    tokens per call and yields tokens as they arrive. With `conversation=ConversationCache()` it keeps a batch-1
    cache between calls and runs only the prompt tokens after the common prefix (chat turns; see the class).
  * `mesh=`: params are placed with `glm_jax.param_shardings` (tensor parallel over the mesh's "tensor" axis,
    replicated where a dimension does not divide) and the model runs under `glm_jax.sharding.axis_rules()`.

Semantics (those of transformers' `generate`)
  * temperature == 0: greedy (argmax, first index on ties). Otherwise logits are processed in the order
    repetition penalty -> temperature -> top_k -> top_p, then sampled with `jax.random.categorical` from
    `jax.random.key(seed)` (folded with the step number).
  * repetition_penalty (CTRL): for every token already in the row (the real prompt tokens, not pads, and the
    generated ones), a positive logit is divided by the penalty and a negative one multiplied by it.
  * top_p (nucleus): keep the smallest set of most likely tokens whose probability reaches top_p (always at
    least one); top_k: keep the k most likely.
  * Output: `[batch, prompt_len + max_new_tokens]`: the prompt exactly as given, then the new tokens. A row that
    produced a stop id keeps that stop id and is filled with `pad_id` afterwards (default: the model config's
    pad_token_id, else 0) - transformers does the same, but also trims columns once every row has stopped;
    here the shape is fixed, so a trailing block of all-pad columns can remain.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glm_jax import speculative as speculative_lib
from glm_jax.model import cache_specs, param_specs
from glm_jax.sharding import LOGICAL_RULES, logical_sharding, param_shardings, run_sharded

log = logging.getLogger(__name__)

# Number of times each kind of compiled function has been traced ("generate", "prefill", "decode"): lets tests
# (and users) check that bucketing avoids recompiles.
TRACE_COUNTS: collections.Counter = collections.Counter()
_COMPILED: dict[tuple, Any] = {}
_LOCK = threading.Lock()

MIN_BUCKET = 16
LINEAR_BUCKET = 512


def bucket_length(n: int, minimum: int = MIN_BUCKET, linear_from: int = LINEAR_BUCKET) -> int:
    """`n` rounded up to a compile bucket: a power of two >= minimum, then multiples of `linear_from`."""
    if n <= 0:
        raise ValueError(f"bucket_length: expected a positive length, got {n}")
    if n <= linear_from:
        return max(minimum, 1 << (n - 1).bit_length())
    return -(-n // linear_from) * linear_from


def clear_cache():
    """Drops the compiled functions (and the trace counts)."""
    with _LOCK:
        _COMPILED.clear()
        TRACE_COUNTS.clear()


# ----------------------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """What about sampling changes the compiled program (the rest are runtime numbers)."""

    greedy: bool
    top_k: int
    use_top_p: bool
    use_penalty: bool
    num_stop: int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops (the OpenAI fields of the same names).

    temperature 0 is greedy; top_k 0 keeps every token; top_p 1 is off; repetition_penalty 1 is off. seed: the
    request's random stream (None: a fresh seed per request). stop: strings that end the reply (not included in
    the text); stop_token_ids: ids that end it besides the tokenizer's stop ids (ignore_eos drops those).
    max_tokens: the most new tokens (None: up to the model's context). logprobs: also return the log-probability
    of each chosen token and this many top alternatives (0: none, at most 20)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None

    def __post_init__(self):
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_tokens or 1)
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids or ()))
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs: must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_keywords(self, stop_ids=None) -> dict[str, Any]:
        """`generate` / `stream_generate`'s sampling keywords for these settings; `stop_ids` are the caller's
        default stop ids, which `stop_token_ids` extend and `ignore_eos` drops. Stop strings need a tokenizer:
        a ValueError here (the serving engine and ChatSession check them)."""
        if self.stop:
            raise ValueError("stop: stop strings need a tokenizer (glm_jax.Engine, ChatSession); generate stops on "
                             "token ids: use stop_token_ids")
        if self.max_tokens is None:
            raise ValueError("max_tokens: generate needs a number of new tokens")
        if isinstance(stop_ids, int):
            stop_ids = (stop_ids,)
        stops = () if self.ignore_eos or stop_ids is None else tuple(stop_ids)
        stops += tuple(i for i in self.stop_token_ids if i not in stops)
        if not stops and not self.ignore_eos and stop_ids is None:
            stops = None  # the model config's eos ids, as generate's default
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed or 0,
                    stop_ids=stops)


MAX_LOGPROBS = 20


def check_sampling(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, max_new_tokens: int | None = 1) -> None:
    """ValueError ("name: must be ..., got value") for a sampling setting out of range; NaN is out of range."""
    checks = (("max_new_tokens", max_new_tokens, lambda v: v >= 1, "must be >= 1"),
              ("temperature", temperature, lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
              ("top_p", top_p, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
              ("top_k", top_k, lambda v: v >= 0, "must be >= 0 (0 keeps every token)"),
              ("repetition_penalty", repetition_penalty, lambda v: v > 0, "must be > 0 (1 is none)"))
    for name, value, ok, rule in checks:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name}: {rule}, got {value!r}")


def make_spec(*, temperature: float, top_k: int, top_p: float, repetition_penalty: float, num_stop: int,
              vocab_size: int) -> SamplingSpec:
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    greedy = temperature == 0
    top_k = 0 if greedy or top_k >= vocab_size else int(top_k)
    return SamplingSpec(greedy=greedy, top_k=top_k, use_top_p=not greedy and top_p < 1.0,
                        use_penalty=repetition_penalty != 1.0, num_stop=max(4, -(-num_stop // 4) * 4))


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL / transformers penalty over the tokens marked in `seen` [batch, vocab] (bool)."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def top_k_top_p_candidates(logits, top_k: int, top_p, use_top_p: bool):
    """Candidate logits [B, C] (descending, removed ones at -inf) and their token ids [B, C].

    C = top_k when top_k > 0 (a cheap `lax.top_k`), else the whole vocabulary (a full sort, only when top_p is
    active). top_p is applied after top_k, on the renormalized top-k distribution, as transformers does.
    """
    size = top_k if top_k > 0 else logits.shape[-1]
    values, ids = jax.lax.top_k(logits, size)
    if use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly more likely than each candidate
        keep = (before < top_p).at[:, 0].set(True)
        values = jnp.where(keep, values, -jnp.inf)
    return values, ids


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Full-vocabulary logits with everything outside top_k / top_p set to -inf (for inspection and tests)."""
    logits = jnp.asarray(logits, jnp.float32)
    if top_k <= 0 and top_p >= 1.0:
        return logits
    values, ids = top_k_top_p_candidates(logits, top_k, jnp.float32(top_p), top_p < 1.0)
    out = jnp.full_like(logits, -jnp.inf)
    return out.at[jnp.arange(logits.shape[0])[:, None], ids].set(values)


def choose_tokens(logits, seen, rng, spec: SamplingSpec, knobs):
    """Next token per row from last-position logits [B, V]."""
    logits = logits.astype(jnp.float32)
    if "vocab_limit" in knobs:  # ids past the tokenizer's vocabulary (padded embedding rows) are never produced
        logits = jnp.where(jnp.arange(logits.shape[-1]) < knobs["vocab_limit"], logits, -jnp.inf)
    if spec.use_penalty:
        logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
    if spec.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / knobs["temperature"]
    if spec.top_k > 0 or spec.use_top_p:
        values, ids = top_k_top_p_candidates(logits, spec.top_k, knobs["top_p"], spec.use_top_p)
        pick = jax.random.categorical(rng, values, axis=-1)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------- the decode program
def _cache_constraint(cache, mesh, rules):
    """Shards the KV cache like the activations: batch over data/fsdp, KV heads over tensor where they divide."""
    if mesh is None:
        return cache
    names = {5: ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim"),
             4: ("cache_batch", "cache_length", "kv_heads", "head_dim"),
             2: ("cache_batch", "cache_length"), 1: ("cache_batch",), 0: ()}

    # MLA's latent cache [L, B, T, kv_lora + rope] (docs/mla.md) is named, not told apart by its rank
    by_name = {"cached_latent": ("layers", "cache_batch", "cache_length", "cache_latent"),
               "cached_index_key": ("layers", "cache_batch", "cache_length", None),  # DSA, docs/dsa.md
               "cached_index_gate": ("layers", "cache_batch", "cache_length", None),
               # glm5_next's KDA state [L, B, H, D, D] and convolution inputs [L, B, conv - 1, 3, H, D]
               "kda_state": ("layers", "cache_batch", "kda_heads", None, None),
               "kda_conv": ("layers", "cache_batch", None, None, "kda_heads", None)}

    def one(path, x):
        axes = by_name.get(getattr(path[-1], "key", None), names.get(x.ndim))
        if axes is None:
            return x
        return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, axes, x.shape, rules))

    return jax.tree_util.tree_map_with_path(one, cache)


def _is_stop(tokens, stop_ids):
    return (tokens[:, None] == stop_ids[None, :]).any(axis=-1)


def _prefill_state(model, params, ids, mask, knobs, *, cache_shapes, out_len: int, spec: SamplingSpec, mesh, rules):
    """Allocates the cache, runs the prompt, picks the first token. Returns the loop state."""
    cache = _cache_constraint(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes), mesh, rules)
    # The cache is empty: the prompt attends within itself (flash kernels apply), logits of its last token only.
    logits, variables = model.apply({"params": params, "cache": cache}, ids, attention_mask=mask, decode=True,
                                    prefill=True, last_logits_only=True, mutable=["cache"])
    return _first_token_state(logits, variables["cache"], ids, mask, knobs, out_len=out_len, spec=spec, mesh=mesh,
                              rules=rules)


def _extend_state(model, params, cache, ids, mask, knobs, *, out_len: int, spec: SamplingSpec, mesh, rules):
    """Runs `ids` against a cache that already holds earlier tokens of the sequence (a conversation's next turn:
    the write slot and position were set by the caller) and picks the first token. Returns the loop state."""
    logits, variables = model.apply({"params": params, "cache": _cache_constraint(cache, mesh, rules)}, ids,
                                    attention_mask=mask, decode=True, last_logits_only=True, mutable=["cache"])
    return _first_token_state(logits, variables["cache"], ids, mask, knobs, out_len=out_len, spec=spec, mesh=mesh,
                              rules=rules)


def _first_token_state(logits, cache, ids, mask, knobs, *, out_len: int, spec: SamplingSpec, mesh, rules):
    batch = ids.shape[0]
    last = logits[:, -1].astype(jnp.float32)
    vocab = last.shape[-1]
    seen = None
    if spec.use_penalty:
        real = mask.astype(bool) & (ids >= 0) & (ids < vocab)
        seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], jnp.clip(ids, 0, vocab - 1)].max(real)
    rng = knobs["rng"]
    tok = choose_tokens(last, seen, jax.random.fold_in(rng, 0), spec, knobs)
    if seen is not None:
        seen = seen.at[jnp.arange(batch), tok].set(True)
    out = jnp.full((batch, out_len), knobs["pad_id"], jnp.int32).at[:, 0].set(tok)
    return dict(cache=_cache_constraint(cache, mesh, rules), tok=tok, done=_is_stop(tok, knobs["stop_ids"]), out=out,
                i=jnp.int32(1), seen=seen, knobs=knobs)


def _decode_loop(model, params, state, limit, *, spec: SamplingSpec, mesh, rules):
    """Decodes until `state["i"] == limit` or every row is done."""

    def cond(s):
        return (s["i"] < limit) & ~jnp.all(s["done"])

    def body(s):
        knobs = s["knobs"]
        logits, variables = model.apply({"params": params, "cache": s["cache"]}, s["tok"][:, None], decode=True,
                                        mutable=["cache"])
        tok = choose_tokens(logits[:, -1], s["seen"], jax.random.fold_in(knobs["rng"], s["i"]), spec, knobs)
        tok = jnp.where(s["done"], knobs["pad_id"], tok)
        seen = s["seen"]
        if seen is not None:
            seen = seen.at[jnp.arange(tok.shape[0]), tok].set(True)
        out = jax.lax.dynamic_update_slice(s["out"], tok[:, None], (0, s["i"]))
        return dict(s, cache=_cache_constraint(variables["cache"], mesh, rules), tok=tok, seen=seen, out=out,
                    done=s["done"] | _is_stop(tok, knobs["stop_ids"]), i=s["i"] + 1)

    return jax.lax.while_loop(cond, body, state)


def _compiled(kind: str, key: tuple, build):
    with _LOCK:
        fn = _COMPILED.get((kind,) + key)
        if fn is None:
            fn = _COMPILED[(kind,) + key] = build()
        return fn


def _generate_fn(model, batch, prompt_len, out_len, spec, mesh, rules):
    def build():
        shapes = cache_specs(model, batch, prompt_len + out_len)

        def run(params, ids, mask, knobs):
            TRACE_COUNTS["generate"] += 1  # Python side effect: runs once per trace
            state = _prefill_state(model, params, ids, mask, knobs, cache_shapes=shapes, out_len=out_len,
                                   spec=spec, mesh=mesh, rules=rules)
            state = _decode_loop(model, params, state, knobs["max_new"], spec=spec, mesh=mesh, rules=rules)
            return state["out"], state["i"]

        return jax.jit(run)

    return _compiled("generate", (model, batch, prompt_len, out_len, spec, mesh, rules), build)


def _stream_fns(model, batch, prompt_len, out_len, spec, mesh, rules):
    def build_prefill():
        shapes = cache_specs(model, batch, prompt_len + out_len)

        def prefill(params, ids, mask, knobs):
            TRACE_COUNTS["prefill"] += 1
            return _prefill_state(model, params, ids, mask, knobs, cache_shapes=shapes, out_len=out_len,
                                  spec=spec, mesh=mesh, rules=rules)

        return jax.jit(prefill)

    def build_decode():
        def decode(params, state, chunk):
            TRACE_COUNTS["decode"] += 1
            start = state["i"]
            limit = jnp.minimum(start + chunk, state["knobs"]["max_new"])
            state = _decode_loop(model, params, state, limit, spec=spec, mesh=mesh, rules=rules)
            return state

        return jax.jit(decode, donate_argnums=(1,))

    key = (model, batch, prompt_len, out_len, spec, mesh, rules)
    return _compiled("prefill", key, build_prefill), _compiled("decode", key, build_decode)


def _extend_fn(model, chunk_len, cache_len, out_len, spec, mesh, rules):
    def build():
        def extend(params, cache, ids, mask, knobs):
            TRACE_COUNTS["extend"] += 1
            return _extend_state(model, params, cache, ids, mask, knobs, out_len=out_len, spec=spec, mesh=mesh,
                                 rules=rules)

        return jax.jit(extend, donate_argnums=(1,))

    return _compiled("extend", (model, chunk_len, cache_len, out_len, spec, mesh, rules), build)


# ------------------------------------------------------------------------------------------------ conversations
class ConversationCache:
    """The decode cache of one batch-1 conversation, kept between `stream_generate(..., conversation=)` calls.

    A chat turn's prompt is the previous turn's prompt and reply plus the new messages, re-rendered by the chat
    template: the longest common prefix with the tokens the cache holds is reused, and only the rest is run,
    against the cache (the write slot rolls back to the end of the common prefix; slots after it are beyond
    every later query's causal horizon until they are overwritten). The cache grows by buckets when a turn needs
    more slots. Reuse needs the same model, params object and mesh, and no repetition penalty (its seen-token
    set covers the whole prompt); otherwise a call prefills from scratch and the cache starts over.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.model = self.params = self.mesh = self.cache = None
        self.tokens: list[int] = []  # the tokens fed into the cache, in order
        self.slots: list[int] = []  # the cache slot of each
        self.reused = 0  # prompt tokens the last call took from the cache

    def common_prefix(self, model, params, mesh, prompt: list[int]) -> int:
        """Leading prompt tokens the cache holds, at most len(prompt) - 1 (the last one runs for its logits).
        Never for glm5_next (docs/glm5-next.md, "Not yet"): its KDA state cannot roll back, and the next turn's
        tokens, left padded to a bucket, would leave a gap of empty slots that its pooled indexer counts pools
        across."""
        if getattr(model.cfg, "is_glm5_next", False):
            return 0
        if self.cache is None or model is not self.model or params is not self.params or mesh is not self.mesh:
            return 0
        n = 0
        for held, wanted in zip(self.tokens, prompt[:-1]):
            if held != wanted:
                break
            n += 1
        return n

    def record(self, model, params, mesh, cache, tokens: list[int], slots: list[int]) -> None:
        self.model, self.params, self.mesh, self.cache = model, params, mesh, cache
        self.tokens, self.slots = tokens, slots

    def prepare(self, model, reuse: int, needed: int):
        """The kept cache with its write slot after the reused prefix, grown to hold `needed` slots; the slot."""
        index = self.slots[reuse - 1] + 1
        cache = self.cache
        length = cache["model"]["segment_ids"].shape[1]
        if needed > length:
            target = cache_specs(model, 1, bucket_length(needed))
            cache = jax.tree.map(lambda x, t: x if x.shape == t.shape else
                                 jnp.pad(x, [(0, b - a) for a, b in zip(x.shape, t.shape)]), cache, target)
        state = dict(cache["model"], index=jnp.int32(index), position=jnp.full((1,), reuse, jnp.int32))
        return {**cache, "model": state}, index


# ------------------------------------------------------------------------------------------------ host side
def _as_batch(input_ids, attention_mask):
    ids = np.asarray(input_ids)
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] (or [length]) with length > 0, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers, got {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask).astype(np.int32)
        if squeeze and mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1")
        if (np.diff(mask, axis=1) < 0).any():
            raise ValueError("attention_mask: only LEFT padding is supported (each row must be 0...0 1...1)")
        if (mask.sum(axis=1) == 0).any():
            raise ValueError("attention_mask: a row has no tokens")
    return ids.astype(np.int32), mask, squeeze


def _bucket(rule, n: int) -> int:
    if rule is None:
        return bucket_length(n)
    return int(rule(n)) if callable(rule) else int(rule)


def _model_cfg(model):
    return getattr(model, "cfg", None)


@dataclasses.dataclass
class _Prepared:
    params: Any
    ids: jax.Array
    mask: jax.Array
    knobs: dict
    spec: SamplingSpec
    prompt_bucket: int
    out_bucket: int
    orig_ids: np.ndarray
    squeeze: bool
    max_new_tokens: int


@functools.lru_cache(maxsize=16)
def _param_shardings(model, mesh, rules):
    return param_shardings(param_specs(model), mesh, rules)


def shard_params(model, params, mesh, rules=None):
    """`params` placed on `mesh` with the model's logical partitioning (tensor parallel over "tensor")."""
    shardings = _param_shardings(model, mesh, LOGICAL_RULES if rules is None else tuple(rules))
    try:
        return jax.device_put(params, shardings)
    except ValueError as e:
        raise ValueError(f"params do not match {type(model).__name__}'s parameter tree: {e}") from None


def _placed(mesh, *trees):
    """The trees as device arrays, replicated over `mesh` when there is one."""
    if mesh is None:
        return [jax.tree.map(jnp.asarray, t) for t in trees]
    return [jax.device_put(t, NamedSharding(mesh, P())) for t in trees]


def _sampling_keywords(sampling: SamplingParams | None, loose: dict[str, Any]) -> dict[str, Any]:
    """The sampling keywords of a generate call: `sampling`'s when given (whole), else the loose ones."""
    return loose if sampling is None else sampling.generate_keywords(loose["stop_ids"])


def _prepare(model, params, input_ids, attention_mask, *, max_new_tokens, temperature, top_k, top_p,
             repetition_penalty, stop_ids, pad_id, seed, mesh, rules, prompt_bucket, new_bucket,
             vocab_limit=None) -> _Prepared:
    ids, mask, squeeze = _as_batch(input_ids, attention_mask)
    cfg = _model_cfg(model)
    check_sampling(max_new_tokens=max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    vocab = cfg.vocab_size if cfg is not None else None
    if vocab is not None and ((ids < 0) | (ids >= vocab))[mask.astype(bool)].any():
        raise ValueError(f"input_ids: token ids must be in [0, {vocab})")
    if stop_ids is None:
        stop_ids = tuple(cfg.eos_token_ids) if cfg is not None else ()
    elif isinstance(stop_ids, (int, np.integer)):
        stop_ids = (int(stop_ids),)
    stop_ids = tuple(int(s) for s in stop_ids)
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg is not None and cfg.pad_token_id is not None else 0
    spec = make_spec(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                     num_stop=len(stop_ids), vocab_size=vocab or 1 << 62)

    batch, length = ids.shape
    pb, nb = _bucket(prompt_bucket, length), _bucket(new_bucket, max_new_tokens)
    if pb < length or nb < max_new_tokens:
        raise ValueError(f"bucket too small: prompt {length} -> {pb}, new tokens {max_new_tokens} -> {nb}")
    if cfg is not None and length + max_new_tokens > cfg.max_seq_len:
        log.warning("prompt (%d) + max_new_tokens (%d) exceeds the model's max_seq_len %d", length, max_new_tokens,
                    cfg.max_seq_len)
    extra = pb - length  # extra LEFT padding up to the bucket
    ids_b = np.concatenate([np.full((batch, extra), pad_id, np.int32), np.where(mask == 1, ids, pad_id)], axis=1)
    mask_b = np.concatenate([np.zeros((batch, extra), np.int32), mask], axis=1)

    stops = np.full((spec.num_stop,), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    knobs = dict(temperature=np.float32(temperature if temperature > 0 else 1.0), top_p=np.float32(top_p),
                 repetition_penalty=np.float32(repetition_penalty), stop_ids=stops, pad_id=np.int32(pad_id),
                 max_new=np.int32(max_new_tokens), rng=jax.random.key(int(seed)),
                 vocab_limit=np.int32(min(vocab_limit or np.iinfo(np.int32).max, np.iinfo(np.int32).max)))
    if mesh is not None:
        params = shard_params(model, params, mesh, rules)
        knobs = _placed(mesh, knobs)[0]
    ids_j, mask_j = _placed(mesh, ids_b, mask_b)
    return _Prepared(params, ids_j, mask_j, knobs, spec, pb, nb, ids, squeeze, max_new_tokens)


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop_ids: Sequence[int] | int | None = None, pad_id: int | None = None, seed: int = 0, mesh=None,
             rules=None, prompt_bucket=None, new_bucket=None, vocab_limit: int | None = None,
             return_num_steps: bool = False, sampling: SamplingParams | None = None, speculative: str | None = None,
             num_speculative_tokens: int | None = None):
    """Generates up to `max_new_tokens` tokens after each (left padded) prompt row.

    `speculative`: "mtp" (the model's MTP layer drafts) or "ngram" (prompt lookup) with `num_speculative_tokens`
    drafts per verify step (glm_jax.speculative, docs/speculative.md): greedy output is identical, sampled output
    has the same distribution; `return_num_steps` then counts verify steps (the most of any row).

    `sampling`: a `SamplingParams` passed whole, in place of max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, seed and stop_ids (its stop_token_ids extend `stop_ids`; `SamplingParams.generate_keywords`).

    input_ids [batch, len] (or [len]); attention_mask likewise, 1 = token, 0 = LEFT pad. stop_ids default to the
    model config's eos_token_ids (pass () for none); pad_id defaults to its pad_token_id (else 0).
    prompt_bucket / new_bucket: an int or a function of the length (default `bucket_length`).
    vocab_limit: only ids below it are generated (a tokenizer smaller than the model's padded vocabulary).
    Returns np.int32 [batch, len + max_new_tokens] (or [len + max_new_tokens] for a 1-D prompt); with
    `return_num_steps`, also the number of decode positions actually run (< max_new_tokens if all rows stopped).
    See the module docstring for sampling and padding semantics.
    """
    rules = LOGICAL_RULES if rules is None else tuple(rules)
    loose = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed, stop_ids=stop_ids)
    if speculative is not None:
        res = speculative_lib.generate_speculative(
            model, params, input_ids, attention_mask, speculative=speculative,
            num_speculative_tokens=num_speculative_tokens, pad_id=pad_id, mesh=mesh, rules=rules,
            prompt_bucket=prompt_bucket, new_bucket=new_bucket, vocab_limit=vocab_limit, sampling=sampling, **loose)
        return (res.tokens, int(np.max(res.verify_steps))) if return_num_steps else res.tokens
    prep = _prepare(model, params, input_ids, attention_mask, pad_id=pad_id, mesh=mesh, rules=rules,
                    prompt_bucket=prompt_bucket, new_bucket=new_bucket, vocab_limit=vocab_limit,
                    **_sampling_keywords(sampling, loose))
    max_new_tokens = prep.max_new_tokens
    fn = _generate_fn(model, prep.ids.shape[0], prep.prompt_bucket, prep.out_bucket, prep.spec, mesh, rules)
    out, steps = run_sharded(mesh, rules, fn, prep.params, prep.ids, prep.mask, prep.knobs)
    new = np.asarray(jax.device_get(out))[:, :max_new_tokens]
    result = np.concatenate([prep.orig_ids, new], axis=1)
    if prep.squeeze:
        result = result[0]
    return (result, int(steps)) if return_num_steps else result


def stream_generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    stop_ids: Sequence[int] | int | None = None, pad_id: int | None = None, seed: int = 0,
                    mesh=None, rules=None, chunk: int = 1, prompt_bucket=None, new_bucket=None,
                    vocab_limit: int | None = None, conversation: ConversationCache | None = None,
                    sampling: SamplingParams | None = None, speculative: str | None = None,
                    num_speculative_tokens: int | None = None) -> Iterator:
    """Like `generate`, but yields the new tokens as they are produced: np.int32 [batch] per step (an int for a
    1-D prompt). Rows that stopped yield `pad_id`; iteration ends after `max_new_tokens` steps or when every row
    has produced a stop id (the stop id itself is yielded). `chunk` tokens are decoded per device call; with
    the same seed, the tokens equal `generate`'s whatever the chunk size. `conversation`: a `ConversationCache`
    that keeps the cache for the next call of a batch-1 conversation, which then runs only the new tokens.
    `sampling`: a `SamplingParams` passed whole, as for `generate`. `speculative` / `num_speculative_tokens`: as
    for `generate` (the same tokens); `chunk` then counts verify steps per call, and a column is yielded once
    every unfinished row has it. The cache is then not kept between calls (`conversation` is cleared).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rules = LOGICAL_RULES if rules is None else tuple(rules)
    loose = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed, stop_ids=stop_ids)
    prep = _prepare(model, params, input_ids, attention_mask, pad_id=pad_id, mesh=mesh, rules=rules,
                    prompt_bucket=prompt_bucket, new_bucket=new_bucket, vocab_limit=vocab_limit,
                    **_sampling_keywords(sampling, loose))
    max_new_tokens = prep.max_new_tokens
    if speculative is not None:
        if conversation is not None:
            conversation.clear()
        yield from speculative_lib.stream_speculative(model, prep, speculative, num_speculative_tokens,
                                                      chunk=chunk, mesh=mesh, rules=rules)
        return
    prompt = prep.orig_ids[0].tolist()
    if conversation is not None and (prep.ids.shape[0] != 1 or prep.spec.use_penalty
                                     or not np.asarray(prep.mask)[0, -len(prompt):].all()):
        conversation.clear()  # reuse covers batch-1 conversations without padding or penalty
        conversation = None
    reuse = conversation.common_prefix(model, params, mesh, prompt) if conversation is not None else 0
    if reuse:
        state, slots, cache_len = _extend_conversation(model, prep, conversation, prompt, reuse, mesh, rules)
        prefill_len = cache_len - prep.out_bucket  # the decode step's compile key; its shapes come from the state
    else:
        prefill_len = prep.prompt_bucket
        slots = list(range(prep.prompt_bucket - len(prompt), prep.prompt_bucket))
    prefill, decode = _stream_fns(model, prep.ids.shape[0], prefill_len, prep.out_bucket, prep.spec, mesh, rules)
    if not reuse:
        state = run_sharded(mesh, rules, prefill, prep.params, prep.ids, prep.mask, prep.knobs)
    if conversation is not None:
        conversation.reused = reuse
    yield from _stream_tokens(model, params, prep, state, decode, np.int32(chunk), max_new_tokens, mesh, rules,
                              conversation, prompt, slots)


def _extend_conversation(model, prep, conversation, prompt, reuse, mesh, rules):
    """Runs the prompt after its first `reuse` tokens against the conversation's cache (left padded to a bucket).
    Returns the loop state, the prompt tokens' slots and the cache length."""
    rest = prompt[reuse:]
    chunk_len = bucket_length(len(rest))
    cache, index = conversation.prepare(model, reuse, needed=conversation.slots[reuse - 1] + 1 + chunk_len
                                        + prep.out_bucket)
    conversation.cache = None  # donated below: if the call fails, the next one starts over
    ids = np.full((1, chunk_len), prep.knobs["pad_id"], np.int32)
    mask = np.zeros((1, chunk_len), np.int32)
    ids[0, chunk_len - len(rest):], mask[0, chunk_len - len(rest):] = rest, 1
    cache_len = cache["model"]["segment_ids"].shape[1]
    extend = _extend_fn(model, chunk_len, cache_len, prep.out_bucket, prep.spec, mesh, rules)
    state = run_sharded(mesh, rules, extend, prep.params, cache, *_placed(mesh, ids, mask), prep.knobs)
    slots = conversation.slots[:reuse] + list(range(index + chunk_len - len(rest), index + chunk_len))
    return state, slots, cache_len


def _stream_tokens(model, params, prep, state, decode, chunk, max_new_tokens, mesh, rules, conversation, prompt,
                   slots):
    """stream_generate's loop: yields each new column, decodes `chunk` more per call; keeps `conversation`."""
    produced = 0
    while True:
        i = int(state["i"])
        done = bool(np.all(jax.device_get(state["done"])))
        # out is [batch, bucket] int32: small; fetching it whole avoids a slice compile per step.
        out = np.asarray(jax.device_get(state["out"]))
        if conversation is not None:  # fed so far: the prompt and every new token but the last sampled one
            start = slots[-1] + 1
            conversation.record(model, params, mesh, state["cache"], prompt + out[0, :i - 1].tolist(),
                                slots + list(range(start, start + i - 1)))
        for j in range(produced, i):
            yield int(out[0, j]) if prep.squeeze else out[:, j].copy()
        produced = i
        if done or produced >= max_new_tokens:
            return
        state = run_sharded(mesh, rules, decode, prep.params, state, chunk)
