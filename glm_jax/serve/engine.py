"""The serving engine: continuous batching over a paged KV cache with prefix caching (docs/serving.md).

    engine = Engine(model, params, tokenizer, max_num_seqs=16, page_size=16)
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():            # RequestOutput: the new tokens of every request that advanced
            ...
    outs = engine.generate([ids_a, ids_b], SamplingParams(max_tokens=32))   # offline: a list in, a list out

One `step()`: admit waiting requests into free decode slots (reusing cached pages of their prefix), run one
prefill chunk for up to `max_prefill_rows` requests that still have prompt tokens to compute (the last chunk
samples the first token), then one decode step for every slot whose request is generating. Both are compiled
programs whose shapes are powers of two (the rows: the generating requests packed, or the prefilling ones; the
chunk: the longest row's tokens; the page tables: the longest row's pages), so that a step computes what its rows
hold rather than every slot at max_model_len, and requests come and go without recompiling: a bounded set of
programs, each compiled once. When a request
needs a page and none is left, the latest-arrived running request that came after it is preempted (first come,
first served: the oldest request always advances, so everything finishes), or, if none did, the request itself
waits: its pages are released (full ones stay cached) and it goes back to the queue in arrival order, to be
recomputed from its prompt and the tokens it already produced.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import random
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_jax import speculative as speculative_lib
from glm_jax.generation import shard_params
from glm_jax.model import PagedIndex, init_paged_cache, init_paged_mtp_cache
from glm_jax.model.glm import prompt_context
from glm_jax.serve import drafts as drafts_lib
from glm_jax.serve.pages import PagePool, page_keys
from glm_jax.serve.sampling import RowSpec, SamplingParams, sample_rows
from glm_jax.sharding import LOGICAL_RULES, logical_sharding, run_sharded

log = logging.getLogger(__name__)
TRACE_COUNTS: collections.Counter = collections.Counter()  # "prefill" / "decode" traces: tests count recompiles


class QueueFull(RuntimeError):
    """The waiting queue is at `max_waiting` (a server answers 429)."""


@dataclasses.dataclass
class RequestOutput:
    """What `step()` reports for a request that advanced: its new tokens (and their logprobs when asked), all
    its tokens so far, and, once finished, why ("stop": a stop id or string, "length": max_tokens or the
    context, "abort")."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[dict] | None = None  # per token of token_ids: {"logprob", "top": [(id, logprob), ...]}
    num_cached_tokens: int = 0
    stop_text: str | None = None  # the stop string that ended it
    accept_length: float | None = None  # speculative decoding: its tokens per verify step so far (1 .. k+1)


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    sampling: SamplingParams
    seed: int
    max_tokens: int
    stop_ids: frozenset
    order: int  # arrival order: an earlier request is never preempted for a later one
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix keys of its registered full pages
    computed: int = 0  # tokens whose keys / values are in its pages
    slot: int | None = None
    status: str = "waiting"
    finish_reason: str | None = None
    stop_text: str | None = None
    cached_tokens: int = 0
    first_token_time: float | None = None
    drafts: list[int] = dataclasses.field(default_factory=list)  # speculative "mtp": the next step's drafts
    verify_steps: int = 0  # speculative decoding: its verify steps and the tokens they gave it
    verified_tokens: int = 0

    context_len: int = 0  # ChatGLM-6B (2D positions): the prompt's context end and mask position (prompt_context)
    mask_position: int = -1

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def prefill_target(self) -> int:
        """Tokens to compute before decoding: the prompt, or (resumed after preemption) every token but the last,
        which the next decode step feeds."""
        return len(self.prompt) + max(len(self.generated) - 1, 0)

    @property
    def needs_prefill(self) -> bool:
        return self.computed < self.prefill_target


