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


# ------------------------------------------------------------------------------------------------ the model

def v1_config(**overrides):
    from glm_jax import GLMConfig

    base = dict(vocab_size=300, hidden_size=64, ffn_hidden_size=160, num_layers=3, num_heads=4, num_kv_heads=4,
                head_dim=16, max_seq_len=128, position_encoding_2d=True, mask_token_id=252, gmask_token_id=253,
                bos_token_id=250, eos_token_ids=(251,), pad_token_id=0)
    return GLMConfig(**{**base, **overrides})


def to_thudm_v1(cfg, params) -> dict:
    """Our parameter tree as THUDM's ChatGLM-6B state dict (transformer.* names without the prefix, as its
    ChatGLMModel holds them; the fused query_key_value laid out per head as [q, k, v])."""
    p = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
    sd = {"word_embeddings.weight": p["model/embed/embedding"],
          "final_layernorm.weight": p["model/final_norm/scale"], "final_layernorm.bias": p["model/final_norm/bias"]}
    for i in range(cfg.num_layers):
        layer = lambda name: p[f"model/layers/{name}"][i]  # noqa: E731
        qkv = np.stack([layer(f"attention/{n}/kernel") for n in ("query", "key", "value")], axis=2)  # [H, heads, 3, d]
        qkv_b = np.stack([layer(f"attention/{n}/bias") for n in ("query", "key", "value")], axis=1)  # [heads, 3, d]
        out = layer("attention/out/kernel")
        sd.update({
            f"layers.{i}.input_layernorm.weight": layer("input_norm/scale"),
            f"layers.{i}.input_layernorm.bias": layer("input_norm/bias"),
            f"layers.{i}.attention.query_key_value.weight": qkv.reshape(cfg.hidden_size, -1).T,
            f"layers.{i}.attention.query_key_value.bias": qkv_b.reshape(-1),
            f"layers.{i}.attention.dense.weight": out.reshape(-1, cfg.hidden_size).T,
            f"layers.{i}.attention.dense.bias": layer("attention/out/bias"),
            f"layers.{i}.post_attention_layernorm.weight": layer("post_attention_norm/scale"),
            f"layers.{i}.post_attention_layernorm.bias": layer("post_attention_norm/bias"),
            f"layers.{i}.mlp.dense_h_to_4h.weight": layer("mlp/wi/kernel").T,
            f"layers.{i}.mlp.dense_h_to_4h.bias": layer("mlp/wi/bias"),
            f"layers.{i}.mlp.dense_4h_to_h.weight": layer("mlp/wo/kernel").T,
            f"layers.{i}.mlp.dense_4h_to_h.bias": layer("mlp/wo/bias"),
        })
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def thudm_logits(cfg, params, ids) -> np.ndarray:
    """THUDM's ChatGLM-6B logits for our parameters (converted by the test's own to_thudm_v1)."""
    return thudm_v1_logits(thudm_v1(cfg, to_thudm_v1(cfg, params)), np.asarray(params["lm_head"]["kernel"]).T, ids)


@pytest.mark.parametrize("ids", [
    [[5, 6, 7, 8, 253, 250, 9, 10, 11]],  # a prompt ending [gMASK] <sop>, then generated tokens
    [[5, 6, 252, 7, 8, 250, 9, 10]],  # [MASK] in the text: the generated tokens take its position
    [[5, 253, 6, 7, 250, 8, 9, 10, 11, 12, 13, 14]],  # [gMASK] inside the context
    [list(range(5, 105)) + [253, 250] + list(range(110, 125))],  # far positions: float16-rounded frequencies
])
def test_logits_equal_thudms_chatglm_6b(ids):
    """A plain `GLMForCausalLM(cfg).apply` on a ChatGLM-6B config (fp32) gives THUDM's logits: 2D positions and the
    bidirectional context derived from the ids as its code derives them."""
    import jax

    from glm_jax import GLMForCausalLM, init_params

    cfg = v1_config()
    model = GLMForCausalLM(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          init_params(model, jax.random.key(0)))  # norms and biases away from 1 / 0 too
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    ours = np.asarray(model.apply({"params": params}, np.asarray(ids, np.int32)))
    theirs = thudm_logits(cfg, params, ids)
    # measured: under 1.5e-6 (full-precision rotary frequencies instead of THUDM's float16 ones: 9e-6 far out)
    np.testing.assert_allclose(ours, theirs, atol=5e-6, rtol=0)


