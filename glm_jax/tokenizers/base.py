"""The interface every GLM tokenizer offers (docs/tokenizer.md, "One interface").

A subclass provides the vocabulary (`encode`, `decode`, `special_tokens`, `eos_token_id`, `pad_token_id`,
`vocab_size`) and either a checkpoint chat template (`chat_template`) or `_builtin_chat`. This class adds chat
formatting, reply parsing, streaming parsing and left-padded batches on top, identically for all kinds.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from glm_jax.tokenizers import parsers, templates
from glm_jax.tokenizers.formats import openai_to_glm4, parse_arguments
from glm_jax.tokenizers.masks import assistant_mask


class Tokenizer:
    """Base class. Attributes set by subclasses: `chat_template` (str, dict of named templates, or None),
    `reply_format` (one of `parsers.FORMATS`), `kind` ("sentencepiece", "tiktoken", "tokenizers")."""

    kind = "base"
    chat_template: str | dict[str, str] | None = None
    reply_format = "glm4"
    builtin_template: str | None = None  # used when the checkpoint ships no chat template (builtin.py)
    generation_eos: Sequence[int] | None = None  # generation_config.json eos_token_id, when shipped

    # ------------------------------------------------------------------ vocabulary (subclasses)
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def eos_token_id(self) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        raise NotImplementedError

    def encode(self, text: str | Sequence[str], add_special_tokens: bool = True):
        raise NotImplementedError

    def embedding_ids(self, text: str, max_len: int) -> list[int]:
        """The ids a text is embedded from (glm_jax.embed, train.py's embedding task): its tokens without prefix
        tokens, cut to max_len - 1, then eos, the position "last" pooling reads (docs/knowledge.md)."""
        ids = list(self.encode(text, add_special_tokens=False))
        if self.eos_token_id is None:
            return ids[:max_len] or [self.pad_token_id or 0]
        return ids[:max_len - 1] + [self.eos_token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def check_ids(self, ids: Iterable[int]) -> None:
        """ValueError naming the first id outside the vocabulary."""
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {size})")

    def template_special_tokens(self) -> dict[str, str]:
        """The `bos_token` / `eos_token` / ... strings a chat template can read."""
        return {}

    # ------------------------------------------------------------------ ids
    def token_id(self, token: str) -> int | None:
        """Id of a special (added) token, or None."""
        return self.special_tokens.get(token)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a reply: generation_config.json's eos ids when shipped, else eos plus the role tokens
        that hand the turn back (`<|user|>`, `<|observation|>`)."""
        if self.generation_eos:
            return [int(i) for i in self.generation_eos]
        ids = [self.eos_token_id] + [self.token_id(t) for t in ("<|user|>", "<|observation|>")]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                            tokenize: bool = True, **kwargs: Any):
        """Ids (or text with `tokenize=False`) of an OpenAI-format conversation in the checkpoint's format.

        `messages`: dicts with `role` (system / user / assistant / tool), `content`, and for an assistant
        optionally `reasoning_content` and `tool_calls` ([{"function": {"name", "arguments"}}]). `tools`:
        OpenAI tool schemas. `enable_thinking`: None leaves the template's default. Extra keywords go to the
        template, as in transformers. Tool-call `arguments` may be a dict or a JSON string (parsed first).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("apply_chat_template expects a non-empty list of messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"a message must be a dict with a 'role', got {m!r:.80}")
        return self._chat(messages, tools, add_generation_prompt, enable_thinking, tokenize, **kwargs)

    def assistant_mask(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict] | None = None,
                       enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation (no generation prompt): mask 1 on the tokens the model writes for
        each assistant message (after its generation prompt: reasoning, content, tool calls), 0 elsewhere. The
        stop token after a turn is not included. See `masks.assistant_mask` and docs/tokenizer.md."""
        return assistant_mask(self, messages, tools, enable_thinking)

    def _chat(self, messages, tools, add_generation_prompt, enable_thinking, tokenize, **kwargs):
        """`apply_chat_template` without the checks (an empty conversation renders the bare prefix)."""
        template = self.chat_template if self.chat_template is not None else self.builtin_template
        if template is None:
            return self._builtin_chat(messages, tools, add_generation_prompt, enable_thinking, tokenize)
        source = templates.select_template(template, tools)
        text = templates.render(source, self.adapt_messages(messages, tools, source), tools=tools,
                                add_generation_prompt=add_generation_prompt,
                                special_tokens=self.template_special_tokens(),
                                enable_thinking=enable_thinking, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def adapt_messages(self, messages: Sequence[dict], tools: Sequence[dict] | None, source: str) -> list[dict]:
        """Messages in the shape `source` reads. OpenAI messages pass to templates that read OpenAI fields
        (GLM-4.5+, transformers' glm4) with only JSON-string `arguments` parsed into objects; templates of the
        GLM-4 `metadata` / `observation` dialect get assistant tool calls as `{"role": "assistant", "metadata":
        name, "content": json}` and tool results as `observation` messages (docs/tokenizer.md)."""
        if "tool_calls" in source or "metadata" not in source:
            return parse_arguments(messages)
        return openai_to_glm4(messages, tools, tools_on_message="item['tools']" in source)

    def tool_call_opening(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict], name: str | None = None,
                          enable_thinking: bool | None = None, **kwargs: Any) -> str:
        """The text a reply to `messages` must begin with to call the tool `name` (None: some tool, the model
        picks which), as this format writes an assistant tool call there: appended to the generation prompt it
        forces the call, and the model writes the rest in its trained format (OpenAI's `tool_choice`
        "required" / a named function; docs/serving.md). Read from the template's own rendering of such a
        call, so GLM-4.5's `\\n<tool_call>name\\n`, GLM-4.7's `<tool_call>name` and GLM-4's `name\\n` all
        come out right. ValueError when the format cannot be forced that way."""
        names = [t["function"]["name"] for t in tools or ()]
        if name is None and len(names) == 1:
            name = names[0]
        probe = name if name is not None else names[0] if names else None
        if probe is None:
            raise ValueError("tool_choice: forcing a tool call needs tools")
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": probe, "arguments": {}}}]}
        prompt = self.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                          enable_thinking=enable_thinking, **kwargs)
        full = self.apply_chat_template([*messages, call], tools=tools, add_generation_prompt=False,
                                        tokenize=False, enable_thinking=enable_thinking, **kwargs)
        rest = full[len(prompt):]
        at = rest.find(probe)
        if not full.startswith(prompt) or at < 0:
            raise ValueError("tool_choice: this chat template's generation prompt is not where it writes a tool "
                             "call, so a call cannot be forced; use \"auto\"")
        if name is None:
            if not rest[:at].strip():
                raise ValueError("tool_choice: \"required\" with several tools needs a format that opens a call "
                                 "before naming the tool (GLM-4.5 and later); this one starts with the name, so "
                                 "name the function")
            return rest[:at]
        end = at + len(name)
        return rest[:end + 1] if rest[end:end + 1] == "\n" else rest[:end]

    def _builtin_chat(self, messages, tools, add_generation_prompt, enable_thinking, tokenize):
        raise ValueError(f"{getattr(self, 'path', type(self).__name__)}: the checkpoint ships no chat template "
                         "(chat_template.jinja or tokenizer_config.json's chat_template) and has no built-in format")

    # ------------------------------------------------------------------ replies
    def parse_reply(self, reply: str | Sequence[int], tools: Sequence[dict] | None = None) -> dict[str, Any]:
        """{"content", "reasoning_content", "tool_calls"} of a generated reply (text, or the ids generated after
        the prompt; a trailing stop id is dropped). Never raises on model output."""
        return parsers.parse(self.reply_format, self._reply_text(reply), tools)

    def stream_parser(self, tools: Sequence[dict] | None = None, prompt: str | Sequence[int] | None = None):
        """A `parsers.StreamParser` for this format: feed it decoded text as it is generated. `prompt` (text or
        ids) tells whether the prompt already opened `<think>` (GLM-Z1's generation prompt does), so that the
        reply starts inside the reasoning; without it a leading `<think>` is detected."""
        thinking = None
        if prompt is not None:
            text = prompt if isinstance(prompt, str) else self.decode([int(i) for i in prompt])
            thinking = text.rstrip().endswith(parsers.THINK_OPEN)
        return parsers.StreamParser(self.reply_format, tools, thinking)

    def _reply_text(self, reply: str | Sequence[int]) -> str:
        if isinstance(reply, str):
            return reply
        ids = [int(i) for i in reply]
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.decode(ids)

    # ------------------------------------------------------------------ batches
    def batch_encode(self, batch: Sequence[str | Sequence[int]], max_length: int | None = None,
                     pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
        """Left-pad texts (encoded with special tokens) or id lists into int32 `input_ids`, `attention_mask`
        (1 = token) and `position_ids` (0, 1, ... from each row's first token; pads 0), `[batch, length]`.
        `length` is the longest row or `max_length`, rounded up to `pad_to_multiple_of`; rows are never
        truncated (a longer row is an error)."""
        if isinstance(batch, str) or not len(batch):
            raise ValueError("batch_encode expects a non-empty list of texts or id lists")
        rows = [self.encode(item) if isinstance(item, str) else [int(i) for i in item] for item in batch]
        for row in rows:
            self.check_ids(row)
        return left_pad(rows, self.pad_token_id, max_length, pad_to_multiple_of)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, max_length: int | None = None,
             pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
    """`batch_encode`'s arrays for id rows: left padding to the longest row or `max_length` (rounded up to
    `pad_to_multiple_of`), positions from 0 at each row's first token; a row longer than max_length is an error."""
    longest = max(len(row) for row in rows)
    length = longest if max_length is None else max_length
    if longest > length:
        raise ValueError(f"a sequence has {longest} tokens, more than max_length={max_length}")
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = {"input_ids": np.full((len(rows), length), pad_token_id, dtype=np.int32),
           "attention_mask": np.zeros((len(rows), length), dtype=np.int32),
           "position_ids": np.zeros((len(rows), length), dtype=np.int32)}
    for b, row in enumerate(rows):
        start = length - len(row)
        out["input_ids"][b, start:] = row
        out["attention_mask"][b, start:] = 1
        out["position_ids"][b, start:] = np.arange(len(row))
    return out
