"""`glm_jax.load_tokenizer` for every GLM generation (docs/tokenizer.md): small tokenizers of each kind built
from the shipped corpus (tests/tokenizer_fixtures.py), checked against the reference libraries (sentencepiece,
tiktoken via transformers' converter, HF tokenizers) and against transformers' `apply_chat_template` on the same
directory with the published GLM chat templates (tests/fixtures/chat_templates)."""

import json
import random
import shutil

import pytest
import sentencepiece as spm

import tokenizer_fixtures as fx
from glm_jax import load_tokenizer
from glm_jax.tokenizers import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, parsers
from glm_jax.tokenizers.formats import openai_to_glm4, parse_arguments
from glm_jax.tokenizers.sentencepiece import DEFAULT_MODEL_FILE

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "查询天气",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
            "zip": {"type": "string"}, "ratio": {"type": "number"}, "tags": {"type": "array"},
            "opts": {"type": "object"}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}},
]
CALL_ARGS = {"city": "北京", "days": 3, "metric": True, "zip": "007", "ratio": 2.5, "tags": ["a", "b c"],
             "opts": {"n": -1, "deep": None}}
CONVERSATIONS = {
    "multi_turn": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "In the beginning God created the heavens and the earth. 起初神创造天地。"},
        {"role": "assistant", "content": "Genesis 1:1.", "reasoning_content": "The first verse."},
        {"role": "user", "content": "And the next verse? <|user|> is plain text here"},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in 北京 and 上海?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "Two calls.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}]},
        {"role": "tool", "content": '{"forecast": ["晴", "雨"]}'},
        {"role": "tool", "content": "cloudy, 12C"},
        {"role": "assistant", "content": "Sunny in Beijing, cloudy in Shanghai.", "reasoning_content": "Summarise."},
        {"role": "user", "content": "Thanks!"},
    ],
    "after_tool": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "search psalms 23"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": '{"q": "Psalms 23:1"}'}}]},
        {"role": "tool", "content": "耶和华是我的牧者"},
    ],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The checkpoint directories of tokenizer_fixtures, from one BPE trained on the corpus."""
    root = tmp_path_factory.mktemp("tokenizers")
    bpe = fx.train_bpe(2000)
    return {"glm4_9b": fx.write_glm4_9b(bpe, root / "glm4_9b"),
            "glm45": fx.write_hf(bpe, root / "glm45", "glm45.jinja", in_config=False),
            "glm46": fx.write_hf(bpe, root / "glm46", "glm46.jinja", in_config=False),
            "glm47": fx.write_hf(bpe, root / "glm47", "glm47.jinja", in_config=False),
            "glm_z1": fx.write_hf(bpe, root / "glm_z1", "glm_z1_0414.jinja", in_config=True)}


@pytest.fixture(scope="module")
def reference(built):
    """transformers' tokenizer for each directory."""
    from transformers import AutoTokenizer

    return {"glm4_9b": fx.transformers_glm4_9b(built["glm4_9b"]),
            "glm45": AutoTokenizer.from_pretrained(built["glm45"]),
            "glm46": AutoTokenizer.from_pretrained(built["glm46"]),
            "glm47": AutoTokenizer.from_pretrained(built["glm47"]),
            "glm_z1": AutoTokenizer.from_pretrained(built["glm_z1"])}


def ids_of(encoding):
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


# ---------------------------------------------------------------------------------------------------- loading

def test_load_tokenizer_detects_each_kind(built, tmp_path):
    sp_dir = tmp_path / "chatglm3"
    sp_dir.mkdir()
    shutil.copy(DEFAULT_MODEL_FILE, sp_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(DEFAULT_MODEL_FILE), SentencePieceTokenizer)
    tik = load_tokenizer(built["glm4_9b"])
    assert isinstance(tik, TiktokenTokenizer) and tik.reply_format == "glm4"
    assert isinstance(load_tokenizer(built["glm4_9b"] / "tokenizer.model"), TiktokenTokenizer)
    glm45, z1 = load_tokenizer(built["glm45"]), load_tokenizer(built["glm_z1"])
    assert isinstance(glm45, HFTokenizer) and glm45.reply_format == "glm45"
    assert isinstance(z1, HFTokenizer) and z1.reply_format == "glm4"
    assert isinstance(load_tokenizer(built["glm45"] / "tokenizer.json"), HFTokenizer)