def test_a_thudm_checkpoint_loads_with_thudms_logits_and_saves_back(tmp_path):
    """ChatGLM-6B's own layout (transformer.* names, the per-head fused query_key_value, config.json with
    inner_hidden_size / position_encoding_2d): THUDM's state dict saved as a checkpoint loads with load_hf to
    THUDM's logits; save_hf(format="thudm") writes the same tensors and config keys back."""
    import jax
    from safetensors.numpy import load_file, save_file

    from glm_jax import GLMForCausalLM, init_params, load_hf, save_hf

    cfg = v1_config()
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                          init_params(GLMForCausalLM(cfg), jax.random.key(0)))
    state = {("transformer." + k): v.numpy() for k, v in to_thudm_v1(cfg, params).items()}
    state["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"], np.float32).T.copy()
    ckpt = tmp_path / "chatglm-6b"
    ckpt.mkdir()
    save_file(state, str(ckpt / "model.safetensors"))
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "inner_hidden_size": cfg.ffn_hidden_size, "num_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "layernorm_epsilon": 1e-5, "max_sequence_length": 128,
              "position_encoding_2d": True, "bos_token_id": 250, "eos_token_id": 251, "mask_token_id": 252,
              "gmask_token_id": 253, "pad_token_id": 0, "torch_dtype": "float32"}
    (ckpt / "config.json").write_text(json.dumps(config))
    cfg2, loaded = load_hf(ckpt)
    assert cfg2.position_encoding_2d and cfg2.num_kv_heads == cfg2.num_heads == 4 and cfg2.ffn_hidden_size == 160
    ids = [[5, 6, 7, 8, 253, 250, 9, 10, 11]]
    ours = np.asarray(GLMForCausalLM(cfg2).apply({"params": loaded}, np.asarray(ids, np.int32)))
    np.testing.assert_allclose(ours, thudm_logits(cfg, params, ids), atol=1e-5, rtol=1e-5)
    out = save_hf(cfg2, loaded, tmp_path / "saved", format="thudm")
    written = load_file(str(next(out.glob("*.safetensors"))))
    assert set(written) == set(state)
    for name, w in state.items():
        np.testing.assert_array_equal(written[name], w, err_msg=name)
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved.get(k) for k in config} == config


def test_greedy_decoding_with_the_cache_equals_thudms_forward_token_by_token():
    """glm_jax.generate on a ChatGLM-6B model (prefill of `... [gMASK] <sop>`, then one token a step from the
    cache, each at the mask's position and the next block position) picks THUDM's greedy tokens: those of its
    model run on the whole sequence at every step (the positions its cached generation also gives); a left-padded
    batch decodes each row as alone (the serving engine: test_the_serving_engine_decodes_as_generate)."""
    import jax

    from glm_jax import GLMForCausalLM, generate, init_params

    cfg = v1_config()
    model = GLMForCausalLM(cfg)
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(5), x.shape),
                          init_params(model, jax.random.key(4)))  # larger weights: a varied greedy path
    prompt = [7, 8, 9, 10, 253, 250]
    ours = generate(model, params, np.asarray(prompt, np.int32), max_new_tokens=8, temperature=0.0,
                    stop_ids=())[len(prompt):].tolist()
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(thudm_logits(cfg, params, [ids])[0, -1].argmax()))
    assert ours == ids[len(prompt):] and len(set(ours)) > 1, (ours, ids)
    # a left-padded batch decodes each row as it decodes alone
    short = [7, 253, 250]
    batch = np.asarray([prompt, [0] * (len(prompt) - len(short)) + short], np.int32)
    mask = (np.arange(len(prompt))[None] >= np.asarray([[0], [len(prompt) - len(short)]])).astype(np.int32)
    both = generate(model, params, batch, attention_mask=mask, max_new_tokens=8, temperature=0.0, stop_ids=())
    alone = generate(model, params, np.asarray(short, np.int32), max_new_tokens=8, temperature=0.0, stop_ids=())
    assert both[0, len(prompt):].tolist() == ours and both[1, len(prompt):].tolist() == alone[len(short):].tolist()


