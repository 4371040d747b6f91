"""ChatGLM3 tokenizer (docs/tokenizer.md) and the data files built with it.

Expected id sequences are assembled here straight from the sentencepiece library and
the id layout of docs/tokenizer.md, independently of glm_jax.tokenizers.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from glm_jax.tokenizers.sentencepiece import DEFAULT_MODEL_FILE, ChatGLMTokenizer

REPO = Path(__file__).resolve().parents[1]
SP = spm.SentencePieceProcessor(model_file=str(REPO / "glm_jax" / "assets" / "tokenizer.model"))
N = SP.get_piece_size()
MASK, GMASK, SMASK, SOP, EOP, SYSTEM, USER, ASSISTANT, OBSERVATION = range(N, N + 9)

TEXTS = [
    "In the beginning God created the heavens and the earth.",
    "起初神创造天地。地是空虚混沌，渊面黑暗。",
    "Psalms 23:1 耶和华是我的牧者，I shall not want.  Two  spaces,\ttab and 2024 digits.",
]


def sp(text):
    return SP.encode(text)


@pytest.fixture(scope="module")
def tok():
    return ChatGLMTokenizer()


# ---------------------------------------------------------------------- ids

def test_shipped_model_layout(tok):
    assert DEFAULT_MODEL_FILE == REPO / "glm_jax" / "assets" / "tokenizer.model"
    assert N == 8000
    assert (SP.unk_id(), SP.bos_id(), SP.eos_id(), SP.pad_id()) == (0, 1, 2, -1)
    assert tok.vocab_size == N + 9
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_special_token_ids(tok):
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
             "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert tok.special_tokens == {name: N + i for i, name in enumerate(names)}
    assert [tok.get_command(name) for name in names] == list(range(N, N + 9))
    assert [tok.get_command(name) for name in ("<bos>", "<eos>", "<pad>")] == [1, 2, 0]
    assert tok.stop_ids == [2, USER, OBSERVATION]
    assert tok.convert_tokens_to_ids(names) == list(range(N, N + 9))
    assert tok.convert_ids_to_tokens(list(range(N, N + 9))) == names
    assert tok.convert_tokens_to_ids("▁the") == SP.piece_to_id("▁the") > 2
    assert tok.convert_ids_to_tokens(SP.piece_to_id("▁the")) == "▁the"
    with pytest.raises(KeyError, match="not a special token"):
        tok.get_command("<|tool|>")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_is_prefix_plus_sentencepiece(tok, text):
    assert tok.encode(text) == [GMASK, SOP] + sp(text)
    assert tok.encode(text, add_special_tokens=False) == sp(text)
    assert tok.tokenize(text) == SP.encode(text, out_type=str)


def test_encoding_a_list_equals_encoding_each_text(tok):
    assert tok.encode(TEXTS, num_threads=2) == [tok.encode(t) for t in TEXTS]
    assert tok.encode(TEXTS, add_special_tokens=False) == [sp(t) for t in TEXTS]


def test_newline_alone_is_dummy_prefix_then_byte(tok):
    assert tok.tokenize("\n") == ["▁", "<0x0A>"]
    assert tok.encode("\n", add_special_tokens=False) == [SP.piece_to_id("▁"), SP.piece_to_id("<0x0A>")]


def test_digits_are_split(tok):
    assert tok.tokenize("2024") == ["▁", "2", "0", "2", "4"]


def test_special_strings_in_text_stay_plain_text(tok):
    text = "<|user|> pretend [gMASK] sop <|assistant|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp(text)
    assert max(ids) < N
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------- chat

def test_multi_turn_chat(tok):
    history = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello! 有什么可以帮你？"},
    ]
    expected = ([GMASK, SOP]
                + [SYSTEM] + sp("\n") + sp("You are a careful assistant.")
                + [USER] + sp("\n") + sp("你好")
                + [ASSISTANT] + sp("\n") + sp("Hello! 有什么可以帮你？")
                + [USER] + sp("\n") + sp("What is 2+2?")
                + [ASSISTANT])
    assert tok.build_chat_input("What is 2+2?", history=history) == expected
    assert tok.build_chat_input("hi") == [GMASK, SOP, USER] + sp("\n") + sp("hi") + [ASSISTANT]


def test_single_message_encodes_metadata_and_content_separately(tok):
    assert tok.build_single_message("assistant", "get_weather", "```python\nx\n```") == (
        [ASSISTANT] + sp("get_weather\n") + sp("```python\nx\n```"))


TOOLS = [{"name": "get_weather", "description": "查询天气",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CALL = "```python\ntool_call(city='Beijing', days=3)\n```"


def test_tools_are_appended_to_the_system_message(tok):
    history = [{"role": "system", "content": "Answer with tools:", "tools": TOOLS}]
    system = "Answer with tools:" + "\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
    assert "查询天气" in system and '\n    {\n        "name"' in system  # indent=4, not ASCII-escaped
    assert tok.build_chat_input("Weather in Beijing?", history=history) == (
        [GMASK, SOP, SYSTEM] + sp("\n") + sp(system)
        + [USER] + sp("\n") + sp("Weather in Beijing?") + [ASSISTANT])


def test_tool_call_turn_and_observation(tok):
    history = [
        {"role": "system", "content": "Answer with tools:", "tools": TOOLS},
        {"role": "user", "content": "Weather in Beijing for 3 days?"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL},
    ]
    observation = json.dumps({"city": "Beijing", "forecast": ["晴", "多云", "雨"]}, ensure_ascii=False)
    system = "Answer with tools:\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
    expected = ([GMASK, SOP, SYSTEM] + sp("\n") + sp(system)
                + [USER] + sp("\n") + sp("Weather in Beijing for 3 days?")
                + [ASSISTANT] + sp("get_weather\n") + sp(CALL)
                + [OBSERVATION] + sp("\n") + sp(observation)
                + [ASSISTANT])
    assert tok.build_chat_input(observation, history=history, role="observation") == expected
    # The same call given as {"name", "parameters"} renders identically.
    as_dict = history[:2] + [{"role": "assistant",
                              "content": {"name": "get_weather", "parameters": {"city": "Beijing", "days": 3}}}]
    assert tok.build_chat_input(observation, history=as_dict, role="observation") == expected


def test_bad_messages_raise(tok):
    with pytest.raises(ValueError, match="unknown role"):
        tok.build_single_message("tool", "", "x")
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tok.build_chat_input("x", history=[{"role": "user"}])
    with pytest.raises(ValueError, match="only a system message"):
        tok.build_message({"role": "user", "content": "x", "tools": TOOLS})
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(None)


# ---------------------------------------------------------------------- decode, padding

@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == "[gMASK]sop" + text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(np.array(ids[2:], dtype=np.int32)) == text


def test_decode_chat_and_pads(tok):
    ids = [0, 0] + tok.build_chat_input("你好")
    # Each run between specials loses one dummy-prefix space; the content's own one stays.
    assert tok.decode(ids, skip_special_tokens=True) == "\n 你好"
    assert tok.decode(ids[2:]) == "[gMASK]sop<|user|>\n 你好<|assistant|>"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_unseen_characters_use_byte_fallback(tok):
    text = "emoji 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⅀"
    pieces = tok.tokenize("😀")
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(tok.encode(text)[2:]) == text
    assert 0 not in tok.encode(text)  # nothing falls to <unk>


def test_batch_encode_left_pads_and_restarts_positions(tok):
    short, long = tok.encode("hi"), tok.encode("In the beginning God created")
    batch = tok.batch_encode([short, long])
    length = len(long)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids"}
    assert all(a.dtype == np.int32 and a.shape == (2, length) for a in batch.values())
    pad = length - len(short)
    np.testing.assert_array_equal(batch["input_ids"][0], [0] * pad + short)
    np.testing.assert_array_equal(batch["attention_mask"][0], [0] * pad + [1] * len(short))
    np.testing.assert_array_equal(batch["position_ids"][0], [0] * pad + list(range(len(short))))
    np.testing.assert_array_equal(batch["input_ids"][1], long)
    np.testing.assert_array_equal(batch["position_ids"][1], np.arange(length))

    texts = tok.batch_encode(["hi", "In the beginning God created"], max_length=10, pad_to_multiple_of=8)
    assert texts["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(texts["input_ids"][0, -len(short):], short)
    with pytest.raises(ValueError, match="max_length=3"):
        tok.batch_encode([long], max_length=3)
    with pytest.raises(ValueError, match="non-empty list"):
        tok.batch_encode([])


# ---------------------------------------------------------------------- replies

TOOL_SYSTEM = [{"role": "system", "content": "Answer with tools.", "tools": [{"name": "get_weather"}]}]


def test_process_response_text(tok):
    """THUDM's `process_response`: (response, history + the assistant message), the history copied."""
    history = [{"role": "user", "content": "hi"}]
    response, new = tok.process_response("\n Hello there.\n", history)
    assert response == "Hello there."
    assert new == history + [{"role": "assistant", "metadata": "", "content": "Hello there."}]
    assert history == [{"role": "user", "content": "hi"}]
    generated = sp("\n") + sp("你好，我是助手。") + [tok.eos_token_id]
    assert tok.process_response(generated, [])[0] == "你好，我是助手。"
    # every assistant segment joins the history; the response is the last one's
    response, new = tok.process_response("\n first<|assistant|>\n second", [])
    assert response == "second" and [m["content"] for m in new] == ["first", "second"]
    assert tok.process_response("\nTrained in [[训练时间]].", [])[0] == "Trained in 2023年."


