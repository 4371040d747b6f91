"""Chat templates: the checkpoint's own jinja template, rendered the way transformers renders it.

transformers' `apply_chat_template` (transformers/utils/chat_template_utils.py) compiles the template in an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols` extension, its
own `tojson` filter (json.dumps, non-ASCII kept, optional indent / separators / sort_keys), and the globals
`raise_exception`, `strftime_now`, `dict` and `namespace`; it renders with `messages`, `tools`, `documents`,
`add_generation_prompt` and the tokenizer's special-token strings (`bos_token`, `eos_token`, ...) plus any
keyword (`enable_thinking`). Messages lose their None-valued keys first, and a message's reasoning is copied
under both `reasoning_content` and `thinking`. Doing exactly that here gives the same text, hence the same ids.
See docs/tokenizer.md ("Chat templates").
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """`tokenizer_config.json` of a checkpoint directory, or {} when there is none."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def find_chat_template(directory: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The template a checkpoint ships: `chat_template.jinja` first (what transformers saves and prefers),
    then `chat_template` in tokenizer_config.json (a string, or a list of named templates)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template or None


def select_template(template: str | dict[str, str], tools: Sequence[Any] | None) -> str:
    """One template out of a named set, as transformers picks it: `tool_use` when tools are given and it
    exists, else `default`."""
    if isinstance(template, str):
        return template
    if tools is not None and "tool_use" in template:
        return template["tool_use"]
    if "default" not in template:
        raise ValueError(f"the checkpoint's named chat templates {sorted(template)} have no 'default'")
    return template["default"]


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template, in a sandbox configured like transformers' (see the module docstring)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(source)


def render(source: str, messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
           add_generation_prompt: bool = True, special_tokens: dict[str, str] | None = None,
           **kwargs: Any) -> str:
    """Text of a conversation under `source`. `kwargs` whose value is None are not passed (so a template's
    `enable_thinking is defined` stays false unless asked)."""
    messages = [_alias_reasoning({k: _plain(v) for k, v in m.items() if v is not None}) for m in messages]
    variables = dict(special_tokens or {})
    variables.update({k: _plain(v) for k, v in kwargs.items() if v is not None})
    tools = _plain(list(tools)) if tools is not None else None
    try:
        return compile_template(source).render(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


# ---------------------------------------------------------------------------------------------------- helpers

def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _plain(value: Any) -> Any:
    """A deep copy in plain JSON types, so the template sees no caller objects (and cannot mutate them)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):  # subclasses (enums, numpy strings) back to the base type
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore attributes (as transformers does)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()