def test_a_left_padded_batch_gives_each_rows_thudm_logits():
    """Rows of different lengths left-padded (attention_mask 0 on the pads): positions count from each row's first
    token, as THUDM's tokenizer pads them, so every real position's logits equal THUDM's for the row alone."""
    import jax

    from glm_jax import GLMForCausalLM, init_params

    cfg = v1_config()
    model = GLMForCausalLM(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          init_params(model, jax.random.key(0)))
    rows = [[5, 6, 7, 8, 253, 250, 9, 10, 11], [5, 253, 250, 9], [6, 252, 7, 250, 8, 9]]
    width = max(map(len, rows))
    ids = np.asarray([[0] * (width - len(r)) + r for r in rows], np.int32)
    mask = np.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    ours = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    for i, r in enumerate(rows):
        np.testing.assert_allclose(ours[i, width - len(r):], thudm_logits(cfg, params, [r])[0], atol=5e-6, rtol=0)


def test_a_chat_session_with_a_chatglm_6b_checkpoint(ice_text, tmp_path):
    """A ChatGLM-6B checkpoint with its ice_text.model: the chat CLI's loading picks the tokenizer, the session
    prompts in THUDM's [Round i] format (every turn its whole prompt: no cache reuse), decodes until <eop> and
    keeps the history."""
    import jax

    from glm_jax import GLMForCausalLM, init_params, save_hf
    from glm_jax.chat import ChatSession
    from glm_jax.checkpoints import default_tokenizer, load_checkpoint, tokenizer_or_shipped

    tok = ChatGLM6BTokenizer(ice_text, 0)
    special = tok.special_tokens
    cfg = v1_config(vocab_size=tok.vocab_size, mask_token_id=special["[MASK]"], gmask_token_id=special["[gMASK]"],
                    bos_token_id=special["<sop>"], eos_token_ids=(special["<eop>"],), max_seq_len=256)
    ckpt = save_hf(cfg, init_params(GLMForCausalLM(cfg), jax.random.key(0)), tmp_path / "chatglm-6b", format="thudm")
    (ckpt / "ice_text.model").write_bytes(ice_text.read_bytes())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    loaded_tok = tokenizer_or_shipped(default_tokenizer(ckpt))
    assert isinstance(loaded_tok, ChatGLM6BTokenizer)
    cfg2, params = load_checkpoint(ckpt)
    session = ChatSession(GLMForCausalLM(cfg2), params, loaded_tok, max_new_tokens=6, temperature=0.0)
    assert session.conversation is None
    first = session.send("你好")
    assert session.last_prompt == loaded_tok.encode("你好") and isinstance(first["content"], str)
    session.send("再说一遍")
    answer = session.history[1]["content"]  # as THUDM's history keeps it: after process_response
    assert session.last_prompt == loaded_tok.encode(f"[Round 0]\n问：你好\n答：{answer}\n[Round 1]\n问：再说一遍\n答：")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]


