"""Reply parsers: generated text -> {"content", "reasoning_content", "tool_calls"} (docs/tokenizer.md).

Three reply formats, one per GLM generation:

* ``chatglm3``: ``metadata\\ncontent``; metadata empty for text, a tool name for a call whose body is a
  (fenced) ``tool_call(k=v, ...)``, ``interpreter`` for code.
* ``glm4`` (GLM-4-9B, GLM-4-0414, GLM-Z1): ``name\\n{json arguments}`` for a call, ``\\ncontent`` for text;
  several calls are several ``<|assistant|>`` segments. GLM-Z1 may think first (``<think>...</think>``).
* ``glm45`` (GLM-4.5 / 4.6 / 4.7 / 5): ``<think>reasoning</think>`` then content, with calls written as
  ``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>``; values are raw text, typed
  here by the tool's JSON schema.

Parsers never raise: whatever does not parse stays in ``content``. A tool call is returned in the OpenAI shape
``{"type": "function", "function": {"name": str, "arguments": dict}}`` with ``arguments`` already a dict (the
form GLM chat templates render back).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Iterable, Sequence

FORMATS = ("chatglm3", "glm4", "glm45", "plain")  # plain: ChatGLM2, text only

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_TOOL_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.DOTALL)
_FENCED = re.compile(r"^```[\w+-]*\n(.*?)\n?```$", re.DOTALL)


def tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI-style tool call."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def reply(content: str = "", reasoning: str | None = None, calls: Sequence[dict] = ()) -> dict[str, Any]:
    return {"content": content, "reasoning_content": reasoning, "tool_calls": list(calls)}


def parse(fmt: str, text: str, tools: Sequence[dict] | None = None) -> dict[str, Any]:
    """One generated reply (the text after the prompt's last ``<|assistant|>``) parsed by the parser of format
    ``fmt`` (`Tokenizer.parse_reply` passes its tokenizer's ``reply_format``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown reply format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(text, str):
        raise TypeError(f"expected the reply as str, got {type(text).__name__}")
    try:
        return {"chatglm3": _parse_chatglm3, "glm4": _parse_glm4, "glm45": _parse_glm45,
                "plain": lambda t, _: reply(t.strip())}[fmt](text, tools)
    except Exception:  # noqa: BLE001 - a parser bug must not lose the reply: it is content then
        return reply(text.strip())


# ---------------------------------------------------------------------------------------------------- thinking

def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest). ``<think>`` may be missing (the prompt already wrote it); an unclosed ``<think>``
    means the reply stopped while thinking."""
    if THINK_CLOSE in text:
        head, rest = text.split(THINK_CLOSE, 1)
        return head.split(THINK_OPEN, 1)[-1].strip(), rest
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].strip(), ""
    return None, text


# ---------------------------------------------------------------------------------------------------- glm45

def _parse_glm45(text: str, tools: Sequence[dict] | None) -> dict[str, Any]:
    reasoning, rest = split_reasoning(text)
    calls, outside, pos = [], [], 0
    for match in _TOOL_BLOCK.finditer(rest):
        call = parse_glm45_call(match.group(1), tools)
        if call is None:  # malformed block: keep its text
            continue
        outside.append(rest[pos:match.start()])
        pos = match.end()
        calls.append(call)
    outside.append(rest[pos:])
    return reply("".join(outside).strip(), reasoning, calls)


def parse_glm45_call(body: str, tools: Sequence[dict] | None) -> dict[str, Any] | None:
    """``name<arg_key>k</arg_key><arg_value>v</arg_value>...`` -> a tool call, or None when malformed."""
    name, _, args_text = body.partition("<arg_key>")
    name = name.strip()
    if not name or "<" in name or any(ch.isspace() for ch in name):
        return None
    args_text = "<arg_key>" + args_text if args_text else ""
    pairs = _ARG.findall(args_text)
    if _ARG.sub("", args_text).strip():  # text that is not a complete key/value pair
        return None
    schema = tool_parameters(tools, name)
    return tool_call(name, {k.strip(): typed_value(v, schema.get(k.strip())) for k, v in pairs})


def tool_parameters(tools: Sequence[dict] | None, name: str) -> dict[str, Any]:
    """JSON-schema ``properties`` of tool ``name`` (OpenAI ``{"function": {...}}`` or a bare function)."""
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return properties if isinstance(properties, dict) else {}
    return {}


def typed_value(raw: str, schema: dict | None) -> Any:
    """An ``<arg_value>`` as the type its schema declares. GLM-4.5's template writes strings raw and everything
    else as JSON, so: declared string (also ``["string", "null"]``) -> as written; anything else (or no schema)
    -> JSON when it parses, then a Python literal, else the string itself."""
    types = (schema or {}).get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "string" in types:  # a nullable string is still written raw; only a bare `null` means None
        return None if "null" in types and raw.strip() == "null" else raw
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if not isinstance(value, (set, complex, bytes)):
            return value
    return raw


# ---------------------------------------------------------------------------------------------------- glm4

def _parse_glm4(text: str, tools: Sequence[dict] | None) -> dict[str, Any]:
    reasoning, rest = split_reasoning(text)
    contents, calls = [], []
    for segment in rest.split("<|assistant|>"):
        metadata, body = segment.split("\n", 1) if "\n" in segment else ("", segment)
        call = _glm4_call(metadata.strip(), body)
        if call is None:
            contents.append(segment if metadata.strip() else body)
        else:
            calls.append(call)
    return reply("".join(contents).strip(), reasoning, calls)


def _glm4_call(name: str, body: str) -> dict[str, Any] | None:
    if not name or " " in name:
        return None
    try:
        arguments = json.loads(unfence(body))
    except ValueError:
        return None
    return tool_call(name, arguments) if isinstance(arguments, dict) else None


# ---------------------------------------------------------------------------------------------------- chatglm3

def _parse_chatglm3(text: str, tools: Sequence[dict] | None) -> dict[str, Any]:
    segment = text.split("<|assistant|>")[-1]
    metadata, body = segment.split("\n", 1) if "\n" in segment else ("", segment)
    name = metadata.strip()
    if not name:
        return reply(body.strip())
    if name == "interpreter":
        return reply("", None, [tool_call("interpreter", {"code": unfence(body)})])
    try:
        return reply("", None, [tool_call(name, parse_tool_call(unfence(body)))])
    except ValueError:
        return reply(segment.strip())


def unfence(content: str) -> str:
    """The code inside a ```fenced``` block (the whole text when it is not fenced), stripped."""
    content = content.strip()
    match = _FENCED.match(content)
    return match.group(1) if match else content


def parse_tool_call(code: str) -> dict[str, Any]:
    """Keyword arguments of a ``tool_call(k=v, ...)`` expression; values must be literals."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"tool call is not valid Python: {e.msg}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError(f"expected a tool_call(...) expression, got {code.strip()[:60]!r}")
    if call.args or any(k.arg is None for k in call.keywords):
        raise ValueError("tool_call takes keyword arguments only")
    parameters = {}
    for keyword in call.keywords:
        if keyword.arg in parameters:
            raise ValueError(f"tool_call argument {keyword.arg!r} is repeated")
        try:
            parameters[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"tool_call argument {keyword.arg!r} is not a literal: "
                             f"{ast.unparse(keyword.value)[:60]!r}") from None
    return parameters


# ---------------------------------------------------------------------------------------------------- streaming

class _Section:
    """Emits one section's text (reasoning or content) with the whitespace at its ends dropped, so that the
    concatenated events equal what `parse` returns."""

    def __init__(self, kind: str):
        self.kind, self.started, self.pending = kind, False, ""

    def emit(self, text: str) -> list[dict[str, Any]]:
        if not self.started:
            text = text.lstrip()
            if not text:
                return []
            self.started = True
        core = text.rstrip()
        if not core:
            self.pending += text
            return []
        out, self.pending = self.pending + core, text[len(core):]
        return [{"type": self.kind, "text": out}]


def _hold_back(buffer: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of `buffer` that could start one of `tags` (kept until more arrives)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(buffer)), best, -1):
            if buffer.endswith(tag[:n]):
                best = n
                break
    return best


