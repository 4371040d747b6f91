"""Tokenizers, chat formats and reply parsers for every GLM generation (docs/tokenizer.md).

    tok = glm_jax.load_tokenizer("ckpt_dir")          # or a tokenizer.model / tokenizer.json file
    ids = tok.apply_chat_template(messages, tools=tools, enable_thinking=False)
    reply = tok.parse_reply(generated_ids, tools=tools)  # {"content", "reasoning_content", "tool_calls"}

| file | kind | class |
|---|---|---|
| `ice_text.model`, SentencePiece protobuf (ChatGLM-6B) | `sentencepiece` | `ChatGLM6BTokenizer` |
| `tokenizer.model`, SentencePiece protobuf (ChatGLM3) | `sentencepiece` | `SentencePieceTokenizer` |
| the same file beside ChatGLM2's `tokenization_chatglm.py` / config | `sentencepiece` | `ChatGLM2Tokenizer` |
| `tokenizer.model`, `base64 rank` lines (GLM-4-9B) | `tiktoken` | `TiktokenTokenizer` |
| `tokenizer.json` (GLM-4-0414, GLM-4.5+, transformers conversions) | `tokenizers` | `HFTokenizer` |
"""

from __future__ import annotations

import json
from pathlib import Path

from glm_jax.tokenizers.base import Tokenizer
from glm_jax.tokenizers.chatglm6b import CHATGLM6B_VOCABULARY, DEFAULT_IMAGE_TOKENS, ChatGLM6BTokenizer, is_chatglm6b
from glm_jax.tokenizers.hf import HFTokenizer
from glm_jax.tokenizers.parsers import StreamParser
from glm_jax.tokenizers.sentencepiece import (ChatGLM2Tokenizer, ChatGLMTokenizer, SentencePieceTokenizer,
                                              is_chatglm2)
from glm_jax.tokenizers.templates import find_chat_template, read_tokenizer_config
from glm_jax.tokenizers.tiktoken_bpe import TiktokenTokenizer, looks_like_tiktoken

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "ice_text.model")  # a checkpoint's, in order of preference
TOKENIZER_FILES_TEXT = "tokenizer.json, tokenizer.model or ice_text.model"  # the same, in messages
__all__ = ["load_tokenizer", "CHATGLM6B_VOCABULARY", "Tokenizer", "SentencePieceTokenizer", "ChatGLM2Tokenizer",
           "ChatGLM6BTokenizer", "TiktokenTokenizer", "HFTokenizer", "ChatGLMTokenizer", "StreamParser",
           "reply_format_of"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json preferred over tokenizer.model, as transformers
    prefers the fast tokenizer) or of one tokenizer file; its chat template and generation stop ids come
    from the files next to it. An unrecognised file is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        directory = path
        candidates = [path / name for name in TOKENIZER_FILES]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILES_TEXT} in this directory")
        file = found[0]
    elif path.is_file():
        directory, file = path.parent, path
    else:
        raise FileNotFoundError(f"tokenizer not found: {path}")
    config = read_tokenizer_config(directory)
    template = find_chat_template(directory, config)
    tok = _load_file(file, config, template)
    tok.generation_eos = _generation_eos(directory)
    return tok


def _load_file(file: Path, config: dict, template) -> Tokenizer:
    if is_chatglm6b(file):
        return ChatGLM6BTokenizer(file, config.get("num_image_tokens", DEFAULT_IMAGE_TOKENS))
    if file.suffix == ".json":
        return HFTokenizer(file, config, template, reply_format_of(template, _added_tokens(file)))
    if looks_like_tiktoken(file):
        special = _config_special_tokens(config)
        return TiktokenTokenizer(file, special, config, template, reply_format_of(template, special or {}))
    try:
        return (ChatGLM2Tokenizer if is_chatglm2(file.parent) else SentencePieceTokenizer)(file)
    except Exception:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError on a foreign file
        raise ValueError(f"{file}: not a SentencePiece model, a tiktoken BPE file or a tokenizer.json") from None


def reply_format_of(template, added_tokens) -> str:
    """`glm45` when the template (or, without one, the vocabulary) has GLM-4.5's `<arg_key>` tool calls,
    else `glm4`."""
    text = template if isinstance(template, str) else " ".join((template or {}).values())
    return "glm45" if "<arg_key>" in text or (not text and "<arg_key>" in added_tokens) else "glm4"


def _config_special_tokens(config: dict) -> dict[str, int] | None:
    decoder = config.get("added_tokens_decoder") or {}
    return {t["content"]: int(i) for i, t in decoder.items()} or None


def _added_tokens(file: Path) -> set[str]:
    try:
        return {t.get("content") for t in json.loads(file.read_text(encoding="utf-8")).get("added_tokens", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def _generation_eos(directory: Path) -> list[int] | None:
    path = directory / "generation_config.json"
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, int):
        return [eos]
    return [int(i) for i in eos] if isinstance(eos, list) and eos else None