def test_packed_blank_infilling_rows_give_thudms_logits_per_example():
    """Blank-infilling examples (several spans, [MASK] / [sMASK] / [gMASK]) packed into rows
    (train/blank_infilling.py `pack`) and run with their position ids, block position ids, segment ids and Part A
    ends: each example's logits equal THUDM's model given that example's own 2D positions and GLM mask."""
    import jax

    from glm_jax import GLMForCausalLM, init_params
    from glm_jax.train.blank_infilling import SpecialIds, blank_infilling, choose_kind, pack

    cfg = v1_config()
    model = GLMForCausalLM(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          init_params(model, jax.random.key(0)))
    special = SpecialIds(mask=252, gmask=253, smask=254, sop=250, eop=251)
    rng = np.random.default_rng(0)
    examples = [blank_infilling(rng.integers(10, 200, int(rng.integers(8, 30))).tolist(), rng, special=special,
                                kind=choose_kind(rng), sentence_ends={15}) for _ in range(6)]
    rows = pack(examples, 96)
    logits = np.asarray(model.apply({"params": params}, rows["input_ids"], position_ids=rows["position_ids"],
                                    segment_ids=rows["segment_ids"], block_position_ids=rows["block_position_ids"],
                                    context_ends=rows["context_ends"]))
    conf, modeling = thudm_chatglm6b.load("configuration"), thudm_chatglm6b.load("text_generation")
    theirs = modeling.ChatGLMModel(conf.ChatGLMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, inner_hidden_size=cfg.ffn_hidden_size, max_sequence_length=128,
        bos_token_id=250, eos_token_id=251, mask_token_id=252, gmask_token_id=253, pad_token_id=0,
        position_encoding_2d=True)).float()
    theirs.load_state_dict(to_thudm_v1(cfg, params), strict=False)
    head = torch.from_numpy(np.asarray(params["lm_head"]["kernel"], np.float32))
    checked = 0
    for r in range(len(rows["input_ids"])):
        for s in range(1, rows["segment_ids"][r].max() + 1):
            at = rows["segment_ids"][r] == s
            ex = [e for e in examples if len(e.input_ids) == at.sum() and
                  (e.input_ids == rows["input_ids"][r][at]).all()][0]
            positions = torch.as_tensor(np.stack([ex.position_ids, ex.block_position_ids])[None].astype(np.int64))
            masked = torch.as_tensor(~ex.attention_mask()[None, None])  # THUDM's mask: True = not seen
            with torch.no_grad():
                hidden = theirs.eval()(input_ids=torch.as_tensor(ex.input_ids[None].astype(np.int64)),
                                       position_ids=positions, attention_mask=masked).last_hidden_state
            np.testing.assert_allclose(logits[r][at], (hidden.transpose(0, 1) @ head).numpy()[0], atol=5e-6, rtol=0)
            checked += 1
    assert checked == len(examples)


def thudm_v1(cfg, state: dict, **config):
    """THUDM's ChatGLMModel (float32) for `cfg` holding `state` (transformer.* names without the prefix);
    `config`: more ChatGLMConfig keys (pre_seq_len)."""
    conf, modeling = thudm_chatglm6b.load("configuration"), thudm_chatglm6b.load("text_generation")
    theirs = modeling.ChatGLMModel(conf.ChatGLMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, inner_hidden_size=cfg.ffn_hidden_size, layernorm_epsilon=cfg.norm_eps,
        max_sequence_length=cfg.max_seq_len, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_ids[0],
        mask_token_id=cfg.mask_token_id, gmask_token_id=cfg.gmask_token_id, pad_token_id=cfg.pad_token_id,
        position_encoding_2d=True, **config)).float()  # float32 before loading: its parameters are created in float16
    result = theirs.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in state.items()},
                                    strict=False)
    assert not result.missing_keys, result.missing_keys
    return theirs.eval()


def thudm_v1_logits(model, head, ids) -> np.ndarray:
    with torch.no_grad():
        hidden = model(input_ids=torch.as_tensor(np.asarray(ids))).last_hidden_state  # [seq, batch, hidden]
    return (hidden.transpose(0, 1) @ torch.as_tensor(np.asarray(head, np.float32)).T).numpy()