class StreamParser:
    """Splits a reply into events as its text arrives: ``feed(delta)`` and ``finish()`` return lists of
    ``{"type": "reasoning" | "content", "text"}`` and ``{"type": "tool_call", "tool_call": {...}}``.

    ``thinking=True`` says the prompt already opened ``<think>`` (the reply starts inside the reasoning);
    None detects a leading ``<think>``. ``result()`` is `parse` of everything fed, the authoritative
    parse. A tool call is emitted whole, once its block (glm45) or the reply (glm4, chatglm3) is complete.
    """

    def __init__(self, fmt: str, tools: Sequence[dict] | None = None, thinking: bool | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown reply format {fmt!r}; expected one of {FORMATS}")
        self.fmt, self.tools, self.thinking = fmt, tools, thinking
        self.text, self._buffer, self._state = "", "", "start"
        self._reasoning, self._content = _Section("reasoning"), _Section("content")

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        self._buffer += delta
        try:
            return self._step(final=False)
        except Exception:  # noqa: BLE001 - never raise on model output; result() still parses it
            self._state = "broken"
            return []

    def finish(self) -> list[dict[str, Any]]:
        try:
            return self._step(final=True)
        except Exception:  # noqa: BLE001
            return []

    def result(self) -> dict[str, Any]:
        return parse(self.fmt, self.text, self.tools)

    # ------------------------------------------------------------------ state machine
    def _step(self, final: bool) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            handler = getattr(self, f"_on_{self._state}")
            progressed, new = handler(final)
            events += new
            if not progressed:
                return events

    def _on_broken(self, final):
        return False, []

    def _on_start(self, final):
        lead = self._buffer.lstrip()
        if self.fmt == "plain":
            self._state = "text"
            return True, []
        if self.fmt == "chatglm3":
            self._state = "metadata"
            return True, []
        if lead.startswith(THINK_OPEN):
            self._buffer, self._state = lead[len(THINK_OPEN):], "reasoning"
            return True, []
        if THINK_OPEN.startswith(lead) and not final:
            return False, []
        self._state = "reasoning" if self.thinking else self._after_reasoning()
        return True, []

    def _after_reasoning(self) -> str:
        return "content" if self.fmt == "glm45" else "metadata"

    def _on_reasoning(self, final):
        if THINK_CLOSE in self._buffer:
            head, self._buffer = self._buffer.split(THINK_CLOSE, 1)
            self._state = self._after_reasoning()
            return True, self._reasoning.emit(head)
        keep = 0 if final else _hold_back(self._buffer, [THINK_CLOSE])
        text, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return False, self._reasoning.emit(text) if text else []

    def _on_content(self, final):  # glm45: text, interrupted by <tool_call> blocks
        if TOOL_OPEN in self._buffer:
            head, self._buffer = self._buffer.split(TOOL_OPEN, 1)
            self._state = "tool"
            return True, self._content.emit(head)
        keep = 0 if final else _hold_back(self._buffer, [TOOL_OPEN])
        text, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return False, self._content.emit(text) if text else []

    def _on_tool(self, final):
        if TOOL_CLOSE in self._buffer:
            body, self._buffer = self._buffer.split(TOOL_CLOSE, 1)
            self._state = "content"
            call = parse_glm45_call(body, self.tools)
            if call is None:
                return True, self._content.emit(TOOL_OPEN + body + TOOL_CLOSE)
            return True, [{"type": "tool_call", "tool_call": call}]
        if final:  # an unclosed call is text
            text, self._buffer = TOOL_OPEN + self._buffer, ""
            return False, self._content.emit(text)
        return False, []

    def _on_metadata(self, final):  # glm4 / chatglm3: the first line names a tool, or is empty for text
        if "\n" not in self._buffer and not final:
            return False, []
        metadata = self._buffer.split("\n", 1)[0]
        if metadata.strip():
            self._state = "whole"
            return True, []
        self._buffer, self._state = self._buffer[len(metadata) + 1:], "text"
        return True, []

    def _on_text(self, final):
        keep = 0 if final else _hold_back(self._buffer, ["<|assistant|>"])
        if "<|assistant|>" in self._buffer:  # another segment (a call after text): decide at the end
            self._state = "whole"
            return True, []
        text, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return False, self._content.emit(text) if text else []

    def _on_whole(self, final):  # wait for the end, then parse the rest in one go
        if not final:
            return False, []
        rest, self._buffer = self._buffer, ""
        self._state = "done"
        parsed = parse(self.fmt, rest, self.tools)
        events = self._content.emit(parsed["content"]) if parsed["content"] else []
        return False, events + [{"type": "tool_call", "tool_call": c} for c in parsed["tool_calls"]]

    def _on_done(self, final):
        return False, []