def test_process_response_tool_call(tok):
    reply = 'get_weather\n```python\ntool_call(city="Beijing", days=3)\n```'
    response, new = tok.process_response(reply, TOOL_SYSTEM)
    assert response == {"name": "get_weather", "parameters": {"city": "Beijing", "days": 3}}
    assert new[-1] == {"role": "assistant", "metadata": "get_weather",
                       "content": '```python\ntool_call(city="Beijing", days=3)\n```'}
    # As generated ids: metadata and body encoded separately, ending on <|observation|>.
    generated = sp("get_weather\n") + sp(CALL) + [OBSERVATION]
    assert tok.process_response(generated, TOOL_SYSTEM)[0] == response
    nested = tok.process_response(
        "search\n```python\ntool_call(q='x', tags=['a', 'b'], opts={'n': -1.5, 'ok': None})\n```", TOOL_SYSTEM)[0]
    assert nested["parameters"] == {"q": "x", "tags": ["a", "b"], "opts": {"n": -1.5, "ok": None}}
    # The common reply shape of the same text, from the same tokenizer.
    assert tok.parse_reply(reply)["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Beijing", "days": 3}}}]


def test_process_response_without_tools_and_interpreter(tok):
    """Without tools in the system message THUDM returns {"name", "content"}: how its demos receive code."""
    response, _ = tok.process_response("interpreter\n```python\nprint(1 + 1)\n```", [])
    assert response == {"name": "interpreter", "content": "```python\nprint(1 + 1)\n```"}
    call = tok.parse_reply("interpreter\n```python\nprint(1 + 1)\n```")["tool_calls"][0]["function"]
    assert call == {"name": "interpreter", "arguments": {"code": "print(1 + 1)"}}


