"""Small tokenizers of every GLM kind, built from the shipped corpus (data/corpus) for tests/test_tokenizers.py.

One byte-level BPE is trained with HF `tokenizers` on the corpus, pre-tokenized with GLM-4's regex. It is saved
three ways, each with the special tokens after the ordinary vocabulary as the real checkpoints have them:

* `glm4_9b/`: a tiktoken `tokenizer.model` (base64 token, rank = id) + tokenizer_config.json with
  glm-4-9b-chat's template and its fourteen special tokens (GLM-4-9B's layout);
* `glm45/`: `tokenizer.json` with GLM-4.5's added tokens, `chat_template.jinja` (GLM-4.5's), tokenizer_config.json
  and generation_config.json (eos ids);
* `glm47/`: the same `tokenizer.json` with GLM-4.7's `chat_template.jinja`;
* `glm_z1/`: the same `tokenizer.json` with the GLM-Z1-0414 template inside tokenizer_config.json.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = sorted((REPO / "data" / "corpus").glob("*.txt"))
TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

# GLM-4.5's added tokens in id order after the ordinary vocabulary, and which are "special" (skipped by
# decode(skip_special_tokens=True)): the layout of zai-org/GLM-4.5's tokenizer_config.json
# `added_tokens_decoder` (ids 151329-151364 there).
GLM45_ADDED = [
    ("<|endoftext|>", True), ("[MASK]", True), ("[gMASK]", True), ("[sMASK]", True), ("<sop>", True),
    ("<eop>", True), ("<|system|>", True), ("<|user|>", True), ("<|assistant|>", True), ("<|observation|>", True),
    ("<|begin_of_image|>", True), ("<|end_of_image|>", True), ("<|begin_of_video|>", True),
    ("<|end_of_video|>", True), ("<|begin_of_audio|>", True), ("<|end_of_audio|>", True),
    ("<|begin_of_transcription|>", True), ("<|end_of_transcription|>", True), ("<|code_prefix|>", True),
    ("<|code_middle|>", True), ("<|code_suffix|>", True), ("<think>", False), ("</think>", False),
    ("<tool_call>", False), ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<arg_key>", False), ("</arg_key>", False), ("<arg_value>", False), ("</arg_value>", False),
    ("/nothink", False), ("<|begin_of_box|>", False), ("<|end_of_box|>", False), ("<|image|>", False),
    ("<|video|>", False),
]


def corpus_text() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in CORPUS]


def train_bpe(vocab_size: int = 2000):
    """A byte-level BPE (no added tokens) trained on the corpus with GLM-4's pre-tokenization."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_jax.tokenizers.tiktoken_bpe import GLM4_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = [line for text in corpus_text() for line in text.splitlines(keepends=True)]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_glm4_9b(bpe, out: Path) -> Path:
    from glm_jax.tokenizers.tiktoken_bpe import GLM4_SPECIAL_TOKENS

    out.mkdir(parents=True, exist_ok=True)
    decoder = byte_decoder()
    vocab = bpe.get_vocab()
    lines = [base64.b64encode(bytes(decoder[c] for c in token)).decode() + f" {i}"
             for token, i in sorted(vocab.items(), key=lambda kv: kv[1])]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    added = {str(len(vocab) + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
             for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
    config = {"added_tokens_decoder": added, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "padding_side": "left", "clean_up_tokenization_spaces": False,
              "chat_template": (TEMPLATES / "glm4_9b_chat.jinja").read_text(encoding="utf-8")}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return out


def write_hf(bpe, out: Path, template: str, in_config: bool) -> Path:
    """tokenizer.json with GLM-4.5's added tokens; the template as chat_template.jinja or inside the config."""
    from tokenizers import AddedToken

    out.mkdir(parents=True, exist_ok=True)
    tok = bpe.__class__.from_str(bpe.to_str())
    for content, special in GLM45_ADDED:
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
    tok.save(str(out / "tokenizer.json"))
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "padding_side": "left", "clean_up_tokenization_spaces": False,
              "model_max_length": 131072}
    if in_config:
        config["chat_template"] = text
    else:
        (out / "chat_template.jinja").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": list(ids.values())}))
    return out


def transformers_glm4_9b(directory: Path):
    """transformers' view of a GLM-4-9B directory: its tiktoken file converted by transformers'
    `TikTokenConverter` (a `tokenizers` BPE emulating tiktoken), the fourteen special tokens added, and the
    template from tokenizer_config.json. THUDM's own tokenizer class is remote code, not available offline."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from glm_jax.tokenizers.tiktoken_bpe import GLM4_PATTERN, GLM4_SPECIAL_TOKENS

    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    fast = TikTokenConverter(vocab_file=str(directory / "tokenizer.model"), pattern=GLM4_PATTERN,
                             extra_special_tokens=list(GLM4_SPECIAL_TOKENS)).converted()
    return PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=config["chat_template"], clean_up_tokenization_spaces=False)
