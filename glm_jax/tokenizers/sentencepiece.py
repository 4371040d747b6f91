"""ChatGLM2 / ChatGLM3 tokenizers: a SentencePiece model plus special tokens (docs/tokenizer.md).

Mirrors THUDM's ``tokenization_chatglm.py`` without the transformers dependency:

* the special tokens are not SentencePiece pieces; they take the ids right after the SentencePiece vocabulary
  (``sp size + index``): nine for ChatGLM3, the first five for ChatGLM2;
* every prompt starts with ``[gMASK] sop``;
* a ChatGLM3 message is ``<|role|>`` + ``sp(metadata + "\\n")`` + ``sp(content)``, the two parts encoded
  separately so each gets its own dummy-prefix ``▁``;
* special-token strings inside text are plain text (THUDM's default, ``encode_special_tokens=False``), so user
  input cannot forge a role token.

`SentencePieceTokenizer` is ChatGLM3 behind the common `Tokenizer` interface (what `load_tokenizer` returns),
`ChatGLM2Tokenizer` its ChatGLM2 variant, and `ChatGLMTokenizer` the same ChatGLM3 tokenizer with THUDM's own
prompt and response methods added (`build_chat_input`, `process_response`) for code written against THUDM's.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from glm_jax.tokenizers.base import Tokenizer
from glm_jax.tokenizers.formats import openai_to_chatglm3
from glm_jax.tokenizers.parsers import parse_tool_call, unfence

DEFAULT_MODEL_FILE = Path(__file__).resolve().parents[1] / "assets" / "tokenizer.model"

SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")

# How a tool call is written in an assistant turn (THUDM's finetune demo).
TOOL_CALL_PREFIX = "```python\n"
TOOL_CALL_SUFFIX = "\n```"


class SentencePieceTokenizer(Tokenizer):
    """ChatGLM3's tokenizer behind the common interface. ``model_file=None`` loads the small SentencePiece model
    shipped with glm_jax. The chat format is built in code (`build_message`; a shipped jinja template is not
    used: it cannot express the separately encoded metadata and content); OpenAI messages map onto ChatGLM3's
    roles through `formats.openai_to_chatglm3`."""

    kind = "sentencepiece"
    reply_format = "chatglm3"
    chat_template = None
    special_token_names: Sequence[str] = SPECIAL_TOKENS

    def __init__(self, model_file: str | Path | None = None):
        path = Path(model_file) if model_file is not None else DEFAULT_MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_file = path
        self.sp_model = spm.SentencePieceProcessor(model_file=str(path))
        n = self.sp_model.get_piece_size()
        self._special_tokens = {token: n + i for i, token in enumerate(self.special_token_names)}
        self._special_ids = {i: token for token, i in self._special_tokens.items()}

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size() + len(self._special_tokens)

    @property
    def pad_token_id(self) -> int:
        return self.sp_model.unk_id()  # ChatGLM pads with <unk>

    @property
    def bos_token_id(self) -> int:
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self.sp_model.eos_id()

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def prefix_ids(self) -> list[int]:
        """``[gMASK] sop``, the start of every prompt."""
        return [self._special_tokens["[gMASK]"], self._special_tokens["sop"]]

    def get_command(self, name: str) -> int:
        """Id of a special token, or of ``<bos>``/``<eos>``/``<pad>`` (THUDM's names)."""
        aliases = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        if name in aliases:
            return aliases[name]
        if name not in self._special_tokens:
            raise KeyError(f"{name!r} is not a special token; expected one of {list(self._special_tokens)}")
        return self._special_tokens[name]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Pieces or special-token names to ids; an unknown piece maps to <unk> as in SentencePiece."""
        if isinstance(tokens, str):
            return self._special_tokens.get(tokens, self.sp_model.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            self.check_ids([ids])
            return self._special_ids.get(int(ids)) or self.sp_model.id_to_piece(int(ids))
        return [self.convert_ids_to_tokens(i) for i in ids]

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces of ``text`` (no special tokens added)."""
        return self.sp_model.encode(self._check_text(text), out_type=str)

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True,
               num_threads: int = -1) -> list[int] | list[list[int]]:
        """Ids of ``text``, prefixed with ``[gMASK] sop`` unless ``add_special_tokens=False``. A list of texts
        gives a list of id lists, SentencePiece encoding them on ``num_threads`` threads (-1: all cores)."""
        if not isinstance(text, (list, tuple)):
            ids = self.sp_model.encode(self._check_text(text))
            return self.prefix_ids + ids if add_special_tokens else ids
        batch = self.sp_model.encode([self._check_text(t) for t in text], num_threads=num_threads)
        return [self.prefix_ids + ids if add_special_tokens else ids for ids in batch]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Special tokens render as their names unless skipped (pads too)."""
        ids = [int(i) for i in ids]
        self.check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids and i != self.pad_token_id]
        # Like THUDM: decode the runs between special tokens separately, so each run
        # loses its own leading dummy-prefix space.
        text, run = [], []
        for i in ids:
            if i in self._special_ids:
                text += [self.sp_model.decode(run), self._special_ids[i]]
                run = []
            else:
                run.append(i)
        text.append(self.sp_model.decode(run))
        return "".join(text)

    # ------------------------------------------------------------------ ChatGLM3 messages
    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + sp(metadata + "\\n") + sp(message)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {list(ROLES)}")
        return ([self._special_tokens[f"<|{role}|>"]]
                + self.sp_model.encode(self._check_text(metadata) + "\n")
                + self.sp_model.encode(self._check_text(message)))

    def build_message(self, message: dict[str, Any]) -> list[int]:
        """One ChatGLM3 message ``{"role", "content", "metadata"?, "tools"?}`` as ids.

        A system message's ``tools`` are appended to its content as indented JSON; an
        assistant ``content`` given as ``{"name", "parameters"}`` is written as the
        fenced ``tool_call(...)`` block THUDM trains on, with the tool name as metadata.
        """
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"a message must be a dict with 'role' and 'content', got {message!r:.80}")
        role, content, metadata = message["role"], message["content"], message.get("metadata", "")
        if "tools" in message:
            if role != "system":
                raise ValueError(f"only a system message may carry tools, not a {role!r} message")
            content = self._check_text(content) + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        if isinstance(content, dict):
            if role != "assistant" or set(content) != {"name", "parameters"}:
                raise ValueError("dict content must be an assistant tool call {'name', 'parameters'}")
            metadata = content["name"]
            content = format_tool_call(content["parameters"])
        return self.build_single_message(role, metadata, content)

    def _builtin_chat(self, messages, tools, add_generation_prompt, enable_thinking, tokenize):
        ids = list(self.prefix_ids)
        for message in openai_to_chatglm3(messages, tools):
            ids += self.build_message(message)
        if add_generation_prompt:
            ids.append(self._special_tokens["<|assistant|>"])
        return ids if tokenize else self.decode(ids)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_text(text: Any) -> str:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return text


def format_tool_call(parameters: dict[str, Any]) -> str:
    """``parameters`` as the fenced ``tool_call(k=v, ...)`` block of an assistant turn."""
    if not isinstance(parameters, dict):
        raise ValueError(f"tool parameters must be a dict, got {type(parameters).__name__}")
    call = ast.Call(func=ast.Name(id="tool_call"), args=[],
                    keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in parameters.items()])
    return TOOL_CALL_PREFIX + ast.unparse(call) + TOOL_CALL_SUFFIX


class ChatGLMTokenizer(SentencePieceTokenizer):
    """ChatGLM3's tokenizer with THUDM's prompt and response methods, for code written against THUDM's
    ``tokenizer.build_chat_input`` / ``model.process_response``. Everything else (and `parse_reply`, the
    common reply shape) is `SentencePieceTokenizer`'s."""

    def build_chat_input(self, query: str, history: Sequence[dict[str, Any]] | None = None,
                         role: str = "user") -> list[int]:
        """Prompt ids: ``[gMASK] sop`` + history (ChatGLM3 messages) + the new ``role`` message + ``<|assistant|>``.
        Returns a plain id list; use ``batch_encode([ids])`` for model-ready arrays."""
        ids = list(self.prefix_ids)
        for message in history or ():
            ids += self.build_message(message)
        ids += self.build_single_message(role, "", query)
        return ids + [self._special_tokens["<|assistant|>"]]

    def process_response(self, output: str | Sequence[int], history: Sequence[dict[str, Any]]
                         ) -> tuple[str | dict[str, Any], list[dict[str, Any]]]:
        """THUDM's ``process_response``: ``(response, history)`` for a generated reply (text, or the ids after the
        prompt; a trailing stop id is dropped). Each ``<|assistant|>`` segment is appended to a copy of
        ``history`` as ``{"role": "assistant", "metadata", "content"}``; the response is the last segment's
        stripped text when its metadata line is empty, else ``{"name", "parameters"}`` when ``history[0]`` is a
        system message with tools, else ``{"name", "content"}``. THUDM ``eval``s a call's ``tool_call(k=v)``;
        here the arguments must be Python literals (`parsers.parse_tool_call`), nothing runs, and anything else
        is a ValueError."""
        text = self._reply_text(output)
        history = copy.deepcopy(list(history))
        response: str | dict[str, Any] = ""
        for segment in text.split("<|assistant|>"):
            metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
            if not metadata.strip():
                content = content.strip()
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                response = content.replace("[[训练时间]]", "2023年")
                continue
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            name = metadata.strip()
            if history[0]["role"] == "system" and "tools" in history[0]:
                response = {"name": name, "parameters": parse_tool_call(unfence(content))}
            else:
                response = {"name": name, "content": content}
        return response, history


