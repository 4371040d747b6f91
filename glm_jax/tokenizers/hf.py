"""`tokenizer.json` checkpoints (GLM-4-0414, GLM-4.5 and later; transformers' glm / glm4 conversions): the HF
`tokenizers` library does the work, exactly as transformers' fast tokenizer does (docs/tokenizer.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Tokenizer as _Tokenizer

from glm_jax.tokenizers.base import Tokenizer
from glm_jax.tokenizers.tiktoken_bpe import _check, _token_name

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from `tokenizer.json`; `config` is tokenizer_config.json (special-token names,
    extra added tokens)."""

    kind = "tokenizers"

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None, chat_template=None,
                 reply_format: str = "glm45"):
        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on a bad file
            raise ValueError(f"{self.path}: not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None
        self._config = config or {}
        self._add_config_tokens()
        self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        self._names = {k: _token_name(self._config.get(k)) for k in _SPECIAL_NAMES}
        self._names = {k: v for k, v in self._names.items() if v}
        self.chat_template, self.reply_format = chat_template, reply_format

    def _add_config_tokens(self):
        """Added tokens listed only in tokenizer_config.json (`added_tokens_decoder`), as transformers adds them."""
        known = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        extra = [(int(i), t) for i, t in (self._config.get("added_tokens_decoder") or {}).items()
                 if t.get("content") not in known]
        for _, t in sorted(extra):
            token = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                               rstrip=t.get("rstrip", False), normalized=t.get("normalized", False),
                               special=t.get("special", True))
            self._tok.add_tokens([token])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """All added tokens (content -> id), special or not (`<think>` is an added, non-special token)."""
        return dict(self._added)

    @property
    def eos_token_id(self) -> int:
        return self._id(self._names.get("eos_token") or "<|endoftext|>")

    @property
    def pad_token_id(self) -> int:
        name = self._names.get("pad_token") or self._names.get("eos_token") or "<|endoftext|>"
        return self._id(name)

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in {self.path}")
        return i

    def template_special_tokens(self) -> dict[str, str]:
        return dict(self._names)

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True):
        """Ids of `text` (added-token strings become their ids; tokenizer.json's post-processor adds its special
        tokens unless `add_special_tokens=False`). A list of texts gives a list of id lists."""
        if isinstance(text, (list, tuple)):
            batch = self._tok.encode_batch([_check(t) for t in text], add_special_tokens=add_special_tokens)
            return [e.ids for e in batch]
        return self._tok.encode(_check(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self.check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
