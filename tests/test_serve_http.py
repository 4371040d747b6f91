"""`python -m glm_jax.serve` driven by the official `openai` client: a random glm4 checkpoint with a GLM-4.5
tokenizer.json and chat template, served on localhost. Greedy text equals `glm_jax.generate`'s, streamed equals
non-streamed, concurrent clients all finish, a shared prompt prefix hits the cache, bad requests get their 4xx
and the server answers the next one, SIGTERM drains and exits 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest

from glm_jax import GLMConfig, GLMForCausalLM, generate, init_params, load_tokenizer, save_hf

openai = pytest.importorskip("openai")
import tokenizer_fixtures as fx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the verses",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "count", "parameters": {"type": "object", "properties": {}}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok_dir = fx.write_hf(fx.train_bpe(600), tmp_path_factory.mktemp("tok"), "glm45.jinja", in_config=False)
    cfg = GLMConfig.from_preset("glm-test", vocab_size=640, sandwich_norm=True, max_seq_len=512)
    params = jax.jit(lambda k: jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x,
                                            init_params(GLMForCausalLM(cfg), k)))(jax.random.key(0))
    ckpt = save_hf(cfg, params, tmp_path_factory.mktemp("ckpt") / "tiny-glm", format="transformers")
    for f in tok_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    return ckpt


def start(checkpoint, *extra):
    port = free_port()
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.Popen([sys.executable, "-m", "glm_jax.serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), "--max-num-seqs", "4", "--page-size", "8", "--prefill-chunk", "32",
                             "--log-level", "warning", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture(scope="module")
def knowledge_index(tmp_path_factory):
    from glm_jax.knowledge import KnowledgeIndex, read_passages

    index = KnowledgeIndex.build(read_passages(ROOT / "data" / "knowledge" / "docs"))
    return index, index.save(tmp_path_factory.mktemp("kb") / "index")


@pytest.fixture(scope="module")
def server(checkpoint, knowledge_index):
    proc, url = start(checkpoint, "--served-model-name", "tiny", "--knowledge", str(knowledge_index[1]))
    yield url
    proc.kill()
    proc.wait()


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def metric(url, name) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_greedy_completion_equals_generate_and_stream_equals_whole(server, checkpoint):
    tok = load_tokenizer(checkpoint)
    from glm_jax.checkpoints import load_checkpoint

    cfg, params = load_checkpoint(checkpoint)
    prompt = tok.encode("In the beginning God created", add_special_tokens=False)
    expected = generate(GLMForCausalLM(cfg), params, np.asarray(prompt, np.int32), max_new_tokens=12,
                        temperature=0.0, stop_ids=tuple(tok.stop_ids))[len(prompt):].tolist()
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    done = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    want = expected[:next((i for i, t in enumerate(expected) if t in tok.stop_ids), len(expected))]
    assert done.choices[0].text == tok.decode(want)
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == len(
        expected[:len(want) + (len(want) < 12)])

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the heaven?"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    msg = whole.choices[0].message
    assert content == (msg.content or "")
    assert reasoning == (getattr(msg, "reasoning_content", None) or "")
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(ids)


def test_concurrent_clients_and_the_prefix_cache(server):
    c = client(server)
    system = "You answer questions about the verses of Genesis, in one short sentence, politely. " * 3
    asks = [f"Question number {i}: what is said in verse {i}?" for i in range(16)]

    def ask(q):
        r = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": system},
                                                              {"role": "user", "content": q}],
                                      max_tokens=8, temperature=0.7, seed=1)
        return r.choices[0].finish_reason

    hits_before = metric(server, "glm_jax_prefix_cache_hit_tokens")
    with ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(ask, asks))
    assert len(reasons) == 16 and set(reasons) <= {"stop", "length"}
    assert metric(server, "glm_jax_prefix_cache_hit_tokens") > hits_before
    assert metric(server, "glm_jax_requests_running") == 0 and metric(server, "glm_jax_kv_pages_used") == 0
    again = [c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": system},
                                                               {"role": "user", "content": asks[0]}],
                                       max_tokens=8, temperature=0).choices[0].message.content for _ in range(2)]
    assert again[0] == again[1]  # with the prefix cached and without (first call), the same greedy text


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]}, 400,
     "tools"),
    ({"model": "tiny", "prompt": [1, 10 ** 7]}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice.function.name"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice"),
])
def test_bad_requests_get_their_4xx_and_the_server_goes_on(server, body, status, param):
    route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    req = urllib.request.Request(server + route, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == status and err["param"] == param and err["message"], err
    bad_json = urllib.request.Request(server + route, data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad_json)
    assert e.value.code == 400
    assert client(server).completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].finish_reason


def test_forced_tool_calls_append_the_opening_of_a_call(server, checkpoint):
    """tool_choice "required" / named: the prompt ends with the start of a call in the model's format
    (`Tokenizer.tool_call_opening`), so the model can only go on writing that call."""
    tok = load_tokenizer(checkpoint)
    c = client(server)
    messages = [{"role": "user", "content": "Find psalm 23"}]
    base = len(tok.apply_chat_template(messages, tools=TOOLS))
    for choice, opening in [("required", "<tool_call>"), ({"type": "function", "function": {"name": "search"}},
                                                          "<tool_call>search\n")]:
        assert tok.tool_call_opening(messages, TOOLS, None if choice == "required" else "search").endswith(opening)
        r = c.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=choice,
                                      max_tokens=3, temperature=0)
        forced = tok.tool_call_opening(messages, TOOLS, None if choice == "required" else "search")
        assert r.usage.prompt_tokens == base + len(tok.encode(forced, add_special_tokens=False))
        assert r.choices[0].finish_reason == "length"


# and with speculative decoding: the MoE model with an MTP layer drafting, the MLA model with n-gram drafts
@pytest.mark.parametrize("preset,speculative", [("glm-moe-test", ["--speculative", "mtp", "--num-speculative-tokens", "2"]),
                                                ("glm-mla-test", ["--speculative", "ngram"])])
def test_moe_and_mla_servers_answer_as_generate(checkpoint, tmp_path, preset, speculative):
    cfg = GLMConfig.from_preset(preset, vocab_size=load_tokenizer(checkpoint).vocab_size, max_seq_len=512,
                                num_mtp_layers=int("mtp" in speculative))
    params = init_params(GLMForCausalLM(cfg), jax.random.key(1))
    ckpt = save_hf(cfg, params, tmp_path / preset, format="transformers")
    for f in checkpoint.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (ckpt / f.name).write_bytes(f.read_bytes())
    prompt = load_tokenizer(ckpt).encode("In the beginning God created", add_special_tokens=False)
    expected = generate(GLMForCausalLM(cfg), params, np.asarray(prompt, np.int32), max_new_tokens=10,
                        temperature=0.0)[len(prompt):].tolist()
    proc, url = start(ckpt, "--served-model-name", "tiny", *speculative)
    try:
        done = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 10
        assert done.choices[0].text == load_tokenizer(ckpt).decode(expected)
        steps = metric(url, "glm_jax_spec_verify_steps")
        assert 3 <= steps <= 9 and 1 <= metric(url, "glm_jax_spec_accept_length") <= 4
    finally:
        proc.kill()
        proc.wait()


def test_api_key_disconnect_and_sigterm(checkpoint):
    proc, url = start(checkpoint, "--api-key", "sekret", "--served-model-name", "tiny")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        c = client(url, api_key="sekret")
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell a story"}],
                                           max_tokens=200, stream=True, temperature=1.0)
        next(iter(stream))
        stream.close()  # the client goes away: its request is aborted
        for _ in range(100):
            if metric(url, "glm_jax_requests_running") == 0:
                break
            time.sleep(0.1)
        assert metric(url, "glm_jax_requests_running") == 0 and metric(url, "glm_jax_kv_pages_used") == 0
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(lambda: c.completions.create(model="tiny", prompt="Once", max_tokens=40,
                                                               temperature=0))
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)  # stop admitting, finish what runs, exit 0
            assert running.result(timeout=120).choices[0].finish_reason
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


def test_embeddings_equal_glm_jax_embed(server, checkpoint):
    """POST /v1/embeddings through the client (base64, its default, and float): the served model's pooled,
    normalised final hidden states, equal to glm_jax.embed for strings and token ids; usage counts the tokens;
    a wrong `dimensions`, an empty or too long input: 400 naming the field."""
    from glm_jax import embed
    from glm_jax.checkpoints import load_checkpoint

    tok = load_tokenizer(checkpoint)
    cfg, params = load_checkpoint(checkpoint)
    texts = ["In the beginning God created the heaven and the earth.", "And the earth was without form"]
    expected = embed(GLMForCausalLM(cfg), params, texts, tokenizer=tok)
    c = client(server)
    got = c.embeddings.create(model="tiny", input=texts)
    assert [d.index for d in got.data] == [0, 1]
    np.testing.assert_allclose(np.asarray([d.embedding for d in got.data]), expected, atol=1e-5)
    ids = tok.encode(texts[1], add_special_tokens=False)
    floats = c.embeddings.create(model="tiny", input=[ids], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, embed(GLMForCausalLM(cfg), params, [ids])[0], atol=1e-5)
    assert floats.usage.prompt_tokens == len(ids) and len(floats.data[0].embedding) == cfg.hidden_size
    for bad, param in [(dict(input="x", dimensions=3), "dimensions"), (dict(input=""), "input"),
                       (dict(input=[[5] * 600]), "input"), (dict(input="x", model="other"), "model")]:
        with pytest.raises(openai.APIStatusError) as e:
            c.embeddings.create(**{"model": "tiny", **bad})
        assert e.value.status_code in (400, 404) and e.value.body["param"] == param


def test_grounded_chat_requests_carry_the_passages_and_their_sources(server, checkpoint, knowledge_index):
    """"knowledge" in a chat request: the server's index is searched for the last user message, the passages go
    into the prompt before it (glm_jax.knowledge.grounding, as ChatSession does; as many of the best as leave
    room for max_tokens) and come back as "sources" (the whole response, or the first chunk of a stream); a mode
    the index cannot serve or a bad k: 400."""
    from glm_jax.knowledge import grounded_messages

    index, _ = knowledge_index
    tok = load_tokenizer(checkpoint)
    question = "Which planet has the Great Red Spot?"
    hits = index.search(question, k=3)
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                      extra_body={"knowledge": {"k": 3}})
    sources = whole.model_extra["sources"]
    # this BPE of 600 tokens spends about 250 on a passage: of 3 hits only the best fit the 512-token context
    n = len(sources)
    assert 1 <= n < 3 and [s["rank"] for s in sources] == list(range(1, n + 1))
    assert sources[0]["headings"][-1] == "Jupiter"
    assert [s["text"] for s in sources] == [h.passage.text for h in hits[:n]]
    grounded = messages[:1] + grounded_messages(tok, question, hits[:n])
    assert whole.usage.prompt_tokens == len(tok.apply_chat_template(grounded, add_generation_prompt=True)) <= 512 - 4
    more = messages[:1] + grounded_messages(tok, question, hits[:n + 1])
    assert len(tok.apply_chat_template(more, add_generation_prompt=True)) > 512 - 4  # one more would not fit
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                            stream=True, extra_body={"knowledge": {"k": 1, "mode": "bm25"}}))
    assert chunks[0].model_extra["sources"] == sources[:1] and "sources" not in chunks[1].model_extra
    for bad, param in [({"mode": "dense"}, "knowledge.mode"), ({"k": 0}, "knowledge.k")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={"knowledge": bad})
        assert e.value.body["param"] == param


def test_a_chatglm_6b_server_chats_and_fills_blanks_as_generate(tmp_path):
    """ChatGLM-6B (2D positions) behind the server: a THUDM-layout checkpoint with its ice_text.model; the chat
    answer is generate's on its [Round] prompt, a completion of a text holding [MASK] fills the blank as generate
    does on tokenizer.encode(text) (the engine prefills the bidirectional context in one chunk, prefix caching
    off)."""
    from glm_jax.tokenizers import CHATGLM6B_VOCABULARY

    cfg = GLMConfig.from_preset("chatglm-6b-tiny", hidden_size=64, ffn_hidden_size=160, num_layers=2, num_heads=4,
                                num_kv_heads=4, head_dim=16)
    params = jax.jit(lambda k: jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x,
                                            init_params(GLMForCausalLM(cfg), k)))(jax.random.key(2))
    ckpt = save_hf(cfg, params, tmp_path / "chatglm-6b-tiny", format="thudm")
    for name in ("ice_text.model", "tokenizer_config.json"):
        (ckpt / name).write_bytes((CHATGLM6B_VOCABULARY / name).read_bytes())
    tok = load_tokenizer(ckpt)
    model = GLMForCausalLM(cfg)

    def expected(ids, n):
        return generate(model, params, np.asarray(ids, np.int32), max_new_tokens=n, temperature=0.0)[len(ids):]

    proc, url = start(ckpt, "--served-model-name", "tiny", "--prefill-chunk", "16")
    try:
        messages = [{"role": "user", "content": "你好，请介绍一下北京。"}]
        reply = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        ids = expected(tok.apply_chat_template(messages), 12).tolist()
        ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        assert reply.choices[0].message.content == tok.parse_reply(ids)["content"] != ""
        text = "In the beginning God created the [MASK] and the earth. And the earth was without form, and void."
        done = client(url).completions.create(model="tiny", prompt=text, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert done.usage.prompt_tokens == len(tok.encode(text)) > 16  # a context longer than one prefill chunk
        assert done.choices[0].text == tok.decode(expected(tok.encode(text), 8).tolist())
    finally:
        proc.kill()
        proc.wait()
