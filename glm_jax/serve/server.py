"""The OpenAI-compatible HTTP server on top of the engine (docs/serving.md): FastAPI routes, server-sent events.

    app = build_app(engine, tokenizer, served_model_name="glm")   # then uvicorn.run(app, ...)

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /health,
GET /metrics (Prometheus text). Chat messages are formatted by the tokenizer's chat template and replies parsed by
its reply parser, streamed through its `StreamParser` (reasoning_content, content, tool_calls deltas); a chat
request with `"knowledge"` is grounded in the server's knowledge index first. Every bad request is a 4xx OpenAI
error object naming the field; a full queue is 429; a client that goes away aborts its request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from glm_jax.knowledge.embeddings import embed
from glm_jax.knowledge.grounding import fitted_messages, has_system_role, sources
from glm_jax.serve.engine import Engine, QueueFull, RequestOutput
from glm_jax.serve.runner import EngineRunner
from glm_jax.serve.sampling import MAX_LOGPROBS, SamplingParams
from glm_jax.tokenizers.formats import check_tools

log = logging.getLogger(__name__)
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


# ---------------------------------------------------------------------------------------------------- requests
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields other servers know (user, service_tier, ...) are ignored

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    ignore_eos: bool = False

    def sampling(self, max_tokens: int | None, logprobs: int | None, index: int) -> SamplingParams:
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=max(self.top_k or 0, 0),
                              repetition_penalty=self.repetition_penalty or 1.0, seed=seed,
                              stop=tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                              max_tokens=max_tokens, logprobs=logprobs)


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class KnowledgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(3, ge=1, le=32)
    mode: Literal["bm25", "dense", "hybrid"] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    knowledge: KnowledgeOptions | None = None  # ground the last user message in the server's index

    @field_validator("knowledge", mode="before")
    @classmethod
    def _knowledge_flag(cls, value):
        """`"knowledge": true` asks for the defaults, false for nothing."""
        return ({} if value else None) if isinstance(value, bool) else value


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # `user`

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


class BearerAuth:
    """`--api-key`: 401 for a /v1/ request without `Authorization: Bearer <key>`. A plain ASGI middleware, which
    passes a streamed response through untouched (`@app.middleware("http")` re-queues every chunk of it)."""

    def __init__(self, app, *, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            response = _error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------- metrics
class Metrics:
    def __init__(self, runner: EngineRunner):
        self.registry, self.runner = CollectorRegistry(), runner
        r = self.registry
        self.running = Gauge("glm_jax_requests_running", "Requests in a decode slot", registry=r)
        self.waiting = Gauge("glm_jax_requests_waiting", "Requests waiting for a slot or KV pages", registry=r)
        self.pages_used = Gauge("glm_jax_kv_pages_used", "KV cache pages held by running requests", registry=r)
        self.pages_total = Gauge("glm_jax_kv_pages_total", "KV cache pages", registry=r)
        self.hit_rate = Gauge("glm_jax_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                              registry=r)
        self.prompt_tokens = Counter("glm_jax_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("glm_jax_generation_tokens", "Tokens generated", registry=r)
        self.prefix_hit_tokens = Gauge("glm_jax_prefix_cache_hit_tokens", "Prompt tokens served from the prefix "
                                       "cache", registry=r)
        self.preemptions = Gauge("glm_jax_preemptions", "Requests preempted for KV pages", registry=r)
        self.ttft = Histogram("glm_jax_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("glm_jax_inter_token_latency_seconds", "Time between tokens of a request", registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.spec_steps = Gauge("glm_jax_spec_verify_steps", "Speculative decoding: verify steps (per request)",
                                registry=r)
        self.spec_accepted = Gauge("glm_jax_spec_accepted_drafts", "Speculative decoding: drafts accepted",
                                   registry=r)
        self.accept_length = Gauge("glm_jax_spec_accept_length", "Speculative decoding: tokens per verify step "
                                   "and request (1 .. k+1), mean over the server's life", registry=r)

    def render(self) -> bytes:
        s = self.runner.engine.stats()
        self.running.set(s["running"])
        self.waiting.set(s["waiting"])
        self.pages_used.set(s["pages_used"])
        self.pages_total.set(s["pages_total"])
        self.hit_rate.set(s["hit_tokens"] / s["query_tokens"] if s["query_tokens"] else 0.0)
        self.prefix_hit_tokens.set(s["hit_tokens"])
        self.preemptions.set(s.get("preemptions", 0))
        self.spec_steps.set(s.get("spec_steps", 0))
        self.spec_accepted.set(s.get("spec_accepted", 0))
        self.accept_length.set(self.runner.engine.accept_length() or 0.0)
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------------- the app
def build_app(engine: Engine, tokenizer, *, served_model_name: str = "glm", api_key: str | None = None,
              knowledge=None, embedding_pooling: str = "last") -> FastAPI:
    """`knowledge`: a `glm_jax.KnowledgeIndex` that chat requests with `"knowledge"` are grounded in;
    `embedding_pooling`: how /v1/embeddings pools the served model's hidden states (`glm_jax.embed`)."""
    runner = EngineRunner(engine)
    system_role = knowledge is not None and has_system_role(tokenizer)
    metrics = Metrics(runner)

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="glm_jax", lifespan=lifespan)
    app.state.runner, app.state.metrics = runner, metrics

    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "glm_jax", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatBody)
        _check_model(body.model, served_model_name)
        tools = None if body.tool_choice == "none" else body.tools
        try:
            check_tools(tools)
        except ValueError as e:
            raise ApiError(400, str(e), "tools") from None
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        render = lambda msgs: tokenizer.apply_chat_template(  # noqa: E731
            msgs, tools=tools, add_generation_prompt=True, **(body.chat_template_kwargs or {}))
        sources = None
        if body.knowledge is not None:
            reply_room = body.max_completion_tokens or body.max_tokens or 1
            messages, sources = await _ground(knowledge, tokenizer, messages, body.knowledge, system_role, render,
                                              engine.max_model_len - reply_room)
        try:
            prompt = render(messages)
        except Exception as e:  # noqa: BLE001 - a template's own error (raise_exception) or a bad message
            raise ApiError(400, f"messages: cannot be formatted by the chat template ({e})", "messages") from None
        opening = _forced_opening(tokenizer, messages, tools, body)
        prompt = list(prompt) + tokenizer.encode(opening, add_special_tokens=False) if opening else prompt
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        samplings = [_sampling(body, body.max_completion_tokens or body.max_tokens, logprobs, i) for i in range(body.n)]
        streams = [_submit(runner, prompt, s) for s in samplings]
        chat = ChatStream(tokenizer, tools, prompt, served_model_name, metrics, samplings[0].stop, opening, sources)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(chat.sse(runner, streams, include_usage), media_type="text/event-stream")
        return await chat.whole(runner, streams, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionBody)
        _check_model(body.model, served_model_name)
        prompts = _completion_prompts(body.prompt, tokenizer)
        samplings = [_sampling(body, body.max_tokens or 16, body.logprobs, i) for i in range(body.n)]
        streams = [(p, _submit(runner, p, s)) for p in prompts for s in samplings]
        done = Completion(tokenizer, served_model_name, metrics, body.echo, body.logprobs, samplings[0].stop)
        if body.stream:
            return StreamingResponse(done.sse(runner, streams), media_type="text/event-stream")
        return await done.whole(runner, streams, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _parse(request, EmbeddingBody)
        _check_model(body.model, served_model_name)
        hidden = engine.model.cfg.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise ApiError(400, f"dimensions: this model's embeddings have {hidden} dimensions, got "
                                f"{body.dimensions}", "dimensions")
        ids = _embedding_inputs(body.input, tokenizer, engine.max_model_len, engine.model.cfg.vocab_size)
        vectors = await asyncio.to_thread(embed, engine.model, engine.params, ids, pooling=embedding_pooling,
                                          max_len=engine.max_model_len)
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": served_model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


async def _ground(index, tokenizer, messages: list[dict], opts: KnowledgeOptions, system_role: bool, render,
                  budget: int) -> tuple[list[dict], list]:
    """The messages with the last user message grounded in `index` (glm_jax.knowledge.grounding; as many hits as
    keep `render(messages)`, the prompt ids, within `budget`), and the sources; 400 naming `knowledge` when the
    server has no index or the option cannot be met."""
    if index is None:
        raise ApiError(400, "knowledge: this server has no knowledge index (start it with --knowledge INDEX_DIR)",
                       "knowledge")
    try:
        index.check_mode(opts.mode or "bm25")
    except ValueError as e:
        raise ApiError(400, f"knowledge.{e}", "knowledge.mode") from None
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ApiError(400, "knowledge: grounding needs a user message to look up", "knowledge")
    content = messages[users[-1]].get("content") or ""
    question = content if isinstance(content, str) else " ".join(
        p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    hits = await asyncio.to_thread(index.search, question, opts.k, opts.mode)
    before, after = messages[:users[-1]], messages[users[-1] + 1:]
    try:
        turn, kept = fitted_messages(tokenizer, question, hits, lambda t: render(before + t + after), budget,
                                     system_role=system_role)
    except Exception as e:  # noqa: BLE001 - the template's own error, as for an ungrounded request
        raise ApiError(400, f"messages: cannot be formatted by the chat template ({e})", "messages") from None
    return before + turn + after, sources(kept)


def _embedding_inputs(value, tokenizer, max_len: int, vocab_size: int) -> list[list[int]]:
    """/v1/embeddings `input` as token ids per text (strings as `glm_jax.embed` encodes them); 400 naming the
    input for an empty one, one longer than the model's context or ids outside the vocabulary."""
    if isinstance(value, str) or (value and all(isinstance(x, int) for x in value)):
        value = [value]
    if not value or len(value) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input: expected 1 to {MAX_EMBEDDING_INPUTS} inputs, got {len(value)}", "input")
    out = []
    for i, x in enumerate(value):
        ids = tokenizer.embedding_ids(x, max_len + 1) if isinstance(x, str) else list(x)
        if (isinstance(x, str) and not x) or not ids:
            raise ApiError(400, f"input[{i}]: must not be empty", "input")
        if len(ids) > max_len:
            raise ApiError(400, f"input[{i}]: {len(ids)} tokens or more, beyond the model's {max_len}", "input")
        if any(not 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"input[{i}]: token ids must be in [0, {vocab_size})", "input")
        out.append(ids)
    return out


def _encode_vector(vector: np.ndarray, encoding: str):
    """A vector as OpenAI sends it: a list of floats, or the base64 of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return [float(v) for v in vector]


async def _parse(request: Request, model: type[BaseModel]):
    try:
        raw = await request.json()
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise _as_api_error(e.errors()) from None


def _as_api_error(errors) -> ApiError:
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return ApiError(400, f"{where}: {first.get('msg', 'invalid')}", where or None)


def _validation_error(errors):
    e = _as_api_error(errors)
    return _error(e.status, e.message, e.param)


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise ApiError(404, f"model: {name!r} is not served here (this server serves {served!r})", "model",
                       "model_not_found")


def _forced_opening(tokenizer, messages, tools, body) -> str:
    """The reply text that `tool_choice` "required" / {"type": "function", "function": {"name"}} forces, written
    after the generation prompt ("" for "auto" / "none"; `Tokenizer.tool_call_opening`)."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return ""
    if choice == "required":
        name = None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in [t["function"]["name"] for t in tools or ()]:
            raise ApiError(400, f"tool_choice.function.name: {name!r} is not one of the request's tools",
                           "tool_choice.function.name")
    else:
        raise ApiError(400, "tool_choice: expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice")
    try:  # "required" without tools: the tokenizer's ValueError
        return tokenizer.tool_call_opening(messages, tools, name, **(body.chat_template_kwargs or {}))
    except ValueError as e:
        raise ApiError(400, str(e), "tool_choice") from None


def _sampling(body: _Body, max_tokens, logprobs, index) -> SamplingParams:
    try:
        return body.sampling(max_tokens, logprobs, index)
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        raise ApiError(400, str(e), field) from None


def _submit(runner: EngineRunner, prompt, sampling):
    try:
        return runner.submit(prompt, sampling)
    except QueueFull as e:
        raise ApiError(429, str(e), None, "rate_limit_exceeded") from None
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        raise ApiError(400, str(e), "messages" if field == "prompt" else field) from None


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", "prompt")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


async def _outputs(runner: EngineRunner, rid: str, outputs: asyncio.Queue):
    """The request's outputs until it finishes; aborts it if the consumer stops early (client gone)."""
    finished = False
    try:
        while not finished:
            item = await outputs.get()
            if isinstance(item, Exception):
                raise ApiError(500 if not isinstance(item, ValueError) else 400, str(item), kind="server_error")
            finished = item.finished
            yield item
    finally:
        if not finished:
            runner.abort(rid)


class _TextStream:
    """Incremental text of generated ids: only whole characters, never past a stop string, and holding back a
    tail that could still become one."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops, self.ids, self.shown = tokenizer, stops, [], ""

    def feed(self, out: RequestOutput) -> str:
        self.ids = out.token_ids
        ids = self.ids
        if out.finished and out.finish_reason == "stop" and out.stop_text is None and ids:
            ids = ids[:-1]  # a stop id is not text
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if out.stop_text is not None:
            text = text[:text.index(out.stop_text)] if out.stop_text in text else text
        elif not out.finished:
            if text.endswith("\ufffd"):
                return ""
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[:len(text) - hold] if hold else text
        if not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta


def _final_text(tokenizer, out: RequestOutput) -> str:
    """A finished request's text: without its stop id, cut before the stop string that ended it."""
    ids = out.token_ids[:-1] if out.finish_reason == "stop" and out.stop_text is None else out.token_ids
    text = tokenizer.decode(ids)
    return text[:text.index(out.stop_text)] if out.stop_text is not None and out.stop_text in text else text


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_reason(out: RequestOutput, calls: bool) -> str:
    if out.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _chat_logprobs(tokenizer, out: RequestOutput, start: int = 0) -> dict | None:
    if out.logprobs is None:
        return None
    content = []
    for token, lp in zip(out.token_ids[start:], out.logprobs[start:]):
        content.append({"token": tokenizer.decode([token]), "logprob": lp["logprob"],
                        "top_logprobs": [{"token": tokenizer.decode([i]), "logprob": v} for i, v in lp["top"]]})
    return {"content": content}


class ChatStream:
    def __init__(self, tokenizer, tools, prompt, model_name: str, metrics: Metrics, stops: tuple[str, ...] = (),
                 opening: str = "", sources: list | None = None):
        """`opening`: reply text the prompt already ends with (a forced tool call), parsed before the output.
        `sources`: the passages a grounded request was given, sent as "sources" (in the first chunk)."""
        self.tokenizer, self.tools, self.prompt, self.model, self.metrics = tokenizer, tools, prompt, model_name, metrics
        self.stops, self.opening, self.sources = stops, opening, sources
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _chunk(self, choices, usage=None, sources=None) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        if sources is not None:
            data["sources"] = sources
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def sse(self, runner, streams, include_usage: bool):
        queues = asyncio.Queue()

        async def pump(index, rid, outputs):
            try:
                async for out in _outputs(runner, rid, outputs):
                    await queues.put((index, out))
            except ApiError as e:
                await queues.put((index, e))

        tasks = [asyncio.create_task(pump(i, rid, q)) for i, (rid, q) in enumerate(streams)]
        texts = [_TextStream(self.tokenizer, self.stops) for _ in streams]
        parsers = [self.tokenizer.stream_parser(self.tools, prompt=self.prompt) for _ in streams]
        pending = [self.opening] * len(streams)  # fed with each stream's first output
        calls = [0] * len(streams)
        last_time = [runner.submitted_at.get(rid) for rid, _ in streams]
        done, completion_tokens, cached = 0, 0, 0
        try:
            for i in range(len(streams)):
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}], sources=self.sources if i == 0 else None)
            while done < len(streams):
                i, out = await queues.get()
                if isinstance(out, ApiError):
                    yield f"data: {json.dumps({'error': {'message': out.message, 'type': out.kind}})}\n\n"
                    done += 1
                    continue
                self._time(last_time, i, out)
                events = parsers[i].feed(pending[i] + texts[i].feed(out))
                pending[i] = ""
                if out.finished:
                    events += parsers[i].finish()
                for delta in self._deltas(events, calls, i):
                    yield self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                if out.logprobs is not None:
                    lp = _chat_logprobs(self.tokenizer, out, len(out.token_ids) - len(out.new_token_ids))
                    yield self._chunk([{"index": i, "delta": {}, "logprobs": lp, "finish_reason": None}])
                if out.finished:
                    done += 1
                    completion_tokens += len(out.token_ids)
                    cached = out.num_cached_tokens
                    self.metrics.generation_tokens.inc(len(out.token_ids))
                    yield self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": _finish_reason(out, calls[i] > 0)}])
            self.metrics.prompt_tokens.inc(len(self.prompt) * len(streams))
            if include_usage:
                yield self._chunk([], _usage(len(self.prompt) * len(streams), completion_tokens, cached))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    def _time(self, last_time, i, out):
        now = time.monotonic()
        if last_time[i] is not None:
            first = len(out.token_ids) == len(out.new_token_ids)
            (self.metrics.ttft if first else self.metrics.itl).observe(now - last_time[i])
        last_time[i] = now

    @staticmethod
    def _deltas(events, calls, i):
        for e in events:
            if e["type"] == "reasoning" and e["text"]:
                yield {"reasoning_content": e["text"]}
            elif e["type"] == "content" and e["text"]:
                yield {"content": e["text"]}
            elif e["type"] == "tool_call":
                f = e["tool_call"]["function"]
                yield {"tool_calls": [{"index": calls[i], "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                       "function": {"name": f["name"],
                                                    "arguments": json.dumps(f["arguments"], ensure_ascii=False)}}]}
                calls[i] += 1

    async def whole(self, runner, streams, request: Request):
        results = await asyncio.gather(*(self._collect(runner, rid, q) for rid, q in streams))
        choices, completion_tokens = [], 0
        for i, out in enumerate(results):
            parsed = self.tokenizer.parse_reply(self.opening + _final_text(self.tokenizer, out), tools=self.tools)
            message = {"role": "assistant", "content": parsed["content"]}
            if parsed["reasoning_content"] is not None:
                message["reasoning_content"] = parsed["reasoning_content"]
            if parsed["tool_calls"]:
                message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                          "function": {"name": c["function"]["name"], "arguments": json.dumps(
                                              c["function"]["arguments"], ensure_ascii=False)}}
                                         for c in parsed["tool_calls"]]
            choices.append({"index": i, "message": message, "logprobs": _chat_logprobs(self.tokenizer, out),
                            "finish_reason": _finish_reason(out, bool(parsed["tool_calls"]))})
            completion_tokens += len(out.token_ids)
        self.metrics.prompt_tokens.inc(len(self.prompt) * len(streams))
        self.metrics.generation_tokens.inc(completion_tokens)
        cached = max((o.num_cached_tokens for o in results), default=0)
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": choices, "usage": _usage(len(self.prompt) * len(streams), completion_tokens, cached)}
        if self.sources is not None:
            out["sources"] = self.sources
        return out

    async def _collect(self, runner, rid, outputs):
        last = None
        last_time = [runner.submitted_at.get(rid)]
        async for out in _outputs(runner, rid, outputs):
            self._time(last_time, 0, out)
            last = out
        return last