@pytest.mark.parametrize("name, data", [("tokenizer.model", b"\x00\x01garbage" * 10),
                                         ("tokenizer.json", b'{"not": "a tokenizer"}'),
                                         ("tokenizer.model", b"QUJD notanumber\n")])
def test_unknown_files_give_one_line_naming_the_file(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, tokenizer.model or ice_text.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------- encode

def test_sentencepiece_encode_decode_whole_corpus():
    tok, sp = load_tokenizer(DEFAULT_MODEL_FILE), spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL_FILE))
    for text in fx.corpus_text():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text


def test_tiktoken_and_tokenizers_agree_on_the_whole_corpus(built):
    """The same BPE saved as a tiktoken file and as tokenizer.json: two independent implementations."""
    tik, hf = load_tokenizer(built["glm4_9b"]), load_tokenizer(built["glm45"])
    for text in fx.corpus_text():
        ids = tik.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tik.decode(ids) == hf.decode(ids) == text
        assert max(ids) < 2000  # ordinary text never yields an added token


@pytest.mark.parametrize("name", ["glm4_9b", "glm45"])
def test_encode_decode_equal_transformers(built, reference, name):
    tok, ref = load_tokenizer(built[name]), reference[name]
    texts = [text[:30000] for text in fx.corpus_text()] + ["  spaces\t\ttabs\r\n\n 2024 ... émoji 😀 𝔘"]
    assert tok.encode(texts, add_special_tokens=False) == [ref.encode(t, add_special_tokens=False) for t in texts]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(ids[:-1]) == ref.decode(ids[:-1])  # a cut UTF-8 sequence decodes alike


def test_tiktoken_file_is_read_by_tiktoken_itself(built):
    import tiktoken

    from glm_jax.tokenizers.tiktoken_bpe import GLM4_PATTERN, read_tiktoken_ranks

    enc = tiktoken.Encoding("ref", pat_str=GLM4_PATTERN, special_tokens={},
                            mergeable_ranks=read_tiktoken_ranks(built["glm4_9b"] / "tokenizer.model"))
    tok = load_tokenizer(built["glm4_9b"])
    text = fx.corpus_text()[0][:20000]
    assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(text)
    assert tok.encode(text)[:2] == [tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]]