class Engine:
    """Continuous batching for one model (see the module docstring). `model`: a `GLMForCausalLM` of any family
    (glm5_next: its KDA state is kept per decode slot and prefix caching is off, docs/serving.md);
    `tokenizer` (optional): its stop ids end requests, its vocabulary bounds the sampled ids, and it checks stop
    strings. KV budget: `num_pages` pages of `page_size` tokens, or `kv_cache_tokens` tokens, default enough for
    every slot at `max_model_len`. `mesh` (a `glm_jax.make_mesh`): the parameters are placed with the logical
    rules (tensor parallel over "tensor", experts over "expert") and the page pool's KV heads over "tensor".
    `speculative` ("mtp" | "ngram") and `num_speculative_tokens`: speculative decoding, each decode step a verify
    step of 1 .. k+1 tokens per request (glm_jax/serve/drafts.py; one device). The model decodes fastest with one
    weight buffer per block (`glm_jax.model.decoding_layout`, or `load_hf(..., scan_layers=False)`); stacked
    blocks compile faster (docs/serving.md, "Weights")."""

    def __init__(self, model, params, tokenizer=None, *, max_num_seqs: int = 8, max_model_len: int | None = None,
                 page_size: int = 16, num_pages: int | None = None, kv_cache_tokens: int | None = None,
                 prefill_chunk: int = 128, max_prefill_rows: int = 2, prefix_caching: bool = True,
                 max_waiting: int = 1024, mesh: Mesh | None = None, rules: Sequence | None = None,
                 speculative: str | None = None, num_speculative_tokens: int | None = None):
        cfg = model.cfg
        if cfg.position_encoding_2d and speculative is not None:
            raise ValueError("speculative: not with a model with 2D positions (ChatGLM-6B)")
        if cfg.position_encoding_2d and prefix_caching:
            # its context attends both ways: a page's keys depend on the context after it (docs/serving.md)
            log.info("serving engine: prefix caching is off for ChatGLM-6B (2D positions, bidirectional context)")
            prefix_caching = False
        if cfg.is_glm5_next and prefix_caching:
            # its KDA layers' state after a cached prefix is not kept (docs/serving.md, "Recurrent state")
            log.info("serving engine: prefix caching is off for glm5_next (KDA state per slot, not per page)")
            prefix_caching = False
        # speculative decoding (glm_jax/serve/drafts.py): k drafts per generating request and step
        self.speculative = speculative
        self.spec_k = 0 if speculative is None else speculative_lib.check(model, speculative, num_speculative_tokens)
        self.mesh, self.rules = mesh, LOGICAL_RULES if rules is None else tuple(rules)
        self.model, self.tokenizer = model, tokenizer
        self.params = params if mesh is None else shard_params(model, params, mesh, self.rules)
        self.max_model_len = min(max_model_len or cfg.max_seq_len, cfg.max_seq_len)
        self.page_size, self.max_num_seqs = int(page_size), int(max_num_seqs)
        self.max_pages = math.ceil(self.max_model_len / self.page_size)
        if num_pages is None:
            num_pages = (math.ceil(kv_cache_tokens / page_size) if kv_cache_tokens
                         else self.max_pages * self.max_num_seqs) + 1
        self.pool = PagePool(int(num_pages), self.page_size, prefix_caching=prefix_caching)
        self.cache = init_paged_cache(cfg, int(num_pages), self.page_size, self.max_num_seqs)
        if mesh is not None:
            self.cache = jax.device_put(self.cache, pool_shardings(self.cache, mesh, self.rules))
        self.prefill_chunk, self.max_prefill_rows, self.max_waiting = prefill_chunk, max_prefill_rows, max_waiting
        self.vocab_limit = tokenizer.vocab_size if tokenizer is not None else cfg.vocab_size
        self.default_stop_ids = frozenset(tokenizer.stop_ids) if tokenizer is not None else frozenset()
        self.seen = jnp.zeros((self.max_num_seqs, cfg.vocab_size), bool)
        if mesh is not None:
            self.seen = jax.device_put(self.seen, NamedSharding(mesh, P()))
        self.mtp_cache = self.draft_logq = None
        if speculative == "mtp":  # the MTP layer's pool on the same pages, each slot's draft distributions
            self.mtp_cache = init_paged_mtp_cache(cfg, int(num_pages), self.page_size)
            self.draft_logq = jnp.zeros((self.max_num_seqs, self.spec_k, cfg.vocab_size), jnp.float32)
        self.slots: list[Request | None] = [None] * self.max_num_seqs
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = collections.Counter()
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def check_request(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> int:
        """ValueError naming the problem for a request the engine can never run; else its max new tokens."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt: must hold at least one token")
        bad = [i for i in prompt if not 0 <= i < self.model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.model.cfg.vocab_size})")
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"prompt: {len(prompt)} tokens leave no room in the context of {self.max_model_len}")
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise ValueError(f"max_tokens: {len(prompt)} prompt tokens + max_tokens {sampling.max_tokens} exceed "
                             f"the context of {self.max_model_len} tokens")
        if self.spec_k and sampling.repetition_penalty != 1.0:
            raise ValueError("repetition_penalty: not with speculative decoding (the server runs with --speculative)")
        max_tokens = sampling.max_tokens or room
        if math.ceil((len(prompt) + max_tokens) / self.page_size) > self.pool.num_pages - 1:
            raise ValueError(f"prompt: {len(prompt)} + {max_tokens} tokens need more KV pages than the cache has "
                             f"({self.pool.num_pages - 1} of {self.page_size} tokens)")
        return max_tokens

    def add_request(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues a request; returns its id. ValueError (`check_request`) for a request the engine can never run;
        QueueFull when `max_waiting` requests already wait."""
        sampling = sampling or SamplingParams()
        prompt = [int(i) for i in prompt_ids]
        max_tokens = self.check_request(prompt, sampling)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_waiting={self.max_waiting})")
        order = next(self._ids)
        rid = request_id or f"req-{order}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        stops = (frozenset() if sampling.ignore_eos else self.default_stop_ids) | frozenset(sampling.stop_token_ids)
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
        req = Request(rid, prompt, sampling, seed % (1 << 31), max_tokens, stops, order)
        if self.model.cfg.position_encoding_2d:
            req.context_len, req.mask_position = prompt_context(self.model.cfg, prompt)
        self.requests[rid] = req
        self.waiting.append(req)
        self.counters["requests"] += 1
        return rid

    def abort(self, request_id: str) -> bool:
        """Ends a waiting or running request at once, freeing its slot and pages; False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None or req.status == "finished":
            return False
        if req.status == "waiting":
            self.waiting.remove(req)
        self._finish(req, "abort")
        self.counters["aborted"] += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams] | None
                 = None) -> list[RequestOutput]:
        """Runs every prompt to the end (batched by the scheduler); the final outputs, in the prompts' order."""
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while any(i not in final for i in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def warm_up(self, samplings: Sequence[SamplingParams] = (SamplingParams(temperature=0), SamplingParams())) -> int:
        """Compiles every step program that traffic of these kinds of rows can need (each rows x chunk x page-table
        bucket of prefill and decode; default: greedy rows and `SamplingParams()`'s) by running each once on
        nothing (every write goes to the null page), so that no request waits for a compile. Returns the number
        of programs run; call it before serving (`--warmup`)."""
        if self.has_unfinished():
            raise RuntimeError("warm_up: call it before adding requests")
        widths = _buckets(4, self.max_pages)
        shapes = [("decode", rows, 1, width) for rows in _buckets(1, self.max_num_seqs) for width in widths]
        shapes += [("prefill", rows, chunk, width) for rows in _buckets(1, self.max_prefill_rows)
                   for chunk in _buckets(16, self.prefill_chunk) for width in widths]
        specs = list(dict.fromkeys(RowSpec.of([s]) for s in samplings))
        for spec in specs:
            for kind, rows, chunk, width in shapes:
                self._warm(kind, spec, rows, chunk, width)
        jax.block_until_ready(self.cache)
        return len(specs) * len(shapes)

    def _warm(self, kind: str, spec: RowSpec, rows: int, chunk: int, width: int) -> None:
        """Runs the step program of this kind and shape once on nothing (page tables of the null page)."""
        zeros, pages, knobs = np.zeros(rows, np.int32), np.zeros((rows, width), np.int32), self._knobs([], rows)
        if kind == "decode" and self.spec_k:
            fn = drafts_lib.verify_program(self.model, dataclasses.replace(spec, penalty=False, top_logprobs=False),
                                           self.speculative, self.spec_k, spec.top_logprobs)
            context = np.zeros((rows, width * self.page_size if self.speculative == "ngram" else 1), np.int32)
            out = run_sharded(self.mesh, self.rules, fn, self.params, self.cache, self.mtp_cache, self.draft_logq,
                              np.zeros((rows, self.spec_k + 1), np.int32), context, zeros + 1, pages, zeros, knobs)
            self.cache, self.mtp_cache, self.draft_logq = out[5:]
            return
        inputs = (np.zeros((rows, chunk), np.int32), pages, zeros, zeros, zeros, np.zeros(rows, bool), knobs)
        if kind == "prefill" and self.speculative == "mtp":
            out = run_sharded(self.mesh, self.rules, drafts_lib.mtp_prefill_program(self.model, spec, self.spec_k),
                              self.params, self.cache, self.mtp_cache, self.draft_logq, self.seen, *inputs,
                              np.zeros((rows, chunk), np.int32))
            self.cache, self.seen, self.mtp_cache, self.draft_logq = out[3], out[4], out[6], out[7]
            return
        out = self._program(kind, spec)(self.params, self.cache, self.seen, *inputs, self._contexts([], rows))
        self.cache, self.seen = out[3], out[4]

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Admits, prefills one chunk, decodes one token; the outputs of every request that advanced or ended."""
        outputs: dict[str, RequestOutput] = {}
        self._admit()
        rows = [r for r in self.running if r.needs_prefill][:self.max_prefill_rows]
        if rows:
            self._prefill(rows, outputs)
        rows = [r for r in self.running if not r.needs_prefill and r.generated]
        if rows:
            (self._verify if self.spec_k else self._decode)(rows, outputs)
        self.counters["steps"] += 1
        return list(outputs.values())

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req = self.waiting[0]
            target = req.prefill_target
            usable = (target - 1) // self.page_size  # the last prompt token is always computed (its logits)
            keys = page_keys(req.tokens, self.page_size, usable)
            pages = self.pool.match(keys)
            # its first chunk (a 2D-position model's whole context, whatever prefill_chunk says)
            first = min(target, max(len(pages) * self.page_size + self.prefill_chunk, req.context_len + 1))
            if math.ceil(first / self.page_size) - len(pages) > self.pool.available:
                self.pool.release(pages)  # no room for its first chunk yet
                return
            self.waiting.popleft()
            req.pages, req.keys = pages, keys[:len(pages)]
            req.computed = req.cached_tokens = len(pages) * self.page_size
            req.slot, req.status = self.slots.index(None), "running"
            self.slots[req.slot] = req
            self.running.append(req)
            if req.sampling.repetition_penalty != 1.0:
                self.seen = _reset_seen(self.seen, req.slot, *_padded(req.tokens))

    def _ensure_pages(self, req: Request, tokens: int) -> bool:
        """Pages for `tokens` tokens of `req`, preempting later requests if needed; False if `req` itself was (or
        already is) preempted."""
        while req.status == "running" and len(req.pages) * self.page_size < tokens:
            page = self.pool.allocate()
            if page is None:  # first come, first served: only a later request gives way, else this one waits
                later = [r for r in self.running if r.order > req.order]
                self._preempt(max(later, key=lambda r: r.order) if later else req)
                continue
            req.pages.append(page)
        return req.status == "running"

    def _preempt(self, req: Request) -> None:
        self.pool.release(req.pages)
        self.running.remove(req)
        self.slots[req.slot] = None
        req.pages, req.keys, req.computed, req.slot, req.status = [], [], 0, None, "waiting"
        # back into the queue in arrival order (ahead of everything that arrived later)
        later = next((i for i, r in enumerate(self.waiting) if r.order > req.order), len(self.waiting))
        self.waiting.insert(later, req)
        self.counters["preemptions"] += 1

    def _register_full_pages(self, req: Request) -> None:
        full = min(req.computed, len(req.tokens)) // self.page_size
        if full > len(req.keys):
            parent = req.keys[-1] if req.keys else None
            new = page_keys(req.tokens[len(req.keys) * self.page_size:], self.page_size, full - len(req.keys),
                            *(() if parent is None else (parent,)))
            for page, key in zip(req.pages[len(req.keys):full], new):
                self.pool.register(page, key)
            req.keys += new

    # ------------------------------------------------------------------ prefill and decode
    def _prefill(self, rows: list[Request], outputs: dict) -> None:
        counts = {}
        for req in rows:
            # a 2D-position model's context attends both ways: all of it goes in the first chunk
            counts[req.id] = min(max(self.prefill_chunk, req.context_len + 1 - req.computed),
                                 req.prefill_target - req.computed)
            self._ensure_pages(req, req.computed + counts[req.id])
        rows = [r for r in rows if r.status == "running"]
        if not rows:
            return
        n_rows = _bucket(len(rows), 1, self.max_prefill_rows)
        longest = max(counts[r.id] for r in rows)  # beyond prefill_chunk only for a long 2D-position context
        chunk = _bucket(longest, 16, max(self.prefill_chunk, 1 << (longest - 1).bit_length()))
        tokens = np.zeros((n_rows, chunk), np.int32)
        offset, new = np.zeros(n_rows, np.int32), np.zeros(n_rows, np.int32)
        slots = np.zeros(n_rows, np.int32)
        for b, req in enumerate(rows):
            n = counts[req.id]
            tokens[b, chunk - n:] = req.tokens[req.computed:req.computed + n]
            offset[b], new[b], slots[b] = req.computed - (chunk - n), n, req.slot
        finishing = [r.computed + counts[r.id] == r.prefill_target and not r.generated for r in rows]
        spec = RowSpec.of([r.sampling for r, f in zip(rows, finishing) if f])
        knobs = self._knobs(rows, n_rows)
        sample_mask = np.zeros(n_rows, bool)
        sample_mask[:len(rows)] = finishing
        if self.speculative == "mtp":  # the MTP layer runs over the chunk too (its cache), drafting at its end
            ahead = np.zeros((n_rows, chunk), np.int32)
            for b, req in enumerate(rows):
                n, after = counts[req.id], req.tokens[req.computed + 1:req.computed + counts[req.id] + 1]
                ahead[b, chunk - n:chunk - n + len(after)] = after
                ahead[b, chunk - n + len(after):] = -1  # the token this chunk samples
            fn = functools.partial(run_sharded, self.mesh, self.rules,
                                   drafts_lib.mtp_prefill_program(self.model, spec, self.spec_k))
            tok, lp, top, self.cache, self.seen, drafts, self.mtp_cache, self.draft_logq = fn(
                self.params, self.cache, self.mtp_cache, self.draft_logq, self.seen, tokens,
                self._page_table(rows, n_rows), offset, new, slots, sample_mask, knobs, ahead)
            drafts = np.asarray(drafts)
            for b, req in enumerate(rows):
                req.drafts = drafts[b].tolist()
        else:
            fn = self._program("prefill", spec)
            tok, lp, top, self.cache, self.seen = fn(self.params, self.cache, self.seen, tokens,
                                                     self._page_table(rows, n_rows), offset, new, slots, sample_mask,
                                                     knobs, self._contexts(rows, n_rows))
        tok, lp = np.asarray(tok), np.asarray(lp)
        top = None if top is None else tuple(np.asarray(t) for t in top)
        for b, req in enumerate(rows):
            req.computed += counts[req.id]
            self.counters["prompt_tokens"] += counts[req.id]
            self._register_full_pages(req)
            if finishing[b]:
                self._append(req, int(tok[b]), float(lp[b]), None if top is None else (top[0][b], top[1][b]), outputs)

    def _decode(self, rows: list[Request], outputs: dict) -> None:
        for req in rows:
            self._ensure_pages(req, req.computed + 1)
        rows = [r for r in rows if r.status == "running"]
        if not rows:
            return
        n = _bucket(len(rows), 1, self.max_num_seqs)  # rows are the generating requests, packed: not the slots
        tokens, offset, new = np.zeros((n, 1), np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        slots = np.zeros(n, np.int32)
        for b, req in enumerate(rows):
            tokens[b, 0], offset[b], new[b], slots[b] = req.tokens[req.computed], req.computed, 1, req.slot
        spec = RowSpec.of([r.sampling for r in rows])
        fn = self._program("decode", spec)
        tok, lp, top, self.cache, self.seen = fn(self.params, self.cache, self.seen, tokens, self._page_table(rows, n),
                                                 offset, new, slots, new.astype(bool), self._knobs(rows, n),
                                                 self._contexts(rows, n))
        tok, lp = np.asarray(tok), np.asarray(lp)
        top = None if top is None else tuple(np.asarray(t) for t in top)
        for b, req in enumerate(rows):
            req.computed += 1
            self._register_full_pages(req)
            self._append(req, int(tok[b]), float(lp[b]), None if top is None else (top[0][b], top[1][b]), outputs)

    def _verify(self, rows: list[Request], outputs: dict) -> None:
        """Speculative decode step: each row's last token and k drafts verified at once; 1 .. k+1 tokens each."""
        k = self.spec_k
        for req in rows:  # the k+1 verified positions, and the MTP chain's k-1 beyond the accepted ones
            self._ensure_pages(req, req.computed + k + 1 + (k - 1 if self.speculative == "mtp" else 0))
        rows = [r for r in rows if r.status == "running"]
        if not rows:
            return
        n = _bucket(len(rows), 1, self.max_num_seqs)
        pages = self._page_table(rows, n)
        tokens, length = np.zeros((n, k + 1), np.int32), np.ones(n, np.int32)
        context = np.zeros((n, pages.shape[1] * self.page_size if self.speculative == "ngram" else 1), np.int32)
        slots = np.zeros(n, np.int32)
        for b, req in enumerate(rows):
            tokens[b, 0], length[b], slots[b] = req.tokens[req.computed], req.computed + 1, req.slot
            if self.speculative == "mtp":
                tokens[b, 1:] = req.drafts
            else:
                context[b, :req.computed + 1] = req.tokens[:req.computed + 1]
        spec = RowSpec.of([r.sampling for r in rows])
        fn = functools.partial(run_sharded, self.mesh, self.rules, drafts_lib.verify_program(
            self.model, dataclasses.replace(spec, penalty=False, top_logprobs=False), self.speculative, k,
            spec.top_logprobs))
        accepted, emitted, lps, top, drafts, self.cache, self.mtp_cache, self.draft_logq = fn(
            self.params, self.cache, self.mtp_cache, self.draft_logq, tokens, context, length, pages, slots,
            self._knobs(rows, n))
        accepted, emitted, lps = np.asarray(accepted), np.asarray(emitted), np.asarray(lps)
        top = None if top is None else tuple(np.asarray(t) for t in top)
        drafts = None if drafts is None else np.asarray(drafts)
        for b, req in enumerate(rows):
            self.counters["spec_steps"] += 1
            self.counters["spec_accepted"] += int(accepted[b])
            req.verify_steps += 1
            req.computed += int(accepted[b]) + 1  # its last token and the accepted drafts are in the pages
            self._register_full_pages(req)
            if drafts is not None:
                req.drafts = drafts[b].tolist()
            for j in range(int(accepted[b]) + 1):
                if req.status != "running":
                    break
                req.verified_tokens += 1
                self.counters["spec_emitted"] += 1
                self._append(req, int(emitted[b, j]), float(lps[b, j]),
                             None if top is None else (top[0][b, j], top[1][b, j]), outputs)

    def _page_table(self, rows: Sequence[Request | None], n: int) -> np.ndarray:
        """[n, width] page tables; width = the longest row's pages rounded up to a power of two (at most
        max_pages), so a step attends over what its rows hold, not over max_model_len, with a handful of shapes."""
        width = _bucket(max((len(r.pages) for r in rows if r is not None), default=1), 4, self.max_pages)
        table = np.zeros((n, width), np.int32)
        for b, req in enumerate(rows):
            if req is not None:
                table[b, :len(req.pages)] = req.pages
        return table

    def _knobs(self, rows: Sequence[Request | None], n: int) -> dict:
        knobs = {"temperature": np.zeros(n, np.float32), "top_p": np.ones(n, np.float32),
                 "top_k": np.zeros(n, np.int32), "repetition_penalty": np.ones(n, np.float32),
                 "seed": np.zeros(n, np.int32), "count": np.zeros(n, np.int32)}
        for b, req in enumerate(rows):
            if req is not None:
                p = req.sampling
                knobs["temperature"][b], knobs["top_p"][b], knobs["top_k"][b] = p.temperature, p.top_p, p.top_k
                knobs["repetition_penalty"][b], knobs["seed"][b] = p.repetition_penalty, req.seed
                knobs["count"][b] = len(req.generated)
        knobs["vocab_limit"] = np.int32(self.vocab_limit)
        return knobs

    def _contexts(self, rows: Sequence[Request], n: int) -> np.ndarray | None:
        """[2, n] the rows' context ends and mask positions (ChatGLM-6B), None for every other model."""
        if not self.model.cfg.position_encoding_2d:
            return None
        out = np.zeros((2, n), np.int32)
        for b, req in enumerate(rows):
            out[:, b] = req.context_len, req.mask_position
        return out

    def _program(self, kind: str, spec: RowSpec):
        return functools.partial(run_sharded, self.mesh, self.rules,
                                 _step_program(self.model, kind, spec, self.mesh, self.rules))

    # ------------------------------------------------------------------ results
    def _append(self, req: Request, token: int, logprob: float, top, outputs: dict) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.generated.append(token)
        self.counters["generation_tokens"] += 1
        out = outputs.get(req.id)
        if out is None:
            out = outputs[req.id] = RequestOutput(req.id, req.prompt, [], [], num_cached_tokens=req.cached_tokens)
        out.new_token_ids.append(token)
        if req.sampling.logprobs is not None:
            k = req.sampling.logprobs
            req.logprobs.append({"logprob": logprob, "top": [] if top is None else
                                 [(int(i), float(v)) for i, v in zip(top[0][:k], top[1][:k])]})
            out.logprobs = list(req.logprobs)
        reason = None
        if token in req.stop_ids:
            reason = "stop"
        elif req.sampling.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(req.generated)
            hit = next((s for s in req.sampling.stop if s in text), None)
            if hit is not None:
                reason, req.stop_text = "stop", hit
        if reason is None and (len(req.generated) >= req.max_tokens or len(req.tokens) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
        out.token_ids = list(req.generated)
        out.finished, out.finish_reason, out.stop_text = req.status == "finished", req.finish_reason, req.stop_text
        if req.verify_steps:
            out.accept_length = req.verified_tokens / req.verify_steps

    def _finish(self, req: Request, reason: str) -> None:
        if req.status == "running":
            self.pool.release(req.pages)
            self.running.remove(req)
            self.slots[req.slot] = None
        req.pages, req.slot, req.status, req.finish_reason = [], None, "finished", reason
        self.requests.pop(req.id, None)

    # ------------------------------------------------------------------ state
    def stats(self) -> dict[str, Any]:
        """Counts for monitoring: requests running / waiting, KV pages used / total, prefix-cache tokens queried
        and hit, and the totals in `counters`."""
        return {"running": len(self.running), "waiting": len(self.waiting), "pages_used": self.pool.used,
                "pages_total": self.pool.num_pages - 1, **self.pool.stats, **self.counters}

    def accept_length(self) -> float | None:
        """Speculative decoding: tokens emitted per verify step and request, over the engine's life (1 .. k+1)."""
        steps = self.counters["spec_steps"]
        return self.counters["spec_emitted"] / steps if steps else None


def pool_shardings(pool, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings of a page pool (`init_paged_cache`): GQA's KV heads over "tensor" where they divide, and the KDA
    state's heads (glm5_next); the pages, MLA's latent and DSA's index keys replicated (every row of a step may read
    any page)."""
    axes_of = {"cached_key": ("layers", None, None, "kv_heads", "head_dim"),
               "cached_value": ("layers", None, None, "kv_heads", "head_dim"),
               "kda_state": ("layers", None, "kda_heads", None, None),
               "kda_conv": ("layers", None, None, None, "kda_heads", None)}

    def one(path, x):
        axes = axes_of.get(getattr(path[-1], "key", None), (None,) * x.ndim)
        return logical_sharding(mesh, axes, x.shape, rules)

    return jax.tree_util.tree_map_with_path(one, pool)


@functools.lru_cache(maxsize=64)
def _step_program(model, kind: str, spec: RowSpec, mesh: Mesh | None = None, rules=LOGICAL_RULES):
    """The compiled prefill / decode step of `model` for rows of kind `spec`: one per (model, kind, spec, mesh),
    shared by every engine of that model (jax compiles it once per shape)."""

    def run(params, cache, seen, tokens, pages, offset, new, slots, sampled, knobs, contexts=None):
        TRACE_COUNTS[kind] += 1
        index = PagedIndex(pages=pages, offset=offset, new=new, slots=slots,
                           **({} if contexts is None else {"context_len": contexts[0], "mask_position": contexts[1]}))
        logits, updated = model.apply({"params": params, "cache": cache}, tokens, paged=index, mutable=["cache"],
                                      last_logits_only=True)
        tok, lp, top = sample_rows(logits[:, 0], seen[slots], knobs, spec)
        seen = seen.at[slots, tok].max(sampled)
        cache = updated["cache"]
        if mesh is not None:  # the pool keeps its layout from step to step
            cache = jax.lax.with_sharding_constraint(cache, pool_shardings(cache, mesh, rules))
        return tok, lp, top, cache, seen

    return jax.jit(run, donate_argnums=(1, 2))


def _bucket(n: int, low: int, high: int) -> int:
    """`n` rounded up to a power of two, within [low, high]: the few shapes a step program is compiled for."""
    return min(high, max(low, 1 << max(0, (n - 1).bit_length())))


def _buckets(low: int, high: int) -> list[int]:
    """Every value `_bucket(n, low, high)` takes."""
    return sorted({_bucket(n, low, high) for n in range(1, high + 1)})


@jax.jit
def _reset_seen(seen, slot, tokens, n):
    row = jnp.zeros(seen.shape[1], bool).at[tokens].max(jnp.arange(tokens.shape[0]) < n)
    return seen.at[slot].set(row)


def _padded(tokens: Sequence[int]) -> tuple[np.ndarray, np.int32]:
    size = 1 << max(4, (len(tokens) - 1).bit_length())  # a few compiles: powers of two
    out = np.zeros(size, np.int32)
    out[:len(tokens)] = tokens
    return out, np.int32(len(tokens))
