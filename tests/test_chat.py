"""ChatSession and the chat CLI, one session for every family: ChatGLM3 (its prompts checked against THUDM's
`build_chat_input` of the same conversation) and GLM-4.5 through `load_tokenizer` (OpenAI messages, tool_calls,
tool results, /think and /nothink)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from glm_jax import GLMConfig, GLMForCausalLM, init_params, save_hf
from glm_jax import chat as C
from glm_jax import generation as G

pytest.importorskip("sentencepiece")
from glm_jax.tokenizers import ChatGLMTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def tok():
    return ChatGLMTokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    """A random model whose (padded) vocabulary covers the ChatGLM3 tokenizer."""
    cfg = GLMConfig.from_preset("glm-test", vocab_size=65024, max_seq_len=512)
    model = GLMForCausalLM(cfg)
    params = jax.jit(lambda k: jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, init_params(model, k)))(
        jax.random.key(0))
    return cfg, model, params


class Scripted:
    """Stands in for `glm_jax.generation.stream_generate`: replays scripted replies, records each call."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, list(replies), []

    def __call__(self, model, params, input_ids, **kw):
        self.calls.append((np.asarray(input_ids).tolist(), kw))
        text, stop = self.replies.pop(0)
        ids = self.tok.encode(text, add_special_tokens=False) + ([self.tok.get_command(stop)] if stop else [])
        yield from ids[:kw["max_new_tokens"]]


def test_session_with_random_model(tok, tiny, monkeypatch):
    """The real loop on a random model: prompts grow with the history, replies are recorded, ids stay in vocab."""
    cfg, model, params = tiny
    session = C.ChatSession(model, params, tok, system="You are terse.", max_new_tokens=6, temperature=0.0)
    spy = []
    real = G.stream_generate

    def spying(*a, **kw):
        spy.append((np.asarray(a[2]).tolist(), kw))
        return real(*a, **kw)

    monkeypatch.setattr(C._generate, "stream_generate", spying)
    pieces = list(session.stream("Hello there"))
    first = session.last_reply
    second = session.send("And again?")
    assert first["type"] == "text" and "".join(pieces) == first["content"]
    assert second["type"] == "text"
    assert 0 < len(session.last_ids) <= 6 and all(i < tok.vocab_size for i in session.last_ids)
    roles = [m["role"] for m in session.history]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == "Hello there"
    # The second prompt is the first conversation plus the new message, encoded the ChatGLM3 way.
    (p1, kw1), (p2, kw2) = spy
    assert p1 == tok.build_chat_input("Hello there", history=session.history[:1])
    assert p2 == tok.build_chat_input("And again?", history=session.history[:3])
    assert p2[:len(p1)] == p1
    assert list(kw1["stop_ids"]) == tok.stop_ids and kw1["pad_id"] == tok.pad_token_id
    assert kw1["seed"] != kw2["seed"]
    # Greedy and deterministic: a fresh session replays the same first reply.
    again = C.ChatSession(model, params, tok, system="You are terse.", max_new_tokens=6, temperature=0.0)
    assert again.send("Hello there") == first
    session.reset()
    assert session.history == [{"role": "system", "content": "You are terse."}]


