"""GLM-4-9B's tokenizer: a tiktoken byte-level BPE (`tokenizer.model`: one `base64(token bytes) rank` per line)
plus special tokens after the ranks (docs/tokenizer.md, "GLM-4-9B").

THUDM's `tokenization_chatglm.py` for glm-4-9b-chat builds `tiktoken.Encoding(pat_str=GLM4_PATTERN,
mergeable_ranks=file, special_tokens={token: len(ranks) + i})` with the fourteen tokens below, prefixes
`[gMASK] <sop>` when special tokens are added, and pads (left) with `<|endoftext|>`. transformers splits the
special-token strings out of any text before BPE (they are added tokens), so chat text rendered by a template
turns into special ids; `encode` does the same.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Iterable, Sequence

import tiktoken

from glm_jax.tokenizers.base import Tokenizer
from glm_jax.tokenizers.builtin import GLM4_TEMPLATE

# The pre-tokenization regex of THUDM's glm-4-9b-chat tokenization_chatglm.py (cl100k's pattern).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Special tokens in id order, starting right after the mergeable ranks (same file).
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken file; a malformed line is an error naming the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}: line {lineno} is not 'base64-token rank'") from None
    return ranks


def looks_like_tiktoken(path: Path) -> bool:
    """True when the file starts with a `base64 rank` text line (a SentencePiece model is protobuf)."""
    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except binascii.Error:
        return False
    return True


class TiktokenTokenizer(Tokenizer):
    """GLM-4-9B (tiktoken) tokenizer. `special_tokens` (content -> id) default to GLM-4-9B's fourteen after the
    ranks; `config` is tokenizer_config.json (pad / eos token names)."""

    kind = "tiktoken"
    builtin_template = GLM4_TEMPLATE

    def __init__(self, path: str | Path, special_tokens: dict[str, int] | None = None,
                 config: dict[str, Any] | None = None, chat_template=None, reply_format: str = "glm4"):
        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        if special_tokens is None:
            special_tokens = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
        self._special = dict(special_tokens)
        self._special_ids = {i: t for t, i in self._special.items()}
        self._decoder = {rank: token for token, rank in ranks.items()}
        self._encoding = tiktoken.Encoding(name=f"glm4:{self.path}", pat_str=GLM4_PATTERN,
                                           mergeable_ranks=ranks, special_tokens=self._special)
        self._vocab_size = max(max(ranks.values(), default=-1), max(self._special.values(), default=-1)) + 1
        config = config or {}
        self._eos = _token_name(config.get("eos_token")) or "<|endoftext|>"
        self._pad = _token_name(config.get("pad_token")) or self._eos
        self.chat_template, self.reply_format = chat_template, reply_format

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eos_token_id(self) -> int:
        return self._special[self._eos]

    @property
    def pad_token_id(self) -> int:
        return self._special[self._pad]

    @property
    def prefix_ids(self) -> list[int]:
        return [self._special["[gMASK]"], self._special["<sop>"]]

    def template_special_tokens(self) -> dict[str, str]:
        return {"eos_token": self._eos, "pad_token": self._pad}

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True):
        """Ids of `text` (special-token strings become their ids), after `[gMASK] <sop>` unless
        `add_special_tokens=False`. A list of texts gives a list of id lists."""
        if isinstance(text, (list, tuple)):
            batch = self._encoding.encode_batch([_check(t) for t in text], allowed_special="all")
            return [self.prefix_ids + ids if add_special_tokens else ids for ids in batch]
        ids = self._encoding.encode(_check(text), allowed_special="all")
        return self.prefix_ids + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: the bytes of each run of ordinary tokens decoded as UTF-8 (invalid bytes become
        U+FFFD), special tokens as their names unless skipped."""
        parts: list[str] = []
        run = bytearray()
        for i in (int(i) for i in ids):
            if i in self._special_ids:
                parts.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                if not skip_special_tokens:
                    parts.append(self._special_ids[i])
            elif i in self._decoder:
                run += self._decoder[i]
            else:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


def _token_name(value: Any) -> str | None:
    """A token from tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _check(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return text
