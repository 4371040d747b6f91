"""OpenAI-format conversations in the older GLM dialects (docs/tokenizer.md, "Message dialects").

GLM-4.5+ templates read OpenAI messages directly (`tool_calls`, role `tool`, `reasoning_content`). ChatGLM3 and
the GLM-4 (GLM-4-9B, GLM-4-0414) templates write a tool call as an assistant message whose `metadata` is the
tool name, and a tool result as an `observation` message. These functions convert; messages already in the
old dialect (roles `observation`, `metadata` keys, ChatGLM3 `tools` on the system message) pass unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

# THUDM's ChatGLM3 system prompt when tools are given without one (THUDM's ChatGLM3 demos).
CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"


def call_parts(call: dict[str, Any]) -> tuple[str, Any]:
    """(name, arguments) of an OpenAI tool call; `arguments` may be a dict or a JSON string."""
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"a tool call needs function.name, got {call!r:.80}")
    return function["name"], function.get("arguments", {})


def arguments_dict(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as a dict (OpenAI sends them as a JSON string)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ValueError(f"tool-call arguments are not JSON: {arguments[:60]!r}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool-call arguments must be an object, got {type(arguments).__name__}")
    return arguments


def arguments_text(arguments: Any) -> str:
    """Arguments as GLM-4 writes them after the tool name: the JSON string as given, or a dict as JSON."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def content_text(content: Any) -> str:
    """A message's text: a string as is; a list of OpenAI content parts joined; anything else as JSON."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    try:
        return json.dumps(content, ensure_ascii=False)
    except TypeError:
        return str(content)


def parse_arguments(messages: Sequence[dict]) -> list[dict]:
    """Messages whose tool-call `arguments` JSON strings (the OpenAI wire form) are parsed into objects, the form
    GLM-4.5+ templates iterate over; anything else passes unchanged."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls and any(isinstance(c.get("function", {}).get("arguments"), str) for c in calls if isinstance(c, dict)):
            m = {**m, "tool_calls": [_parsed_call(c) for c in calls]}
        out.append(m)
    return out


def _parsed_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = arguments_dict(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def openai_to_glm4(messages: Sequence[dict], tools: Sequence[dict] | None,
                   tools_on_message: bool = False) -> list[dict]:
    """GLM-4 dialect. `tools_on_message`: the template (GLM-4-9B's) reads tools from a message's `tools`
    key rather than the `tools` variable, so they go on a leading system message, as THUDM's server did."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            text = content_text(m.get("content"))
            if text.strip():
                out.append({**_without(m, "tool_calls"), "content": text})
            for call in m["tool_calls"]:
                name, arguments = call_parts(call)
                out.append({"role": "assistant", "metadata": name, "content": arguments_text(arguments)})
        elif role == "tool":
            out.append({"role": "observation", "content": content_text(m.get("content"))})
        elif isinstance(m.get("content"), list):  # OpenAI content parts: these templates print a string
            out.append({**m, "content": content_text(m["content"])})
        else:
            out.append(dict(m))
    if tools_on_message and tools and not any("tools" in m for m in out):
        out.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return out


def openai_to_chatglm3(messages: Sequence[dict], tools: Sequence[dict] | None) -> list[dict]:
    """ChatGLM3 messages for `ChatGLMTokenizer.build_message`: tools (bare function schemas) on the system
    message, tool calls as `{"name", "parameters"}` assistant content (the `interpreter` tool as its code),
    tool results as `observation`; reasoning is dropped (ChatGLM3 does not think)."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            text = content_text(m.get("content"))
            if text.strip():
                out.append({"role": "assistant", "content": text})
            for call in m["tool_calls"]:
                out.append(_chatglm3_call(*call_parts(call)))
        elif role == "tool":
            out.append({"role": "observation", "content": content_text(m.get("content"))})
        else:
            message = {"role": role, "content": content_text(m.get("content"))}
            message.update({k: m[k] for k in ("metadata", "tools") if m.get(k) is not None})
            if role == "assistant" and isinstance(m.get("content"), dict):
                message["content"] = m["content"]  # ChatGLM3's own {"name", "parameters"} call
            out.append(message)
    if tools:
        functions = [t.get("function", t) for t in tools]
        if out and out[0]["role"] == "system" and "tools" not in out[0]:
            out[0] = {**out[0], "tools": functions}
        elif not (out and "tools" in out[0]):
            out.insert(0, {"role": "system", "content": CHATGLM3_TOOL_SYSTEM, "tools": functions})
    return out


def _chatglm3_call(name: str, arguments: Any) -> dict:
    arguments = arguments_dict(arguments)
    if name == "interpreter" and set(arguments) == {"code"}:
        return {"role": "assistant", "metadata": "interpreter",
                "content": "```python\n" + str(arguments["code"]) + "\n```"}
    return {"role": "assistant", "content": {"name": name, "parameters": arguments}}


def _without(message: dict, *keys: str) -> dict:
    return {k: v for k, v in message.items() if k not in keys}


# ---------------------------------------------------------------------------------------------------- tool schemas

def check_tools(tools: Any, key: str = "tools", context: str | None = None) -> None:
    """ValueError naming the first bad entry (`key[i]: ...`, then `(context: the entry's JSON)` when `context` is
    given) unless `tools` is None or a list of function tools: OpenAI's {"type": "function", "function": {"name",
    "description"?, "parameters"?}} or the bare function object (what THUDM's ChatGLM3 demos and training data
    carry), `parameters` a JSON-schema object. One check for chat sessions, the chat CLI and SFT records."""
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{key}: must be a list of tool objects, got {type(tools).__name__} {tools!r:.40}")
    for i, tool in enumerate(tools):
        why = _tool_problem(tool)
        if why is not None:
            shown = f" ({context}: {json.dumps(tool, default=repr)[:120]})" if context else ""
            raise ValueError(f"{key}[{i}]: {why}{shown}")


def _tool_problem(tool: Any) -> str | None:
    """Why `tool` is not a function tool (check_tools), or None."""
    if not isinstance(tool, dict):
        return f"must be a tool object, got {type(tool).__name__} {tool!r:.40}"
    where = ""
    if "function" in tool or "type" in tool:
        if tool.get("type", "function") != "function":
            return f"type: only \"function\" tools are supported, got {tool['type']!r}"
        if not isinstance(tool.get("function"), dict):
            return f"function: must be an object with a name, got {type(tool.get('function')).__name__}"
        tool, where = tool["function"], "function."
    name, params = tool.get("name"), tool.get("parameters")
    if not isinstance(name, str) or not name.strip():
        return f"{where}name: must be a non-empty string, got {name!r}"
    if "description" in tool and not isinstance(tool["description"], str):
        return f"{where}description: must be a string, got {type(tool['description']).__name__}"
    if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
        got = f"type {params.get('type')!r}" if isinstance(params, dict) else f"{type(params).__name__} {params!r}"
        return f"{where}parameters: must be a JSON-schema object ({{\"type\": \"object\", ...}}), got {got}"
    return None