@pytest.mark.parametrize("name", ["glm4_9b", "glm45"])
def test_special_tokens_and_decode_skipping(built, reference, name):
    tok, ref = load_tokenizer(built[name]), reference[name]
    text = "[gMASK]<sop><|user|>\n你好 <think>x</think><|assistant|>ok<|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.eos_token_id == tok.pad_token_id == tok.special_tokens["<|endoftext|>"] == ref.eos_token_id
    assert tok.stop_ids == [tok.special_tokens[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]


def test_batch_encode_left_pads_with_the_pad_token(built):
    tok = load_tokenizer(built["glm45"])
    batch = tok.batch_encode(["hi", "In the beginning God created"], pad_to_multiple_of=8)
    long = tok.encode("In the beginning God created")
    short = tok.encode("hi")
    assert batch["input_ids"].shape == (2, -(-len(long) // 8) * 8)
    row = batch["input_ids"][0].tolist()
    assert row[-len(short):] == short and set(row[:-len(short)]) == {tok.pad_token_id}
    assert batch["position_ids"][0, -len(short):].tolist() == list(range(len(short)))
    assert batch["attention_mask"].sum(1).tolist() == [len(short), len(long)]


# ---------------------------------------------------------------------------------------------------- chat

@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", ["glm45", "glm46", "glm47", "glm_z1", "glm4_9b"])
def test_chat_ids_equal_transformers(built, reference, name, conversation, thinking):
    tok, ref = load_tokenizer(built[name]), reference[name]
    messages = CONVERSATIONS[conversation]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    for tools in (None, TOOLS):
        # GLM-4 dialect templates read tool calls as `metadata` messages: transformers gets the converted history.
        ref_messages = (parse_arguments(messages) if name in ("glm45", "glm46", "glm47")
                        else openai_to_glm4(messages, tools, name == "glm4_9b"))
        for prompt in (True, False):
            ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                           enable_thinking=thinking)
            theirs = ref.apply_chat_template(ref_messages, tools=tools, add_generation_prompt=prompt, **kwargs)
            assert ours == ids_of(theirs), (tools is not None, prompt)
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, enable_thinking=thinking)
    assert tok.encode(text, add_special_tokens=False) == tok.apply_chat_template(messages, tools=TOOLS,
                                                                                 enable_thinking=thinking)


def test_glm45_thinking_switch_and_history(built):
    tok = load_tokenizer(built["glm45"])
    messages = CONVERSATIONS["multi_turn"]
    off = tok.apply_chat_template(messages, enable_thinking=False, tokenize=False)
    assert off.endswith("And the next verse? <|user|> is plain text here/nothink<|assistant|>\n<think></think>")
    on = tok.apply_chat_template(messages, tokenize=False)
    assert on.endswith("<|assistant|>") and "/nothink" not in on
    # Reasoning of turns before the last user message is not shown again.
    assert "<think></think>\nGenesis 1:1." in on and "The first verse" not in on
    calls = tok.apply_chat_template(CONVERSATIONS["tool_calls"], tools=TOOLS, tokenize=False)
    assert calls.count("<|observation|>") == 1 and calls.count("<tool_response>") == 2


def test_glm4_dialect_conversion_and_native_messages(built, reference):
    converted = openai_to_glm4(CONVERSATIONS["after_tool"], None)
    assert converted[2:] == [{"role": "assistant", "metadata": "search", "content": '{"q": "Psalms 23:1"}'},
                             {"role": "observation", "content": "耶和华是我的牧者"}]
    assert openai_to_glm4(converted, None) == converted  # the GLM-4 dialect itself passes unchanged
    tok, ref = load_tokenizer(built["glm_z1"]), reference["glm_z1"]
    assert tok.apply_chat_template(converted) == ids_of(ref.apply_chat_template(converted,
                                                                                add_generation_prompt=True))


def test_builtin_glm4_format_without_a_template(built, tmp_path):
    shutil.copy(built["glm4_9b"] / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None and tok.special_tokens["<|endoftext|>"] == 2000
    text = tok.apply_chat_template(CONVERSATIONS["after_tool"], tokenize=False)
    assert text == ("[gMASK]<sop><|system|>\nUse tools.<|user|>\nsearch psalms 23<|assistant|>search\n"
                    '{"q": "Psalms 23:1"}<|observation|>\n耶和华是我的牧者<|assistant|>')
    with_tools = tok.apply_chat_template(CONVERSATIONS["after_tool"], tools=TOOLS[1:], tokenize=False)
    assert with_tools.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## search\n\n{\n    \"name\": \"search\"")
    hf_only = tmp_path / "hf"
    hf_only.mkdir()
    shutil.copy(built["glm45"] / "tokenizer.json", hf_only / "tokenizer.json")
    with pytest.raises(ValueError, match="ships no chat template"):
        load_tokenizer(hf_only).apply_chat_template([{"role": "user", "content": "x"}])


def test_chatglm3_maps_openai_messages_onto_its_roles():
    tok = load_tokenizer(DEFAULT_MODEL_FILE)
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL_FILE))
    n = sp.get_piece_size()
    gmask, sop, system, user, assistant, observation = n + 1, n + 3, n + 5, n + 6, n + 7, n + 8
    tools = [TOOLS[1]["function"]]
    system_text = "Use tools.\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    expected = ([gmask, sop, system] + sp.encode("\n") + sp.encode(system_text)
                + [user] + sp.encode("\n") + sp.encode("search psalms 23")
                + [assistant] + sp.encode("search\n") + sp.encode("```python\ntool_call(q='Psalms 23:1')\n```")
                + [observation] + sp.encode("\n") + sp.encode("耶和华是我的牧者") + [assistant])
    assert tok.apply_chat_template(CONVERSATIONS["after_tool"], tools=TOOLS[1:]) == expected
    assert tok.apply_chat_template(CONVERSATIONS["after_tool"], tools=TOOLS[1:], add_generation_prompt=False) \
        == expected[:-1]
    assert tok.stop_ids == [2, user, observation]


