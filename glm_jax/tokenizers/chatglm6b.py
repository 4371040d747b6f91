"""ChatGLM-6B's tokenizer (THUDM, March 2023; docs/tokenizer.md, "ChatGLM-6B"), without the transformers
dependency of THUDM's ``tokenization_chatglm.py``:

* ``ice_text.model`` is a SentencePiece model whose pieces include the special tokens (``[MASK]``, ``[gMASK]``,
  ``[sMASK]``, ``<sop>``, ``<eop>``, ...), ``<n>`` for a newline, ``<|tab|>`` and ``<|blank_2|>`` ...
  ``<|blank_80|>`` for runs of spaces: text is rewritten into those pieces before SentencePiece sees it, and
  back after decoding;
* ids are the SentencePiece ids plus ``num_image_tokens`` (20,000 in the first revisions, which reserved the
  ids below for image tokens; ``tokenizer_config.json`` says how many, 0 in the last revision);
* a prompt ends with ``[gMASK] <sop>`` (``[MASK]`` or ``[gMASK]`` already in the text: no second mask, and
  ``</s>`` before ``<sop>`` unless the text ends with the mask), and generation stops at ``<eop>``;
* the chat prompt is the question alone for a first turn, else ``[Round i]\\n问：{q}\\n答：{a}\\n`` per earlier
  exchange (i from 0) then ``[Round n]\\n问：{q}\\n答：``; there is no system role and no tools.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm

from glm_jax.tokenizers.base import Tokenizer
from glm_jax.tokenizers.sentencepiece import chat_rounds

MAX_BLANK = 80
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
DEFAULT_IMAGE_TOKENS = 20000  # THUDM's default when tokenizer_config.json does not say
# A small vocabulary built like ice_text.model on the shipped corpus (data/build_data.py), with its
# tokenizer_config.json: what train.py gives a model with 2D positions when no tokenizer is named
CHATGLM6B_VOCABULARY = Path(__file__).resolve().parents[1] / "assets" / "chatglm6b"
_HAN = "\u4e00-\u9fff"
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


class ChatGLM6BTokenizer(Tokenizer):
    kind = "sentencepiece"
    reply_format = "plain"
    chat_template = None

    def __init__(self, model_file: str | Path, num_image_tokens: int = DEFAULT_IMAGE_TOKENS):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_file, self.num_image_tokens = path, int(num_image_tokens)
        self.sp_model = spm.SentencePieceProcessor(model_file=str(path))
        self._special_tokens = {t: self._piece_id(t) for t in SPECIAL_TOKENS + ("</s>", "<pad>", "<unk>")
                                if self.sp_model.piece_to_id(t) != self.sp_model.unk_id() or t == "<unk>"}

    def _piece_id(self, piece: str) -> int:
        return self.sp_model.piece_to_id(piece) + self.num_image_tokens

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def bos_token_id(self) -> int:
        return self._special_tokens["<sop>"]

    @property
    def eos_token_id(self) -> int:
        return self._special_tokens["<eop>"]

    @property
    def pad_token_id(self) -> int:
        return self._special_tokens.get("<pad>", self._special_tokens["<unk>"])

    @property
    def stop_ids(self) -> list[int]:
        return [int(i) for i in self.generation_eos] if self.generation_eos else [self.eos_token_id]

    # ------------------------------------------------------------------ text
    @staticmethod
    def preprocess(text: str) -> str:
        """Newlines, tabs and runs of 2..80 spaces as the pieces that stand for them (longest runs first)."""
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    @staticmethod
    def postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True):
        """Ids of ``text`` (with the prompt's ending ``[gMASK] <sop>`` unless ``add_special_tokens=False``); a
        list of texts gives a list of id lists."""
        if isinstance(text, (list, tuple)):
            return [self.encode(t, add_special_tokens) for t in text]
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        ids = [i + self.num_image_tokens for i in self.sp_model.encode(self.preprocess(text))]
        return self.prompt_end(ids) if add_special_tokens else ids

    def prompt_end(self, ids: list[int]) -> list[int]:
        """THUDM's ``build_inputs_with_special_tokens``: ``[gMASK]`` unless the text holds a mask already,
        ``</s>`` unless the text then ends with a mask, and ``<sop>``, where generation starts."""
        mask, gmask = self._special_tokens["[MASK]"], self._special_tokens["[gMASK]"]
        ids = list(ids)
        if mask not in ids and gmask not in ids:
            ids.append(gmask)
        if ids[-1] not in (mask, gmask):
            ids.append(self._special_tokens["</s>"])
        return ids + [self.bos_token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; image-token ids (below the offset) are dropped, pads too."""
        ids = [int(i) for i in ids]
        self.check_ids(ids)
        drop = {self.pad_token_id} | (set(self._special_tokens.values()) if skip_special_tokens else set())
        pieces = [i - self.num_image_tokens for i in ids if i >= self.num_image_tokens and i not in drop]
        return self.postprocess(self.sp_model.decode(pieces))

    # ------------------------------------------------------------------ chat
    def _builtin_chat(self, messages, tools, add_generation_prompt, enable_thinking, tokenize):
        if tools:
            raise ValueError("ChatGLM-6B's chat format has no tools")
        *history, (query, answer) = chat_rounds(messages, "ChatGLM-6B")
        if not history:
            text = query
        else:
            text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            text += f"[Round {len(history)}]\n问：{query}\n答："
        ids = self.encode(text)
        if answer is not None:  # a whole exchange (SFT): the answer after <sop>, closed by <eop>, as THUDM trains
            ids += self.encode(answer, add_special_tokens=False) + [self.eos_token_id]
        return ids if tokenize else self.decode(ids)

    def process_response(self, response: str | Sequence[int]) -> str:
        """THUDM's ``process_response``: stripped, ``[[训练时间]]`` -> 2023年, ASCII , ! : ; ? next to a Han
        character as their full-width forms."""
        text = self._reply_text(response).strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full in _PUNCTUATION:
            text = re.sub(rf"([{_HAN}]){ascii_mark}", rf"\1{full}", text)
            text = re.sub(rf"{ascii_mark}([{_HAN}])", rf"{full}\1", text)
        return text

    def parse_reply(self, reply: str | Sequence[int], tools: Sequence[dict] | None = None) -> dict[str, Any]:
        return {"content": self.process_response(reply), "reasoning_content": None, "tool_calls": []}


def is_chatglm6b(file: Path) -> bool:
    """A ChatGLM-6B vocabulary: THUDM names it ice_text.model."""
    return file.name == "ice_text.model"