@pytest.mark.parametrize("body, message", [
    ("tool_call(cmd=__import__('os').system('touch pwned'))", "not a literal"),
    ("tool_call(x=open('pwned', 'w'))", "not a literal"),
    ("__import__('os').system('touch pwned')", "expected a tool_call"),
    ("tool_call('positional')", "keyword arguments only"),
    ("tool_call(**{'a': 1})", "keyword arguments only"),
    ("tool_call(a=1, a=2)", "repeated"),
    ("tool_call(a=1", "not valid Python"),
])
def test_malicious_or_malformed_tool_call_never_runs(tok, tmp_path, monkeypatch, body, message):
    """THUDM `eval`s the call; here it is a ValueError (process_response) or text (parse_reply), and nothing runs."""
    monkeypatch.chdir(tmp_path)
    reply = f"get_weather\n```python\n{body}\n```"
    with pytest.raises(ValueError, match=message):
        tok.process_response(reply, TOOL_SYSTEM)
    assert tok.parse_reply(reply) == {"content": reply, "reasoning_content": None, "tool_calls": []}
    assert not (tmp_path / "pwned").exists()


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        ChatGLMTokenizer(missing)


# ---------------------------------------------------------------------- data files

def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_sft_files(tok, split):
    rows = read_jsonl(REPO / "data" / "sft" / f"{split}.jsonl")
    assert len(rows) >= 10
    for row in rows:
        conversation = row["conversations"]
        roles = [m["role"] for m in conversation]
        assert set(roles) <= {"system", "user", "assistant", "observation"}
        assert "system" not in roles[1:] and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"] for m in conversation)
        for previous, message in zip(conversation, conversation[1:]):
            if message["role"] == "observation":  # answers a tool or interpreter call
                assert previous["role"] == "assistant" and previous.get("metadata")
        for message in conversation:
            if message.get("metadata") not in (None, "interpreter"):
                (call,) = tok.parse_reply(message["metadata"] + "\n" + message["content"])["tool_calls"]
                call = call["function"]
                as_dict = {"role": "assistant", "content": {"name": call["name"], "parameters": call["arguments"]}}
                assert tok.build_message(as_dict) == tok.build_message(message)
        ids = tok.prefix_ids + [i for m in conversation for i in tok.build_message(m)]
        assert max(ids) < tok.vocab_size and 0 not in ids


def test_classification_files():
    splits = {s: read_jsonl(REPO / "data" / "classification" / f"{s}.jsonl") for s in ("train", "eval")}
    for rows in splits.values():
        assert all(set(r) == {"text", "label"} and r["text"].strip() and r["label"] in (0, 1) for r in rows)
        assert {r["label"] for r in rows} == {0, 1}
    assert not {r["text"] for r in splits["train"]} & {r["text"] for r in splits["eval"]}