class Completion:
    def __init__(self, tokenizer, model_name: str, metrics: Metrics, echo: bool, logprobs: int | None,
                 stops: tuple[str, ...] = ()):
        self.tokenizer, self.model, self.metrics, self.echo, self.logprobs = tokenizer, model_name, metrics, echo, logprobs
        self.stops = stops
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _text(self, prompt, out: RequestOutput) -> str:
        return (self.tokenizer.decode(prompt) if self.echo else "") + _final_text(self.tokenizer, out)

    def _logprobs(self, out: RequestOutput, start: int = 0) -> dict | None:
        if out.logprobs is None:
            return None
        tokens = [self.tokenizer.decode([t]) for t in out.token_ids[start:]]
        return {"tokens": tokens, "token_logprobs": [lp["logprob"] for lp in out.logprobs[start:]],
                "top_logprobs": [{self.tokenizer.decode([i]): v for i, v in lp["top"]} for lp in out.logprobs[start:]],
                "text_offset": [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]}

    async def whole(self, runner, streams, request):
        async def collect(rid, q):
            last = None
            async for out in _outputs(runner, rid, q):
                last = out
            return last

        results = await asyncio.gather(*(collect(rid, q) for _, (rid, q) in streams))
        choices = [{"index": i, "text": self._text(p, out), "logprobs": self._logprobs(out),
                    "finish_reason": "length" if out.finish_reason == "length" else "stop"}
                   for i, ((p, _), out) in enumerate(zip(streams, results))]
        prompt_tokens = sum(len(p) for p, _ in streams)
        completion_tokens = sum(len(o.token_ids) for o in results)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    async def sse(self, runner, streams):
        for i, ((prompt, (rid, q))) in enumerate(streams):
            text = _TextStream(self.tokenizer, self.stops)
            if self.echo:
                yield self._chunk(i, self.tokenizer.decode(prompt), None)
            async for out in _outputs(runner, rid, q):
                delta = text.feed(out)
                lp = self._logprobs(out, len(out.token_ids) - len(out.new_token_ids))
                reason = None if not out.finished else ("length" if out.finish_reason == "length" else "stop")
                if delta or reason or lp:
                    yield self._chunk(i, delta, reason, lp)
        yield "data: [DONE]\n\n"

    def _chunk(self, index, text, reason, logprobs=None) -> str:
        data = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