def test_tool_call_and_observation(tok, monkeypatch):
    """ChatGLM3 through the common session: OpenAI history, and every prompt equal to THUDM's `build_chat_input`
    of the ChatGLM3 conversation THUDM's `model.chat` would have kept."""
    script = Scripted(tok, [
        ("get_weather\n```python\ntool_call(city='Paris')\n```", "<|observation|>"),
        ("\nIt is 21 degrees in Paris.", "<|user|>"),
    ])
    monkeypatch.setattr(C._generate, "stream_generate", script)
    session = C.ChatSession(object(), None, tok, tools=TOOLS, max_new_tokens=64)
    streamed = list(session.stream("Weather in Paris?"))
    call = session.last_reply
    assert streamed == []  # a call is not streamed as text
    assert call["type"] == "tool_call" and call["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert session.pending_tool_call is call
    assert tok.get_command("<|observation|>") not in session.last_ids  # the stop id is not part of the reply
    pieces = list(session.stream_observe({"temperature": 21}))
    reply = session.last_reply
    assert reply == {"type": "text", "content": "It is 21 degrees in Paris.", "reasoning_content": None,
                     "tool_calls": []}
    assert "".join(pieces) == reply["content"] and len(pieces) > 1  # streamed token by token
    assert session.pending_tool_call is None
    assert session.history == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": call["tool_calls"]},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]
    thudm = [{"role": "system", "content": "Answer the following questions as best as you can. You have access to "
                                          "the following tools:", "tools": TOOLS}]
    assert script.calls[0][0] == tok.build_chat_input("Weather in Paris?", history=thudm)
    thudm += [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Paris')\n```"}]
    prompt = script.calls[1][0]
    assert prompt == tok.build_chat_input('{"temperature": 21}', history=thudm, role="observation")
    assert prompt[-1] == tok.get_command("<|assistant|>")


def test_interrupted_and_malformed_replies(tok, monkeypatch):
    script = Scripted(tok, [("\nOne two three four five six", "<|user|>"), ("lookup\nnot a call at all", None)])
    monkeypatch.setattr(C._generate, "stream_generate", script)
    session = C.ChatSession(object(), None, tok, max_new_tokens=64)
    it = session.stream("count")
    next(it)
    it.close()  # the user interrupts: the partial reply is recorded
    assert session.last_reply.get("interrupted") and session.history[-1]["role"] == "assistant"
    reply = session.send("look something up")  # a header line but no tool_call(...): kept as text
    assert reply["type"] == "text" and reply["content"] == "lookup\nnot a call at all"
    with pytest.raises(ValueError, match="role"):
        session.send("x", role="assistant")
    with pytest.raises(TypeError, match="glm_jax.Tokenizer"):
        C.ChatSession(object(), None, tok.sp_model)


def test_cli_drives_a_checkpoint(tok, tiny, tmp_path):
    cfg, model, params = tiny
    ckpt = save_hf(cfg, params, tmp_path / "ckpt", format="thudm")
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run(
        [sys.executable, "-m", "glm_jax.chat", "--checkpoint", str(ckpt), "--max-new-tokens", "5",
         "--temperature", "0.9", "--top-p", "0.8", "--tools", str(tmp_path / "tools.json")],
        input="Hello\n/reset\nHi again\n/exit\n", env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    out = r.stdout
    assert out.count("Assistant: ") == 2 and "(conversation reset)" in out and out.rstrip().endswith("bye")
    assert "Hi again" in out


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "run" / "100").mkdir(parents=True)
    assert C.main(["--checkpoint", str(tmp_path / "run")]) == 2
    assert "orbax" in capsys.readouterr().err
    assert C.main(["--checkpoint", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------------- any family
# A GLM-4.5/4.6 tokenizer.json (tests/tokenizer_fixtures.py) with a tiny glm4 / glm4_moe model: OpenAI messages,
# the checkpoint's chat template, reply parsing, tool results, thinking switches.

import io  # noqa: E402

import tokenizer_fixtures as fx  # noqa: E402
from glm_jax import load_tokenizer  # noqa: E402

OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL_REPLY = ("\n<think>The user wants the weather.</think>\nChecking.\n<tool_call>get_weather\n"
              "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")


@pytest.fixture(scope="module")
def glm45_dir(tmp_path_factory):
    return fx.write_hf(fx.train_bpe(600), tmp_path_factory.mktemp("glm45_chat"), "glm45.jinja", in_config=False)


class ScriptedText:
    """`stream_generate` replaying replies given as text + a stop token, for any tokenizer."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, list(replies), []

    def __call__(self, model, params, input_ids, **kw):
        self.calls.append((np.asarray(input_ids).tolist(), kw))
        text, stop = self.replies.pop(0)
        yield from self.tok.encode(text, add_special_tokens=False) + [self.tok.special_tokens[stop]]


def test_tool_call_parsed_into_tool_calls_and_tool_results(glm45_dir, monkeypatch):
    from transformers import AutoTokenizer

    tok = load_tokenizer(glm45_dir)
    script = ScriptedText(tok, [(CALL_REPLY, "<|observation|>"), ("\n<think></think>\nSunny, 21C.", "<|user|>")])
    monkeypatch.setattr(C._generate, "stream_generate", script)
    session = C.ChatSession(object(), None, tok, system="Be brief.", tools=OPENAI_TOOLS)
    events = list(session.stream_events("Weather in Paris for 2 days?"))
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    assert session.last_reply == {"type": "tool_call", "content": "Checking.",
                                  "reasoning_content": "The user wants the weather.", "tool_calls": [call]}
    kinds = [e["type"] for e in events]
    assert kinds.index("reasoning") < kinds.index("content") < kinds.index("tool_call")
    assert "".join(e["text"] for e in events if e["type"] == "reasoning") == "The user wants the weather."
    assert session.pending_tool_call is session.last_reply
    assert tok.special_tokens["<|observation|>"] not in session.last_ids
    reply = session.observe({"temp": 21})
    assert reply == {"type": "text", "content": "Sunny, 21C.", "reasoning_content": "", "tool_calls": []}
    assert session.history[1:] == [
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "The user wants the weather.",
         "tool_calls": [call]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "Sunny, 21C.", "reasoning_content": ""}]
    # Each prompt is transformers' rendering of the conversation so far, from the same directory.
    ref = AutoTokenizer.from_pretrained(glm45_dir)
    for (prompt, kw), n in zip(script.calls, (2, 4)):
        expected = ref.apply_chat_template(session.history[:n], tools=OPENAI_TOOLS, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
        assert prompt == list(expected)
        assert list(kw["stop_ids"]) == tok.stop_ids
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in tok.decode(script.calls[1][0])


def test_think_and_nothink_change_the_prompt(glm45_dir, monkeypatch):
    tok = load_tokenizer(glm45_dir)
    script = ScriptedText(tok, [("\nA.", "<|user|>"), ("\n<think></think>\nB.", "<|user|>"),
                                ("\n<think>Hmm.</think>\nC.", "<|user|>")])
    monkeypatch.setattr(C._generate, "stream_generate", script)
    session = C.ChatSession(object(), None, tok)
    out = io.StringIO()
    assert C.run_cli(session, stdin=io.StringIO("one\n/nothink\ntwo\n/think\nthree\n/exit\n"), out=out) == 0
    default, off, on = (tok.decode(p) for p, _ in script.calls)
    assert off.endswith("two/nothink<|assistant|>\n<think></think>")
    assert on.endswith("three<|assistant|>") and default.endswith("one<|assistant|>")
    text = out.getvalue()
    assert "(thinking off)" in text and "(thinking on)" in text and "[thinking] Hmm." in text
    assert session.last_reply["reasoning_content"] == "Hmm." and session.last_reply["content"] == "C."
    session.enable_thinking = False  # the same switch through the API
    assert tok.decode(session.prompt([{"role": "user", "content": "x"}])).endswith("<|assistant|>\n<think></think>")


def test_real_glm4_model_and_cli_on_a_checkpoint_with_tokenizer_json(glm45_dir, tmp_path, monkeypatch, capsys):
    """The real generation loop on a random glm4 (GLM-4-0414 layout) model, and the CLI on its transformers
    checkpoint holding the tokenizer.json."""
    tok = load_tokenizer(glm45_dir)
    cfg = GLMConfig.from_preset("glm-test", vocab_size=640, sandwich_norm=True)
    ckpt = save_hf(cfg, init_params(GLMForCausalLM(cfg), jax.random.key(0)), tmp_path / "ckpt", format="transformers")
    for f in glm45_dir.iterdir():
        if f.name != "generation_config.json":
            (ckpt / f.name).write_bytes(f.read_bytes())
    assert C.default_tokenizer(ckpt) == ckpt
    cfg, params = C.load_checkpoint(ckpt)  # the model the CLI builds: its generation compiles once
    session = C.ChatSession(GLMForCausalLM(cfg), params, tok, enable_thinking=False, max_new_tokens=4,
                            temperature=0.0)
    reply = session.send("Hello")
    assert 0 < len(session.last_ids) <= 4 and all(i < tok.vocab_size for i in session.last_ids)
    assert set(reply) == {"type", "content", "reasoning_content", "tool_calls"}
    monkeypatch.setattr(sys, "stdin", io.StringIO("/nothink\nHello\n/exit\n"))
    assert C.main(["--checkpoint", str(ckpt), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "(thinking off)" in out and out.count("Assistant: ") == 1 and out.rstrip().endswith("bye")


def test_sessions_keep_the_cache_between_turns_without_changing_replies(glm45_dir):
    """A session keeps its decode cache between turns (the default) and samples what a session that re-runs the
    whole conversation each turn samples; from the second turn on it runs only the new tokens."""
    tok = load_tokenizer(glm45_dir)
    cfg = GLMConfig.from_preset("glm-test", vocab_size=640)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(1))
    kept, rerun = (C.ChatSession(model, params, tok, system="Be brief.", tools=OPENAI_TOOLS, max_new_tokens=8,
                                 reuse_cache=reuse) for reuse in (True, False))
    assert rerun.conversation is None
    for turn, text in enumerate(["Hello", "Weather in Paris?", "And in Rome?"]):
        assert kept.send(text) == rerun.send(text) and kept.last_ids == rerun.last_ids
        assert (kept.conversation.reused > 0) == (turn > 0), (turn, kept.conversation.reused)
        assert kept.conversation.reused < len(kept.last_prompt)


def test_default_tokenizer_of_a_run_directory(glm45_dir, tmp_path):
    """A train.py run directory chats with the tokenizer it trained with: data.tokenizer, else model.init_from's."""
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": str(glm45_dir / "tokenizer.json")}}))
    assert C.default_tokenizer(run) == glm45_dir / "tokenizer.json"
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": None},
                                                     "model": {"init_from": str(glm45_dir)}}))
    assert C.default_tokenizer(run) == glm45_dir
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_from": str(tmp_path)}}))
    assert C.default_tokenizer(run) is None and C.default_tokenizer(tmp_path / "nowhere") is None


def test_speculative_sessions_reply_as_plain_ones(glm45_dir, tmp_path, capsys):
    """Greedy replies with n-gram speculative decoding equal a plain session's, turn after turn; the CLI's
    --speculative errors are one line naming the flag."""
    tok = load_tokenizer(glm45_dir)
    cfg = GLMConfig.from_preset("glm-test", vocab_size=640)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(1))
    plain, spec = (C.ChatSession(model, params, tok, system="Be brief.", max_new_tokens=8, temperature=0.0, **kw)
                   for kw in ({}, {"speculative": "ngram", "num_speculative_tokens": 2}))
    for text in ("Hello", "And now?"):
        assert spec.send(text) == plain.send(text)
        assert spec.last_ids == plain.last_ids and spec.last_ids
    with pytest.raises(ValueError, match="'mtp' needs a model with MTP layers"):
        C.ChatSession(model, params, tok, speculative="mtp")
    ckpt = save_hf(cfg, params, tmp_path / "ckpt", format="transformers")
    cli = ["--checkpoint", str(ckpt), "--tokenizer", str(glm45_dir)]
    assert C.main([*cli, "--speculative", "mtp"]) == 2
    assert "error: --speculative: 'mtp' needs a model with MTP layers" in capsys.readouterr().err
    assert C.main([*cli, "--speculative", "ngram", "--num-speculative-tokens", "40"]) == 2
    assert "error: --num-speculative-tokens: must be in [1, 16], got 40" in capsys.readouterr().err
