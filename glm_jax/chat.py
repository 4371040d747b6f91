"""Multi-turn ChatGLM3 chat: `ChatSession` for Python, and a terminal front end.

    python -m glm_jax.chat --checkpoint DIR [--tokenizer tokenizer.model] [--system TEXT] [--tools tools.json]
                           [--max-new-tokens N] [--temperature 0.8] [--top-p 0.8] [--top-k 0] [--dtype bfloat16]

DIR is a THUDM (`chatglm`) or transformers (`glm`) checkpoint directory (`glm_jax.load_hf`). In the terminal:
`/reset` starts over (keeping the system prompt and tools), `/exit` (or EOF) quits. Replies stream as they are
generated; a tool call is printed as a structured call and the tool's result is read from the terminal and sent
back as an `<|observation|>` message. Exit status: 0 after `/exit` or end of input; 2 for bad arguments (a missing
or unreadable checkpoint, tokenizer or tools file, tools that are not a list of objects), reported as one
`error: ...` line on stderr naming the option and the file.

    session = ChatSession(model, params, tokenizer, system="...", tools=[...], temperature=0.8, top_p=0.8)
    reply = session.send("What's the weather in Paris?")    # {"type": "text", "content": ...}
    if reply["type"] == "tool_call":                         # {"type", "name", "parameters", "content"}
        reply = session.observe({"temperature": 21})
    for piece in session.stream("and tomorrow?"):           # text as it is generated
        print(piece, end="")
    session.last_reply                                       # the parsed reply of the last stream

History is kept as ChatGLM3 messages ({"role", "content", "metadata"?, "tools"?}), exactly what the tokenizer's
`build_chat_input` takes, the same way THUDM's `model.chat` keeps it: an assistant tool call is stored with the
tool name as metadata and the raw fenced `tool_call(...)` text as content. Each turn re-encodes the whole
conversation (bucketed shapes, so that does not recompile per turn) and stops on the tokenizer's stop ids
(eos, `<|user|>`, `<|observation|>`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from glm_jax.config import DTYPES

# The module, even if the package re-exports a `generate` function under the same name.
from glm_jax import generation as _generate

log = logging.getLogger(__name__)

# THUDM's default system prompt when tools are given without one (ChatGLM3 demo).
DEFAULT_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"


class ChatSession:
    """One conversation with a ChatGLM3-style model (see the module docstring).

    Sampling keywords go to `glm_jax.generation.stream_generate`: max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, seed (advanced by one each turn so turns differ), mesh, chunk.
    """

    def __init__(self, model, params, tokenizer, system: str | None = None, tools: Sequence[dict] | None = None,
                 *, max_new_tokens: int = 512, temperature: float = 0.8, top_p: float = 0.8, top_k: int = 0,
                 repetition_penalty: float = 1.0, seed: int = 0, mesh=None, chunk: int = 1):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of dicts (ChatGLM3 tool descriptions)")
        self.system = system
        self.tools = list(tools) if tools else None
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, mesh=mesh, chunk=chunk)
        self.seed = int(seed)
        self.turns = 0
        self.last_reply: dict[str, Any] | None = None
        self.last_ids: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.reset()

    # ------------------------------------------------------------------ conversation
    def reset(self) -> None:
        """Forgets the conversation, keeping the system prompt and tools."""
        self.history = []
        if self.system is not None or self.tools:
            message: dict[str, Any] = {"role": "system",
                                       "content": self.system if self.system is not None else DEFAULT_TOOL_SYSTEM}
            if self.tools:
                message["tools"] = copy.deepcopy(self.tools)
            self.history.append(message)
        self.last_reply, self.last_ids = None, []

    @property
    def pending_tool_call(self) -> dict[str, Any] | None:
        """The last reply if it is a tool / code call still waiting for `observe`."""
        if self.last_reply is not None and self.last_reply["type"] in ("tool_call", "code"):
            return self.last_reply
        return None

    def send(self, text: str, role: str = "user") -> dict[str, Any]:
        """Sends a message, generates the reply, returns it parsed (see `tokenizer.parse_reply`)."""
        for _ in self.stream(text, role):
            pass
        return self.last_reply

    def observe(self, result: Any) -> dict[str, Any]:
        """Answers a tool call with its result (a string, or anything JSON-serializable) and returns the reply."""
        return self.send(_observation_text(result), role="observation")

    def stream_observe(self, result: Any) -> Iterator[str]:
        return self.stream(_observation_text(result), role="observation")

    def stream(self, text: str, role: str = "user") -> Iterator[str]:
        """Sends a message and yields the reply's text as it is generated.

        When the iterator is exhausted the reply is in `last_reply` (parsed) and `last_ids`, and both messages are
        in `history`. Stopping early (closing the iterator) records the partial reply.
        """
        if not isinstance(text, str):
            raise TypeError(f"message text must be a str, got {type(text).__name__}")
        if role not in ("user", "observation"):
            raise ValueError(f"role must be 'user' or 'observation', got {role!r}")
        tok = self.tokenizer
        prompt = tok.build_chat_input(text, history=self.history, role=role)
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and len(prompt) + self.sampling["max_new_tokens"] > cfg.max_seq_len:
            log.warning("conversation (%d tokens) + max_new_tokens exceeds the model's max_seq_len %d; "
                        "consider /reset", len(prompt), cfg.max_seq_len)
        stops = set(tok.stop_ids)
        ids: list[int] = []
        shown = ""  # reply text yielded so far
        header = None  # the first line (metadata): "" for a text reply, a tool name for a call
        finished = False

        def text_delta(body: str):
            nonlocal shown
            if body.endswith("\ufffd") or not body.startswith(shown):  # partial multi-byte char / re-segmentation
                return ""
            delta, shown = body[len(shown):], body
            return delta

        try:
            for token in _generate.stream_generate(
                    self.model, self.params, np.asarray(prompt, np.int32), stop_ids=tuple(tok.stop_ids),
                    pad_id=tok.pad_token_id, seed=self.seed + self.turns, vocab_limit=tok.vocab_size,
                    **self.sampling):
                if token in stops:
                    break
                ids.append(int(token))
                full = tok.decode(ids)
                if header is None:
                    if "\n" not in full:
                        continue  # still inside the metadata line
                    header = full.split("\n", 1)[0].strip()
                if header:  # a tool / code call: reported through last_reply, not streamed
                    continue
                delta = text_delta(full.split("\n", 1)[1].lstrip())
                if delta:
                    yield delta
            if header is None and ids:  # a reply without a metadata line is plain text
                delta = text_delta(tok.decode(ids).strip())
                if delta:
                    yield delta
            finished = True
        finally:
            self._record(text, role, ids, finished)

    # ------------------------------------------------------------------ internals
    def _record(self, text: str, role: str, ids: list[int], finished: bool) -> None:
        self.turns += 1
        self.last_ids = ids
        reply = parse_reply(self.tokenizer, ids)
        if not finished:
            reply["interrupted"] = True
        self.last_reply = reply
        self.history.append({"role": role, "content": text})
        if reply["type"] == "text":
            self.history.append({"role": "assistant", "metadata": "", "content": reply["content"]})
        else:
            self.history.append({"role": "assistant", "metadata": reply["name"], "content": reply["content"]})


def parse_reply(tokenizer, ids: Sequence[int]) -> dict[str, Any]:
    """`tokenizer.parse_reply`, but a reply whose first line looks like a tool name and whose body is not a valid
    `tool_call(...)` comes back as text (with `"error"`), instead of raising."""
    try:
        return tokenizer.parse_reply(list(ids))
    except ValueError as e:
        text = tokenizer.decode(list(ids))
        return {"type": "text", "content": text.split("<|assistant|>")[-1].strip(), "error": str(e)}


def _observation_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except TypeError:
        return str(result)


# ---------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path, **overrides):
    """(GLMConfig, params) from a checkpoint directory: THUDM / transformers (config.json) via `load_hf`.

    or a `python train.py` run directory (its orbax checkpoints) via `glm_jax.train.loop.load_run`.
    """
    from glm_jax import load_hf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if (path / "config.json").exists():
        return load_hf(path, **overrides)
    if path.is_dir() and _looks_like_orbax(path):
        return load_orbax_run(path, **overrides)
    raise ValueError(f"{path}: not a checkpoint directory (expected a config.json from a THUDM or transformers "
                     f"checkpoint, or an orbax training run)")


def _looks_like_orbax(path: Path) -> bool:
    """A `python train.py` run directory: its resolved config and orbax checkpoints."""
    return (path / "config.yaml").exists() and (path / "checkpoints").is_dir()


def load_orbax_run(path: Path, **overrides):
    """(GLMConfig, params) of the latest checkpoint of a `python train.py` run directory (LoRA merged, P-tuning
    prefix in place); `overrides` are GLMConfig fields (e.g. dtype)."""
    from glm_jax.train.loop import load_run

    cfg, params = load_run(path)
    return cfg.replace(**overrides), params


# ---------------------------------------------------------------------------------------------------- terminal
def _print_call(reply: dict, out) -> None:
    if reply["type"] == "tool_call":
        call = {"name": reply["name"], "parameters": reply["parameters"]}
        out.write(f"\n[tool call] {json.dumps(call, ensure_ascii=False)}\n")
    else:
        out.write(f"\n[code interpreter]\n{reply['code']}\n")


def run_cli(session: ChatSession, stdin=None, out=None) -> int:
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = hasattr(stdin, "isatty") and stdin.isatty()

    def ask(prompt: str) -> str | None:
        out.write(prompt)
        out.flush()
        line = stdin.readline()
        if not line:
            return None
        if not interactive:
            out.write(line if line.endswith("\n") else line + "\n")
        return line.rstrip("\n")

    out.write("ChatGLM chat. /reset starts over, /exit quits.\n")
    while True:
        text = ask("\nUser: ")
        if text is None or text.strip() == "/exit":
            out.write("\nbye\n")
            return 0
        if text.strip() == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if not text.strip():
            continue
        role, message = "user", text
        while True:
            out.write("\nAssistant: ")
            out.flush()
            try:
                for piece in session.stream(message, role=role):
                    out.write(piece)
                    out.flush()
            except KeyboardInterrupt:
                out.write("\n(interrupted)\n")
                break
            reply = session.last_reply
            if session.pending_tool_call is None:
                out.write("\n")
                break
            _print_call(reply, out)
            observation = ask("Observation (tool result, JSON or text): ")
            if observation is None:
                out.write("\nbye\n")
                return 0
            role, message = "observation", observation


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_jax.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="THUDM or transformers checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="SentencePiece tokenizer.model (default: the shipped one, or "
                                                       "DIR/tokenizer.model if present)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", default=None, help="JSON file with a list of tool descriptions")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute and parameter dtype (default: the checkpoint's)")
    args = p.parse_args(argv)

    from glm_jax import GLMForCausalLM
    from glm_jax.tokenizer import ChatGLMTokenizer

    def fail(msg: str) -> int:
        print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)
        return 2

    tools = None
    if args.tools:
        try:
            tools = json.loads(Path(args.tools).read_bytes())
        except OSError as e:
            return fail(f"--tools: {args.tools}: cannot read the tools JSON ({e.strerror or e})")
        except json.JSONDecodeError as e:
            return fail(f"--tools: {args.tools}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        except UnicodeDecodeError as e:
            return fail(f"--tools: {args.tools}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})")
        except RecursionError:
            return fail(f"--tools: {args.tools}: not valid JSON (nested too deeply)")
        if isinstance(tools, dict):
            tools = [tools]
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            what = type(tools).__name__ if not isinstance(tools, list) else "a list holding non-objects"
            return fail(f"--tools: {args.tools}: must hold a list of tool objects (or one object), got {what}")
    tok_file = args.tokenizer
    if tok_file is None and (Path(args.checkpoint) / "tokenizer.model").exists():
        tok_file = Path(args.checkpoint) / "tokenizer.model"
    if tok_file is not None and not Path(tok_file).is_file():
        return fail(f"--tokenizer: {tok_file}: no such file")
    try:
        tokenizer = ChatGLMTokenizer(tok_file)
    except (OSError, RuntimeError, ValueError) as e:  # sentencepiece: RuntimeError on a file that is no model
        return fail(f"--tokenizer: {tok_file}: cannot load the SentencePiece model ({e})")
    overrides = dict(dtype=args.dtype, param_dtype=args.dtype) if args.dtype else {}
    try:
        cfg, params = load_checkpoint(args.checkpoint, **overrides)
    except (OSError, ValueError, KeyError) as e:
        return fail(e)
    if cfg.vocab_size < tokenizer.vocab_size:
        return fail(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
                    f"({tokenizer.vocab_size})")
    session = ChatSession(GLMForCausalLM(cfg), params, tokenizer, system=args.system, tools=tools,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return run_cli(session)


def entry() -> None:
    """`glm-chat` / `python -m glm_jax.chat`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
