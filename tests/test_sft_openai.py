"""SFT on OpenAI-format conversations (docs/tokenizer.md, "SFT data formats"): the loss mask of a GLM-4.6
conversation with tools and reasoning, token by token, against transformers' own assistant mask (the published
GLM-4.5/4.6 template with `{% generation %}` markers, rendered by `apply_chat_template(...,
return_assistant_tokens_mask=True)`), and a train.py SFT run on an OpenAI-format file with a tokenizer.json."""

import json
from pathlib import Path

import numpy as np
import pytest

import tokenizer_fixtures as fx
from glm_jax import GLMConfig, load_tokenizer
from glm_jax.train import data as D
from glm_jax.train import pipeline as P

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather in Beijing for 2 days?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Call the tool.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing", "days": 2}'}}]},
    {"role": "tool", "content": '{"temp": [21, 19]}'},
    {"role": "assistant", "content": "21C then 19C.", "reasoning_content": "Summarise the result."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def bpe():
    return fx.train_bpe(600)


@pytest.fixture(scope="module")
def glm46(bpe, tmp_path_factory):
    """A tokenizer.json with GLM-4.5's added tokens and the published GLM-4.5/4.6 template."""
    return fx.write_hf(bpe, tmp_path_factory.mktemp("glm46"), "glm45.jinja", in_config=False)


def with_generation_markers(template: str) -> str:
    """The GLM-4.5 template with transformers' `{% generation %}` around what the assistant writes (after
    `<|assistant|>`, up to the end of its tool calls): the rendered text is unchanged."""
    start = "{%- elif m.role == 'assistant' -%}\n<|assistant|>"
    end = "{%- elif m.role == 'tool' -%}"
    assert template.count(start) == 1 and template.count(end) == 1
    return (template.replace(start, start + "{%- generation -%}")
            .replace(end, "{%- endgeneration -%}" + end))


def transformers_targets(directory, messages, tools):
    """(ids, targets) from transformers alone: its assistant mask, plus the stop token closing each turn."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(directory)
    messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    template = with_generation_markers((Path(directory) / "chat_template.jinja").read_text())
    plain = ref.apply_chat_template(messages, tools=tools, tokenize=False)
    assert ref.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template) == plain
    out = ref.apply_chat_template(messages, tools=tools, chat_template=template, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    stops = {ref.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    targets = [bool(m) or (t > 0 and mask[t - 1] and ids[t] in stops) for t, m in enumerate(mask)]
    if mask[-1]:
        ids, targets = ids + [ref.convert_tokens_to_ids("<|endoftext|>")], targets + [True]
    return ids, targets


def test_glm46_mask_with_tools_token_by_token(glm46, tmp_path):
    tok = load_tokenizer(glm46)
    ids, targets = D.encode_openai_conversation(tok, CONVERSATION, TOOLS)
    ref_ids, ref_targets = transformers_targets(glm46, CONVERSATION, TOOLS)
    assert ids == ref_ids
    assert targets == ref_targets
    # What the targets are, in words: reasoning, content and the call of each turn, and the token ending it.
    runs = target_runs(tok, ids, targets)
    # Reasoning shows (and is trained on) only after the last user message: GLM-4.5/4.6 templates hide the rest.
    assert runs == [
        "\n<think></think>\nChecking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Beijing</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
        "<|observation|>",
        "\n<think></think>\n21C then 19C.<|user|>",
        "\n<think></think>\nYou are welcome.<|endoftext|>"]
    short = D.encode_openai_conversation(tok, CONVERSATION[:5], TOOLS)
    assert short == transformers_targets(glm46, CONVERSATION[:5], TOOLS)
    assert "<think>Call the tool.</think>" in tok.decode([i for i, t in zip(*short) if t])
    # The pipeline: one row per conversation, loss_mask[t] = targets[t + 1].
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"messages": CONVERSATION, "tools": TOOLS}) + "\n")
    arrays, stats = P.build_sft([f], tok, 1024, D.BadRecords())
    n = len(ids)
    assert arrays["input_ids"][0, :n].tolist() == ids and stats["truncated"] == 0
    assert arrays["loss_mask"][0, :n - 1].tolist() == [float(t) for t in targets[1:]]
    assert arrays["loss_mask"][0, n - 1:].sum() == 0


def target_runs(tok, ids, targets):
    runs, run = [], []
    for i, t in zip(ids, targets):
        if t:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + [tok.decode(run)] if run else runs


@pytest.mark.parametrize("name, expected", [
    ("glm47", ["Call the tool.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing"
               "</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call><|observation|>",
               "Summarise the result.</think>21C then 19C.<|endoftext|>"]),
    ("glm4_9b", ['\nChecking.<|assistant|>get_weather\n{"city": "Beijing", "days": 2}<|observation|>',
                 "\n21C then 19C.<|endoftext|>"]),
])
def test_other_generations_train_on_their_own_format(bpe, tmp_path, name, expected):
    """GLM-4.7 (a generation prompt that opens <think>) and GLM-4-9B (tiktoken, calls as `name\n{json}`)."""
    directory = (fx.write_hf(bpe, tmp_path / name, "glm47.jinja", in_config=False) if name == "glm47"
                 else fx.write_glm4_9b(bpe, tmp_path / name))
    tok = load_tokenizer(directory)
    ids, targets = D.encode_openai_conversation(tok, CONVERSATION[:5], TOOLS)
    assert ids[:-1] == tok.apply_chat_template(CONVERSATION[:5], tools=TOOLS, add_generation_prompt=False)
    assert target_runs(tok, ids, targets) == expected


def test_chatglm3_conversations_on_a_tokenizer_json(glm46):
    """A ChatGLM3 `conversations` record read with another family's tokenizer equals its OpenAI form."""
    tok = load_tokenizer(glm46)
    tools = [TOOLS[0]["function"]]
    conv = [{"role": "system", "content": "s", "tools": tools}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": {"name": "get_weather", "parameters": {"city": "Paris"}}},
            {"role": "observation", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    openai = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    assert D.encode_sft_record(tok, {"conversations": conv}) == D.encode_openai_conversation(tok, openai, TOOLS)


def test_chatglm3_openai_records_equal_conversations_records():
    """With ChatGLM3's tokenizer an OpenAI record gives exactly the ids and targets of the `conversations` record
    (data.encode_conversation, THUDM's rule; reasoning dropped)."""
    from glm_jax.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer()
    tools = [TOOLS[0]["function"]]
    conv = [{"role": "system", "content": "s", "tools": tools}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "Let me see."},
            {"role": "assistant", "content": {"name": "get_weather", "parameters": {"city": "Paris"}}},
            {"role": "observation", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    openai = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
              {"role": "assistant", "content": "Let me see.", "reasoning_content": "hmm", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    expected = D.encode_conversation(tok, conv)
    assert D.encode_sft_record(tok, {"conversations": conv}) == expected
    assert D.encode_sft_record(tok, {"messages": openai, "tools": TOOLS}) == expected


@pytest.mark.parametrize("record, error", [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "function.name"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}]}, "not JSON"),
    ({"messages": [{"role": "assistant", "content": "a"}], "tools": {"x": 1}}, "tools: must be a list"),
    ({"text": "x"}, 'expected {"messages"'),
])
def test_bad_openai_records_say_why(record, error):
    with pytest.raises(ValueError, match=error):
        D.check_openai_conversation(record) if "messages" in record else D.check_conversation(record)


def test_train_py_sft_on_openai_messages_with_a_tokenizer_json(glm46, tmp_path):
    from test_train_run import losses, train

    run = tmp_path / "run"
    r = train(run, "data.task=sft", f"data.train_files=[{ROOT / 'data' / 'sft_openai' / 'train.jsonl'}]",
          f"data.tokenizer={glm46 / 'tokenizer.json'}", "data.seq_len=512", "data.max_tokens=null",
          "data.eval_fraction=0", "model.overrides.vocab_size=640", "model.overrides.max_seq_len=512",
          "model.overrides.sandwich_norm=true", "train.steps=3", "train.global_batch_size=4")
    loss = losses(run)
    assert sorted(loss) == [1, 2, 3] and all(np.isfinite(v) for v in loss.values())
    # the rows are the conversations that keep a target within their first 512 tokens, tool-call ones included
    tok, kept, with_calls = load_tokenizer(glm46), 0, 0
    for line in (ROOT / "data" / "sft_openai" / "train.jsonl").read_text().splitlines():
        ids, targets = D.encode_sft_record(tok, json.loads(line))
        kept += any(targets[1:512])
        with_calls += any(targets[1:512]) and "tool_calls" in line
    assert with_calls >= 8 and f"{kept} train examples" in r.stdout and "bad records skipped: 0" in r.stdout


def test_run_tokenizer_from_data_tokenizer_or_init_from(glm46, tmp_path):
    from glm_jax.tokenizers import HFTokenizer, SentencePieceTokenizer
    from glm_jax.train.config import ConfigError, load_config
    from glm_jax.train.build import load_train_tokenizer

    model = lambda vocab_size: GLMConfig.from_preset("glm-test", vocab_size=vocab_size)  # noqa: E731
    base = ROOT / "configs" / "sft-openai-tiny.yaml"
    cfg = load_config(base, [f"data.tokenizer={glm46 / 'tokenizer.json'}"])
    assert isinstance(load_train_tokenizer(cfg, model(640)), HFTokenizer)
    with pytest.raises(ConfigError, match="vocab_size=512 is smaller than the tokenizer's 636"):
        load_train_tokenizer(cfg, model(512))
    cfg = load_config(base, [f"model.init_from={glm46}"], check_paths=False)  # a checkpoint holding a tokenizer
    tok = load_train_tokenizer(cfg, model(640))
    assert isinstance(tok, HFTokenizer) and tok.chat_template is not None
    cfg = load_config(base, [f"model.init_from={tmp_path}"], check_paths=False)  # none: the shipped one
    assert isinstance(load_train_tokenizer(cfg, model(65024)), SentencePieceTokenizer)
    (tmp_path / "tokenizer.model").write_text("not a tokenizer\n")
    with pytest.raises(ConfigError, match=f"model.init_from: {tmp_path}: cannot load the tokenizer"):
        load_train_tokenizer(cfg, model(65024))


def test_prepare_data_tokenizes_with_the_runs_tokenizer(glm46, tmp_path):
    """--prepare-data packs pretraining text with the run's tokenizer (here a tokenizer.json), not ChatGLM3's."""
    from glm_jax.train.config import load_config
    from glm_jax.train.prepare import prepare_data

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.tokenizer={glm46}", "data.max_tokens=3000",
                                                      "data.eval_files=[]", "data.seq_len=64"])
    assert prepare_data(cfg, tmp_path / "prep") == 0
    tok = load_tokenizer(glm46)
    rows = D.open_prepared(tmp_path / "prep", "train", 64, tok.vocab_size)
    first_doc = next(iter(P.PretrainDocuments(P.expand_sources(cfg.data.train_files), tok, cfg.data.text_split,
                                              D.BadRecords(), cfg.data.text_key)))
    assert first_doc[-1] == tok.eos_token_id
    np.testing.assert_array_equal(rows["input_ids"][0][:len(first_doc[:64])], first_doc[:64])
    assert int(np.max(rows["input_ids"][: len(rows["input_ids"])])) < tok.vocab_size < 65024
