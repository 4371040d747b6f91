"""Which tokens of a rendered conversation the assistant writes: the SFT loss mask (docs/tokenizer.md,
"Assistant tokens").

A chat template renders a whole conversation at once, so the assistant's tokens are found by rendering
prefixes: for assistant message j, `before` = messages[:j] with the generation prompt and `after` =
messages[:j+1] without it. The tokens of `after` beyond their common prefix with `before` (and beyond
messages[:j] alone) are what the model generates for message j; they are masked in the full rendering, which
`after` must be a token prefix of. GLM-4.5+ templates show an assistant turn's reasoning only after the last
user message, so a prefix may show reasoning that the whole conversation hides: the prefixes are then rendered
from messages whose reasoning before the last user message is already dropped, which renders the same
conversation. Anything still inconsistent is an error, never a silently wrong mask.
"""

from __future__ import annotations

from typing import Any, Sequence


def assistant_mask(tok, messages: Sequence[dict[str, Any]], tools=None, enable_thinking=None):
    full = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=False,
                                   enable_thinking=enable_thinking)
    try:
        return full, _mask(tok, messages, tools, enable_thinking, full)
    except _NotPrefix:
        pass
    trimmed = _drop_old_reasoning(messages)
    if tok.apply_chat_template(trimmed, tools=tools, add_generation_prompt=False,
                               enable_thinking=enable_thinking) != full:
        raise ValueError("cannot locate the assistant tokens: this chat template does not render a conversation "
                         "as the concatenation of its prefixes")
    try:
        return full, _mask(tok, trimmed, tools, enable_thinking, full)
    except _NotPrefix as e:
        raise ValueError(f"cannot locate the assistant tokens of message {e.args[0]}: its rendering is not a "
                         "prefix of the whole conversation's") from None


class _NotPrefix(Exception):
    pass


def _mask(tok, messages, tools, enable_thinking, full) -> list[int]:
    mask = [0] * len(full)
    for j, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        render = lambda msgs, prompt: tok._chat(msgs, tools, prompt, enable_thinking, True)  # noqa: E731
        history, before, after = render(messages[:j], False), render(messages[:j], True), render(messages[:j + 1],
                                                                                                  False)
        if full[:len(after)] != after or after[:len(history)] != history:
            raise _NotPrefix(j)
        start = max(len(history), _common_prefix(before, after))
        mask[start:len(after)] = [1] * (len(after) - start)
    return mask


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _drop_old_reasoning(messages: Sequence[dict]) -> list[dict]:
    """Assistant messages before the last user message without their reasoning (also a `<think>` block written
    inside their content), as GLM-4.5+ templates render them in a whole conversation."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        if i < last_user and m.get("role") == "assistant":
            m = {k: v for k, v in m.items() if k not in ("reasoning_content", "thinking", "reasoning")}
            if isinstance(m.get("content"), str) and "</think>" in m["content"]:
                m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
        out.append(m)
    return out