class ChatGLM2Tokenizer(SentencePieceTokenizer):
    """ChatGLM2-6B: ChatGLM3's SentencePiece model with only the five ``[MASK]`` ... ``eop`` special tokens and a
    plain-text chat prompt (THUDM's chatglm2-6b ``build_prompt``; docs/tokenizer.md): after ``[gMASK] sop``,
    one ``[Round n]\n\n问：{query}\n\n答：{reply}\n\n`` per earlier exchange (n from 1), then
    ``[Round n]\n\n问：{query}\n\n答：``. The format has no system role and no tools; a reply ends with eos."""

    reply_format = "plain"
    special_token_names = SPECIAL_TOKENS[:5]

    def _builtin_chat(self, messages, tools, add_generation_prompt, enable_thinking, tokenize):
        if tools:
            raise ValueError("ChatGLM2's chat format has no tools")
        text = "".join(f"[Round {i}]\n\n问：{q}\n\n答：" + ("" if a is None else f"{a}\n\n")
                       for i, (q, a) in enumerate(chat_rounds(messages, "ChatGLM2"), 1))
        ids = self.encode(text)
        return ids if tokenize else self.decode(ids)


def chat_rounds(messages: Sequence[dict[str, Any]], name: str) -> list[tuple[str, str | None]]:
    """(question, answer) per round of a plain-text chat format (ChatGLM-6B's, ChatGLM2's): user and assistant
    messages alternating from a user one; the last answer is None when the conversation ends with a question.
    ValueError naming the message otherwise (these formats have no system or tool role)."""
    rounds: list[tuple[str, str | None]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: {name}'s chat format alternates user and assistant messages "
                             f"(no system or tool role), got {role!r} where {expected!r} belongs")
        if role == "user":
            rounds.append((content, None))
        else:
            rounds[-1] = (rounds[-1][0], content)
    return rounds


def is_chatglm2(directory: Path) -> bool:
    """Whether a checkpoint directory is ChatGLM2's: its ``tokenization_chatglm.py`` (read as text, never run) has
    no ChatGLM3 role tokens, or, without that file, config.json's ``_name_or_path`` names chatglm2. ChatGLM2 and
    ChatGLM3 ship the same tokenizer.model, so nothing else tells them apart."""
    code = directory / "tokenization_chatglm.py"
    if code.is_file():
        return "<|user|>" not in code.read_text(encoding="utf-8", errors="replace")
    try:
        name = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        return False
    return "chatglm2" in str(name).lower()