def v1_checkpoint_config(cfg, **extra) -> dict:
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "inner_hidden_size": cfg.ffn_hidden_size, "num_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "layernorm_epsilon": 1e-5, "max_sequence_length": cfg.max_seq_len,
            "position_encoding_2d": True, "bos_token_id": 250, "eos_token_id": 251, "mask_token_id": 252,
            "gmask_token_id": 253, "pad_token_id": 0, "torch_dtype": "float32", **extra}


def test_a_ptuning_v2_checkpoint_gives_thudms_logits(tmp_path):
    """P-tuning v2 on ChatGLM-6B (THUDM's ptuning/main.py): the prefix encoder's embedding [pre_seq_len,
    layers * 2 * hidden] as THUDM's ChatGLMModel reads it (viewed per layer as key / value heads, visible to every
    token, no rotary): save_hf writes it, THUDM's model holding that file gives our logits, load_hf reads it
    back."""
    import jax
    from safetensors.numpy import load_file

    from glm_jax import GLMForCausalLM, init_params, load_hf, save_hf

    cfg = v1_config(pre_seq_len=4)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                          init_params(GLMForCausalLM(cfg), jax.random.key(0)))
    params["model"]["prefix"] = jax.random.normal(jax.random.key(4), params["model"]["prefix"].shape)
    out = save_hf(cfg, params, tmp_path / "ptuning", format="thudm")
    written = load_file(str(next(out.glob("*.safetensors"))))
    assert written["transformer.prefix_encoder.embedding.weight"].shape == (4, 3 * 2 * 64)
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is False
    theirs = thudm_v1(cfg, {k.removeprefix("transformer."): v for k, v in written.items() if k != "lm_head.weight"},
                      pre_seq_len=4, prefix_projection=False)
    for ids in ([[5, 6, 7, 8, 253, 250, 9, 10, 11]], [[5, 6, 252, 7, 8, 250, 9, 10]]):
        ours = np.asarray(GLMForCausalLM(cfg).apply({"params": params}, np.asarray(ids, np.int32)))
        np.testing.assert_allclose(ours, thudm_v1_logits(theirs, written["lm_head.weight"], ids), atol=5e-6, rtol=0)
    cfg2, loaded = load_hf(out)
    assert cfg2.pre_seq_len == 4
    np.testing.assert_array_equal(np.asarray(loaded["model"]["prefix"]), np.asarray(params["model"]["prefix"]))


