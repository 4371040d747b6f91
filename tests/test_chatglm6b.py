"""ChatGLM-6B's tokenizer (glm_jax/tokenizers/chatglm6b.py) against THUDM's tokenization_chatglm.py and the chat
prompt of THUDM's modeling_chatglm.py (tests/thudm_chatglm6b.py), on a small SentencePiece vocabulary built
the way ice_text.model is: the special tokens, <n>, <|tab|> and <|blank_2|> .. <|blank_80|> as pieces."""

import json
import types

import numpy as np
import pytest
import sentencepiece as spm
import torch

import thudm_chatglm6b
from glm_jax.tokenizers import ChatGLM6BTokenizer, load_tokenizer
from test_train_run import ROOT

pytestmark = pytest.mark.skipif(thudm_chatglm6b.source_dir() is None, reason="needs modelscope (test extra)")

PIECES = (["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)] +
          ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<pad>"])
TEXTS = [
    "你好，请介绍一下清华大学。",
    "Hello world! ChatGLM-6B is a bilingual model.",
    "def f(x):\n\tif x:\n        return x  # four spaces, then eight\n    return  None\n",
    "空格   三个，换行\n\n两个；tab\there" + " " * 100 + "end",
    "北京是中国的首都[MASK]，上海是最大的城市。",
    "续写：[gMASK]",
    "mixed 中英 text\twith\ttabs and numbers 12345",
]


@pytest.fixture(scope="module")
def ice_text(tmp_path_factory):
    """A 3,000-piece SentencePiece model on the shipped Chinese and English text, built like ice_text.model."""
    out = tmp_path_factory.mktemp("ice")
    corpus = out / "corpus.txt"
    lines = []
    for name in ("bible_cuv_zh.txt", "bible_asv_en.txt", "python_docs_en.txt"):
        lines += (ROOT / "data" / "corpus" / name).read_text(encoding="utf-8").splitlines()[:3000]
    corpus.write_text("\n".join(ChatGLM6BTokenizer.preprocess(line) for line in lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "ice_text"), vocab_size=3000,
                                   user_defined_symbols=PIECES, byte_fallback=True, character_coverage=0.9995,
                                   num_threads=2, minloglevel=2)
    return out / "ice_text.model"


def theirs(model_file, num_image_tokens):
    """THUDM's SPTokenizer, and its build_inputs_with_special_tokens on a stand-in for the transformers
    wrapper (which only reads these attributes there)."""
    src = thudm_chatglm6b.load("tokenization")
    sp = src.SPTokenizer(str(model_file), num_image_tokens=num_image_tokens)
    wrapper = types.SimpleNamespace(sp_tokenizer=sp, mask_token="[MASK]", gmask_token="[gMASK]",
                                    eos_token="<eop>", bos_token="<sop>", end_token="</s>")
    build = lambda ids: src.ChatGLMTokenizer.build_inputs_with_special_tokens(wrapper, list(ids))  # noqa: E731
    return sp, build


@pytest.mark.parametrize("num_image_tokens", [20000, 0])
def test_ids_and_text_equal_thudms(ice_text, num_image_tokens):
    ours = ChatGLM6BTokenizer(ice_text, num_image_tokens)
    sp, build = theirs(ice_text, num_image_tokens)
    assert ours.vocab_size == sp.num_tokens
    for text in TEXTS:
        plain = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False) == plain, text
        assert ours.encode(text) == build(plain), text
        assert ours.decode(plain) == sp.decode(plain), text
        # (SentencePiece's default NFKC normalisation, as in ice_text.model, makes ， a , : THUDM's
        # process_response turns it back next to Han characters)
    for name in ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"):
        assert ours.special_tokens[name] == sp[name]
    assert ours.eos_token_id == sp["<eop>"] and ours.bos_token_id == sp["<sop>"]
    assert ours.encode("abc")[-2:] == [sp["[gMASK]"], sp["<sop>"]]
    assert ours.encode("a [MASK] b")[-2:] == [sp["</s>"], sp["<sop>"]]  # a mask already: </s> before <sop>


def test_the_chat_prompt_and_reply_equal_thudms(ice_text):
    """THUDM's `chat` (modeling_chatglm.py) builds the prompt text and tokenizes it; its `process_response`
    cleans the reply. Both are run here with a stand-in model that records the prompt and returns a reply."""
    modeling = thudm_chatglm6b.load("text_generation")
    sp, build = theirs(ice_text, 20000)
    ours = ChatGLM6BTokenizer(ice_text, 20000)
    reply_text = "你好,我是 ChatGLM-6B!有什么:可以帮你?[[训练时间]]"
    seen = {}

    class Tokenizer:
        def __call__(self, prompts, return_tensors=None):
            seen["prompt"] = prompts[0]
            ids = torch.tensor([build(sp.encode(prompts[0]))])
            return types.SimpleNamespace(to=lambda device: {"input_ids": ids})

        def decode(self, ids):
            return sp.decode(ids)

    class Model:
        device = "cpu"

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, torch.tensor([sp.encode(reply_text)])], dim=1)

    model = Model()
    model.process_response = types.MethodType(modeling.ChatGLMForConditionalGeneration.process_response, model)
    history = []
    for query in ("你好", "What can you do?", "再说一遍"):
        response, history_after = modeling.ChatGLMForConditionalGeneration._chat(model, Tokenizer(), query, history)
        messages = [m for q, a in history for m in ({"role": "user", "content": q},
                                                    {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": query})
        prompt_ids = ours.apply_chat_template(messages)
        assert prompt_ids == build(sp.encode(seen["prompt"])), seen["prompt"]
        assert ours.parse_reply(sp.encode(reply_text))["content"] == response == "你好，我是 ChatGLM-6B！有什么：可以帮你？2023年"
        history = history_after
    assert seen["prompt"].startswith("[Round 0]\n问：你好\n答：") and seen["prompt"].endswith("[Round 2]\n问：再说一遍\n答：")
    with pytest.raises(ValueError, match="no system or tool role"):
        ours.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])


def test_load_tokenizer_finds_ice_text_and_its_image_token_offset(ice_text, tmp_path):
    ckpt = tmp_path / "chatglm-6b"
    ckpt.mkdir()
    (ckpt / "ice_text.model").write_bytes(ice_text.read_bytes())
    tok = load_tokenizer(ckpt)
    assert isinstance(tok, ChatGLM6BTokenizer) and tok.num_image_tokens == 20000  # THUDM's default
    config = {"num_image_tokens": 0, "tokenizer_class": "ChatGLMTokenizer"}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(ckpt)
    assert tok.num_image_tokens == 0 and tok.stop_ids == [tok.eos_token_id]
    ids = np.asarray(tok.encode("你好"))
    assert ids.max() < tok.vocab_size == 3000


def test_a_chatglm_6b_checkpoint_is_refused_by_name_not_misread(tmp_path):
    """Until the model is built, a v1 config.json (model_type chatglm like ChatGLM2/3) is one clear error, not a
    ChatGLM2 misreading."""
    from glm_jax import load_hf

    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": 130528, "hidden_size": 4096,
              "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
              "max_sequence_length": 2048, "position_encoding_2d": True, "bos_token_id": 130004,
              "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: a ChatGLM-6B config \(position_encoding_2d, "
                                         r"inner_hidden_size\): the first ChatGLM's model is not supported yet"):
        load_hf(tmp_path)