# ---------------------------------------------------------------------------------------------------- replies

def assistant_turn(tok, message, tools):
    """The text the GLM-4.5 template writes for one assistant message (what the model is trained to emit)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], tools=tools, tokenize=False)
    full = tok.apply_chat_template([{"role": "user", "content": "q"}, message], tools=tools, tokenize=False,
                                   add_generation_prompt=False)
    return full[len(prompt):]


def test_glm45_parser_recovers_typed_arguments_from_the_template(built):
    tok = load_tokenizer(built["glm45"])
    message = CONVERSATIONS["tool_calls"][1]
    message = {**message, "tool_calls": message["tool_calls"] + [
        {"type": "function", "function": {"name": "search", "arguments": {"q": "true"}}}]}
    text = assistant_turn(tok, message, TOOLS)
    assert '<arg_value>007</arg_value>' in text and '<arg_value>{"n": -1, "deep": null}</arg_value>' in text
    parsed = tok.parse_reply(text, tools=TOOLS)
    assert parsed["reasoning_content"] == "Two calls." and parsed["content"] == "Let me check."
    assert [c["function"]["arguments"] for c in parsed["tool_calls"]] == [CALL_ARGS, {"city": "上海"}, {"q": "true"}]
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["get_weather", "get_weather", "search"]
    # Without schemas values are read as JSON where they parse: "007" is not JSON, so it stays text.
    untyped = tok.parse_reply(text)["tool_calls"][0]["function"]["arguments"]
    assert untyped["zip"] == "007" and untyped["days"] == 3 and untyped["city"] == "北京"
    assert tok.parse_reply(text)["tool_calls"][2]["function"]["arguments"] == {"q": True}
    # From ids, with the stop id the model ends on.
    ids = tok.encode(text, add_special_tokens=False) + [tok.special_tokens["<|observation|>"]]
    assert tok.parse_reply(ids, tools=TOOLS) == parsed


def test_glm45_values_follow_the_schema():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": ["string", "null"]}, "n": {"type": ["string", "null"]}, "i": {"type": "integer"},
        "x": {"type": "number"}}}}}]
    text = ("<tool_call>f<arg_key>s</arg_key><arg_value>123</arg_value><arg_key>n</arg_key><arg_value>null"
            "</arg_value><arg_key>i</arg_key><arg_value> 7 </arg_value><arg_key>x</arg_key><arg_value>not a number"
            "</arg_value><arg_key>extra</arg_key><arg_value>[1, 'two']</arg_value></tool_call>")
    args = parsers.parse("glm45", text, tools)["tool_calls"][0]["function"]["arguments"]
    assert args == {"s": "123", "n": None, "i": 7, "x": "not a number", "extra": [1, "two"]}


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think>\nb", ("b", "a")),
    ("a</think>b", ("b", "a")),                      # the prompt opened <think>: the reply starts inside it
    ("\n<think></think>\nplain", ("plain", "")),
    ("just text", ("just text", None)),
    ("<think>cut off", ("", "cut off")),
])
def test_glm45_reasoning(text, expected):
    parsed = parsers.parse("glm45", text)
    assert (parsed["content"], parsed["reasoning_content"]) == expected and parsed["tool_calls"] == []


@pytest.mark.parametrize("text", [
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>x",          # unclosed
    "<tool_call>get_weather<arg_key>city</arg_key>oops</tool_call>",      # value missing
    "<tool_call></tool_call>",                                            # no name
    "<tool_call>bad name\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "</think></think><tool_call><tool_call>x</tool_call>",
])
def test_glm45_malformed_calls_stay_content(text):
    parsed = parsers.parse("glm45", text, TOOLS)
    assert parsed["tool_calls"] == [] and parsed["content"]


def test_glm4_parser(built):
    tok = load_tokenizer(built["glm4_9b"])
    assert tok.parse_reply('get_weather\n{"city": "北京", "days": 3}') == {
        "content": "", "reasoning_content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                         "arguments": {"city": "北京", "days": 3}}}]}
    assert tok.parse_reply("\nHello there.\n")["content"] == "Hello there."
    two = tok.parse_reply('search\n{"q": "a"}<|assistant|>search\n{"q": "b"}')
    assert [c["function"]["arguments"]["q"] for c in two["tool_calls"]] == ["a", "b"]
    assert tok.parse_reply("get_weather\n{not json")["content"] == "get_weather\n{not json"
    assert tok.parse_reply("Two lines\nof text")["content"] == "Two lines\nof text"
    z1 = load_tokenizer(built["glm_z1"]).parse_reply("think hard</think>\nAnswer.")
    assert (z1["reasoning_content"], z1["content"]) == ("think hard", "Answer.")
    ids = tok.encode('\nHi', add_special_tokens=False) + [tok.special_tokens["<|user|>"]]
    assert tok.parse_reply(ids)["content"] == "Hi"


def test_chatglm3_parser():
    tok = load_tokenizer(DEFAULT_MODEL_FILE)
    call = tok.parse_reply("get_weather\n```python\ntool_call(city='Beijing', days=3)\n```")
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                    "arguments": {"city": "Beijing", "days": 3}}}]
    code = tok.parse_reply("interpreter\n```python\nprint(1)\n```")["tool_calls"][0]["function"]
    assert code == {"name": "interpreter", "arguments": {"code": "print(1)"}}
    assert tok.parse_reply("\n Hello.")["content"] == "Hello."
    bad = "get_weather\n```python\ntool_call(x=__import__('os'))\n```"
    assert tok.parse_reply(bad) == {"content": bad, "reasoning_content": None, "tool_calls": []}


REPLIES = {
    "glm45": "<think>Plan: call.</think>\nChecking now. <tool_call>get_weather\n<arg_key>city</arg_key>\n"
             "<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
             "<tool_call>search<arg_key>q</arg_key><arg_value>x < y</arg_value></tool_call> Done.",
    "glm4": '\nLet me look.<|assistant|>get_weather\n{"city": "北京", "days": 3}',
    "chatglm3": "get_weather\n```python\ntool_call(city='北京', days=3)\n```",
}


@pytest.mark.parametrize("fmt", sorted(REPLIES))
def test_parsers_never_raise_on_truncated_or_mangled_replies(fmt):
    text = REPLIES[fmt]
    rng = random.Random(0)
    variants = [text[:i] for i in range(len(text) + 1)]
    variants += ["".join(rng.sample(text, len(text))) for _ in range(20)]
    variants += [text.replace("<", "", k) for k in range(1, 5)] + [text * 2, "", "\n", "<think>", "</tool_call>"]
    for v in variants:
        parsed = parsers.parse(fmt, v, TOOLS)
        assert set(parsed) == {"content", "reasoning_content", "tool_calls"}
        stream = parsers.StreamParser(fmt, TOOLS)
        for ch in v:
            stream.feed(ch)
        stream.finish()


@pytest.mark.parametrize("fmt", sorted(REPLIES))
def test_stream_parser_matches_parse_reply(fmt):
    text = REPLIES[fmt]
    expected = parsers.parse(fmt, text, TOOLS)
    assert expected["tool_calls"]
    rng = random.Random(1)
    for chunking in ("chars", "random", "whole"):
        stream, events = parsers.StreamParser(fmt, TOOLS), []
        pos = 0
        while pos < len(text):
            step = {"chars": 1, "whole": len(text), "random": rng.randint(1, 7)}[chunking]
            events += stream.feed(text[pos:pos + step])
            pos += step
        events += stream.finish()
        content = "".join(e["text"] for e in events if e["type"] == "content")
        reasoning = "".join(e["text"] for e in events if e["type"] == "reasoning")
        assert content == expected["content"], chunking
        assert (reasoning or None) == expected["reasoning_content"]
        assert [e["tool_call"] for e in events if e["type"] == "tool_call"] == expected["tool_calls"]
        assert stream.result() == expected


def test_stream_parser_emits_reasoning_before_the_reply_ends():
    stream = parsers.StreamParser("glm45")
    assert stream.feed("<thi") == []
    assert stream.feed("nk>Step one") == [{"type": "reasoning", "text": "Step one"}]
    assert stream.feed(" and two</th") == [{"type": "reasoning", "text": " and two"}]
    assert stream.feed("ink>\nAnswer") == [{"type": "content", "text": "Answer"}]
    assert stream.feed("<tool_call>search<arg_key>q</arg_key>") == []
    call = stream.feed("<arg_value>x</arg_value></tool_call>")
    assert call == [{"type": "tool_call", "tool_call": {"type": "function",
                                                        "function": {"name": "search", "arguments": {"q": "x"}}}}]
    prompt_opened = parsers.StreamParser("glm45", thinking=True)
    assert prompt_opened.feed("why</think>ok") == [{"type": "reasoning", "text": "why"}, {"type": "content",
                                                                                        "text": "ok"}]


def test_stream_parser_knows_when_the_prompt_opened_thinking(built):
    z1 = load_tokenizer(built["glm_z1"])
    prompt = z1.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert z1.decode(prompt).endswith("<|user|>\nhi<|assistant|>\n<think>")
    stream = z1.stream_parser(prompt=prompt)
    events = stream.feed("Let me think.</think>\nHello.") + stream.finish()
    assert events == [{"type": "reasoning", "text": "Let me think."}, {"type": "content", "text": "Hello."}]
    assert load_tokenizer(built["glm45"]).stream_parser(prompt="x<|assistant|>\n<think></think>").thinking is False


def masked_runs(tok, ids, mask):
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + [tok.decode(run)] if run else runs


SFT = CONVERSATIONS["tool_calls"][:-1]  # ends on the assistant's answer after the tool results


@pytest.mark.parametrize("name, expected", [
    ("glm45", ["\n<think>Two calls.</think>\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
               "<arg_value>上海</arg_value>\n</tool_call>",
               "\n<think>Summarise.</think>\nSunny in Beijing, cloudy in Shanghai."]),
    ("glm47", ["Two calls.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>上海"
               "</arg_value></tool_call>", "Summarise.</think>Sunny in Beijing, cloudy in Shanghai."]),
    ("glm4_9b", ['\nLet me check.<|assistant|>get_weather\n{"city": "上海"}',
                 "\nSunny in Beijing, cloudy in Shanghai."]),
    ("sentencepiece", ["\n Let me check.<|assistant|>get_weather\n ```python\ntool_call(city='上海')\n```",
                       "\n Sunny in Beijing, cloudy in Shanghai."]),
])
def test_assistant_mask_covers_exactly_what_the_assistant_writes(built, name, expected):
    tok = load_tokenizer(DEFAULT_MODEL_FILE if name == "sentencepiece" else built[name])
    conversation = [dict(m) for m in SFT]
    conversation[1] = {**conversation[1], "tool_calls": conversation[1]["tool_calls"][1:]}
    ids, mask = tok.assistant_mask(conversation, tools=TOOLS)
    assert ids == tok.apply_chat_template(conversation, tools=TOOLS, add_generation_prompt=False)
    assert len(mask) == len(ids) and masked_runs(tok, ids, mask) == expected
    # Earlier turns: GLM-4.5 shows no reasoning before the last user message, and neither does the mask.
    ids, mask = tok.assistant_mask(CONVERSATIONS["multi_turn"] + [{"role": "assistant", "content": "Verse 2."}])
    runs = masked_runs(tok, ids, mask)
    assert len(runs) == 2 and "The first verse" not in "".join(runs)


def test_glm47_reply_after_a_prompt_that_opened_thinking(built):
    tok = load_tokenizer(built["glm47"])
    assert tok.reply_format == "glm45"
    prompt = tok.apply_chat_template(CONVERSATIONS["multi_turn"], tools=TOOLS)
    assert tok.decode(prompt).endswith("<|assistant|><think>")
    assert tok.decode(tok.apply_chat_template(CONVERSATIONS["multi_turn"], enable_thinking=False)).endswith(
        "<|assistant|></think>")
    reply = ("The user wants the next verse.</think>Looking it up.<tool_call>search<arg_key>q</arg_key>"
             "<arg_value>Genesis 1:2</arg_value></tool_call>")
    expected = {"content": "Looking it up.", "reasoning_content": "The user wants the next verse.",
                "tool_calls": [{"type": "function", "function": {"name": "search",
                                                                 "arguments": {"q": "Genesis 1:2"}}}]}
    ids = tok.encode(reply, add_special_tokens=False) + [tok.special_tokens["<|observation|>"]]
    assert tok.parse_reply(ids, tools=TOOLS) == expected
    stream = tok.stream_parser(TOOLS, prompt=prompt)
    events = [e for i in range(0, len(reply), 5) for e in stream.feed(reply[i:i + 5])] + stream.finish()
    assert [e["type"] for e in events][-1] == "tool_call" and stream.result() == expected
    assert "".join(e["text"] for e in events if e["type"] == "reasoning") == expected["reasoning_content"]


# ------------------------------------------------------------------------------------------------ ChatGLM2

CHATGLM2_CODE = 'class SPTokenizer:\n    special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]\n'
CHATGLM3_CODE = CHATGLM2_CODE.replace('"eop"]', '"eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]')


def _sp_checkpoint(directory, code=None, name=None):
    from glm_jax.tokenizers.sentencepiece import DEFAULT_MODEL_FILE

    directory.mkdir()
    shutil.copy(DEFAULT_MODEL_FILE, directory / "tokenizer.model")
    if code is not None:
        (directory / "tokenization_chatglm.py").write_text(code)
    if name is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": "chatglm", "_name_or_path": name}))
    return directory


def test_chatglm2_checkpoints_chat_in_their_round_format(tmp_path):
    """ChatGLM2 and ChatGLM3 ship the same tokenizer.model; THUDM's chatglm2-6b prompt is plain text in rounds
    ("[Round n]\\n\\n问：...\\n\\n答：") after [gMASK] sop, encoded by SentencePiece as one string."""
    from glm_jax.tokenizers import ChatGLM2Tokenizer
    from glm_jax.tokenizers.sentencepiece import DEFAULT_MODEL_FILE

    v2 = load_tokenizer(_sp_checkpoint(tmp_path / "v2", CHATGLM2_CODE))
    assert isinstance(v2, ChatGLM2Tokenizer)
    assert isinstance(load_tokenizer(_sp_checkpoint(tmp_path / "by_name", name="THUDM/chatglm2-6b")), ChatGLM2Tokenizer)
    v3 = load_tokenizer(_sp_checkpoint(tmp_path / "v3", CHATGLM3_CODE))
    assert type(v3) is SentencePieceTokenizer and type(load_tokenizer(_sp_checkpoint(tmp_path / "bare"))) is type(v3)

    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "What is 2 + 2?"}]
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL_FILE))
    n = sp.get_piece_size()
    expected = [n + 1, n + 3] + sp.encode("[Round 1]\n\n问：你好\n\n答：Hello, how can I help?\n\n"
                                          "[Round 2]\n\n问：What is 2 + 2?\n\n答：")
    assert v2.apply_chat_template(messages) == expected
    assert v2.apply_chat_template(messages) != v3.apply_chat_template(messages)
    assert v2.vocab_size == n + 5 and v2.stop_ids == [sp.eos_id()] and "<|user|>" not in v2.special_tokens
    assert v2.parse_reply(" 4 ") == {"content": "4", "reasoning_content": None, "tool_calls": []}
    stream = v2.stream_parser()
    events = stream.feed("2 + 2") + stream.feed(" = 4") + stream.finish()
    assert "".join(e.get("text", "") for e in events) == "2 + 2 = 4" and stream.result()["content"] == "2 + 2 = 4"
    with pytest.raises(ValueError, match="message 0: ChatGLM2's chat format alternates user and assistant"):
        v2.apply_chat_template([{"role": "system", "content": "s"}] + messages)
    with pytest.raises(ValueError, match="no tools"):
        v2.apply_chat_template(messages, tools=[{"type": "function", "function": {"name": "f"}}])
    # SFT: the replies (with their closing blank line) and a final eos are the targets, in either record format
    from glm_jax.train.data import encode_sft_record

    record = messages + [{"role": "assistant", "content": "4"}]
    ids, targets = encode_sft_record(v2, {"messages": record})
    assert ids == v2.apply_chat_template(record, add_generation_prompt=False) + [sp.eos_id()]
    assert sp.decode([i for i, t in zip(ids, targets) if t and i != sp.eos_id()]) == sp.decode(
        sp.encode("Hello, how can I help?\n\n")) + sp.decode(sp.encode("4\n\n"))  # (decode drops a lead space)
    assert targets[-1] and encode_sft_record(v2, {"conversations": record}) == (ids, targets)


@pytest.mark.parametrize("name,thinking,named,required", [
    ("glm45", None, "\n<think></think>\n<tool_call>search\n", "\n<think></think>\n<tool_call>"),
    ("glm45", False, "\n<tool_call>search\n", "\n<tool_call>"),
    ("glm47", False, "<tool_call>search", "<tool_call>"),
    ("glm4_9b", None, "search\n", None),
])
def test_tool_call_opening_is_what_the_template_writes_for_a_call(built, name, thinking, named, required):
    """Forcing a call (tool_choice) appends the start of the template's own rendering of that call to the
    generation prompt; the reply parses as the call once the model completes it in its format."""
    tok = load_tokenizer(built[name])
    messages = CONVERSATIONS["after_tool"][:2]
    assert tok.tool_call_opening(messages, TOOLS, "search", enable_thinking=thinking) == named
    if required is None:  # GLM-4 names the tool first: "required" must say which when there are several
        with pytest.raises(ValueError, match="name the function"):
            tok.tool_call_opening(messages, TOOLS, None, enable_thinking=thinking)
        assert tok.tool_call_opening(messages, TOOLS[1:], None) == named  # one tool: that one
    else:
        assert tok.tool_call_opening(messages, TOOLS, None, enable_thinking=thinking) == required
    turn = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "search", "arguments": {"q": "Psalms"}}}]}
    prompt = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, enable_thinking=thinking)
    whole = tok.apply_chat_template([*messages, turn], tools=TOOLS, tokenize=False, add_generation_prompt=False,
                                    enable_thinking=thinking)
    assert whole.startswith(prompt + named)
    assert tok.parse_reply(whole[len(prompt):], tools=TOOLS)["tool_calls"] == [turn["tool_calls"][0]]


def test_chatglm3_tool_call_opening_is_the_metadata_line():
    tok = load_tokenizer(DEFAULT_MODEL_FILE)
    assert tok.tool_call_opening(CONVERSATIONS["after_tool"][:2], TOOLS[1:], "search") == "search\n"