@pytest.mark.parametrize("bits,embeddings", [(8, False), (4, False), (4, True)])
def test_quantized_checkpoints_load_to_thudms_logits_and_save_back(tmp_path, bits, embeddings):
    """chatglm-6b-int8 / -int4 / -int4-qe: the four block linears (and with quantization_embeddings the embedding
    and the head) int8 rows or packed int4 pairs with a per-row scale, quantized here by THUDM's rule written from
    its definition (hf_models.thudm_quantize). load_hf gives THUDM's logits on the dequantized weights; keeping the
    integers (quantization_bit) gives the same; save_hf writes the same integers back."""
    import jax
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from glm_jax import GLMForCausalLM, init_params, load_hf, save_hf
    from hf_models import quantize_thudm_state_dict, thudm_quantize

    cfg = v1_config()
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape),
                          init_params(GLMForCausalLM(cfg), jax.random.key(0)))
    state = dict(to_thudm_v1(cfg, params))
    state["lm_head.weight"] = torch.as_tensor(np.asarray(params["lm_head"]["kernel"], np.float32).T.copy())
    quantized, ints = quantize_thudm_state_dict(state, bits)
    assert len(ints) == 4 * cfg.num_layers  # query_key_value, attention.dense, dense_h_to_4h, dense_4h_to_h
    if embeddings:
        for name in ("word_embeddings.weight", "lm_head.weight"):
            q, scale = thudm_quantize(state[name], bits)
            quantized[name], quantized[name + "_scale"] = q, scale
            ints[name] = torch.stack([q >> 4, (q << 4) >> 4], dim=-1).reshape(q.shape[0], -1)
    dequantized = {n: ints[n].float() * quantized[n + "_scale"][:, None] if n in ints else t
                   for n, t in state.items()}
    ckpt = tmp_path / "int"
    ckpt.mkdir()
    save_file({(n if n == "lm_head.weight" or n == "lm_head.weight_scale" else "transformer." + n): t.contiguous()
               for n, t in quantized.items()}, str(ckpt / "model.safetensors"))
    extra = {"quantization_bit": bits, **({"quantization_embeddings": True} if embeddings else {})}
    (ckpt / "config.json").write_text(json.dumps(v1_checkpoint_config(cfg, **extra)))

    ids = [[5, 6, 7, 8, 253, 250, 9, 10, 11]]
    theirs = thudm_v1_logits(thudm_v1(cfg, {n: t for n, t in dequantized.items() if n != "lm_head.weight"}),
                             dequantized["lm_head.weight"], ids)
    cfg_f, loaded = load_hf(ckpt)
    ours = np.asarray(GLMForCausalLM(cfg_f).apply({"params": loaded}, np.asarray(ids, np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
    exact = np.asarray(GLMForCausalLM(cfg).apply({"params": params}, np.asarray(ids, np.int32)))
    assert np.abs(ours - exact).max() > 1e-4  # really quantized (int8: 6e-4 off the float model here)
    cfg_q, kept = load_hf(ckpt, quantization_bit=bits)  # the block linears stay integers on the device
    np.testing.assert_allclose(np.asarray(GLMForCausalLM(cfg_q).apply({"params": kept}, np.asarray(ids, np.int32))),
                               theirs, atol=2e-5, rtol=0)
    out = save_hf(cfg_f, loaded, tmp_path / "again", format="thudm", quantization_bit=bits,
                  quantize_embeddings=embeddings)
    written = load_file(str(next(out.glob("*.safetensors"))))
    for name, t in quantized.items():
        key = name if name.startswith("lm_head") else "transformer." + name
        if t.dtype == torch.int8:
            np.testing.assert_array_equal(written[key], t.numpy(), err_msg=key)
    assert (written["lm_head.weight"].dtype == np.int8) == embeddings
    assert json.loads((out / "config.json").read_text()).get("quantization_embeddings", False) == embeddings


def test_the_serving_engine_decodes_as_generate():
    """The serving engine's paged cache on ChatGLM-6B: each row's context end and mask position go into the
    paged index, the context (attending both ways) is prefilled in one chunk even past prefill_chunk, prefix caching
    is off; greedy tokens equal glm_jax.generate's (which equal THUDM's, above) with small pages and with a KV budget
    that forces preemption."""
    import jax

    from glm_jax import GLMForCausalLM, generate, init_params
    from glm_jax.serve import Engine, SamplingParams

    cfg = v1_config()
    model = GLMForCausalLM(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          init_params(model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    prompts = [[5, 6, 7, 8, 253, 250], [5, 6, 252, 7, 8, 250], rng.integers(5, 200, 40).tolist() + [253, 250],
               [9, 10, 11, 12]]
    want = [generate(model, params, np.asarray(p, np.int32), max_new_tokens=12, stop_ids=())[len(p):].tolist()
            for p in prompts]
    for kw in (dict(), dict(prefill_chunk=16, page_size=4), dict(prefill_chunk=16, page_size=4, kv_cache_tokens=80)):
        engine = Engine(model, params, max_num_seqs=4, **kw)
        assert not engine.pool.prefix_caching
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
        assert [o.token_ids for o in outs] == want, kw
        assert (engine.stats().get("preemptions", 0) > 0) == ("kv_cache_tokens" in kw)
    with pytest.raises(ValueError, match="speculative: not with a model with 2D positions"):
        Engine(model, params, speculative="ngram")
