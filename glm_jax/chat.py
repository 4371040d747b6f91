"""Multi-turn chat with any GLM checkpoint: `ChatSession` for Python, and a terminal front end.

    python -m glm_jax.chat --checkpoint DIR [--tokenizer FILE_OR_DIR] [--system TEXT] [--tools tools.json]
                           [--think | --no-think] [--max-new-tokens N] [--temperature 0.8] [--top-p 0.8]
                           [--top-k 0] [--dtype bfloat16] [--knowledge INDEX_DIR [--knowledge-k 3]]

DIR is a THUDM (`chatglm`) or transformers (`glm`, `glm4`, `glm4_moe`, ...) checkpoint directory
(`glm_jax.load_hf`) or a `train.py` run directory. The tokenizer is `glm_jax.load_tokenizer`'s (any family):
`--tokenizer`, else the checkpoint's own (a run directory: its `data.tokenizer` or `model.init_from`'s), else
the small SentencePiece model shipped with glm_jax. In the terminal: `/think` and `/nothink` switch thinking
on / off (`enable_thinking` of the chat template), `/reset` starts over (keeping the system prompt and tools),
`/exit` (or EOF) quits. Replies stream as they are generated, reasoning shown apart from the answer; each tool
call is printed as a structured call and its result is read from the terminal and sent back as a `tool`
message. With `--knowledge` each question is first looked up in a knowledge index (glm_jax.knowledge): the best
passages go into the prompt and are listed, numbered, after the reply. Exit status: 0 after `/exit` or end of
input; 2 for bad arguments (a missing or unreadable checkpoint, tokenizer, tools file or knowledge index, tools
that are not a list of objects), reported as one `error: ...` line on stderr naming the option and the file.

    session = ChatSession(model, params, glm_jax.load_tokenizer(DIR), system="...", tools=[...],
                          enable_thinking=False, temperature=0.8, top_p=0.8)
    reply = session.send("What's the weather in Paris?")   # {"type": "text" | "tool_call", "content",
                                                            #  "reasoning_content", "tool_calls"}
    if reply["tool_calls"]:
        reply = session.observe({"temperature": 21})        # one `tool` message per result
    for event in session.stream_events("and tomorrow?"):   # {"type": "reasoning" | "content", "text"} ...
        ...

History is kept as OpenAI messages (docs/tokenizer.md, "Chat sessions") and rendered with the tokenizer's
chat template every turn; the decode cache is kept between turns, so a turn runs only the tokens that differ
from what the cache holds (docs/architecture.md, "Keeping the cache across chat turns"); generation stops on the
tokenizer's stop ids and the reply is parsed by its reply parser. The format (ChatGLM2, ChatGLM3, GLM-4, GLM-4.5+)
is the tokenizer's alone: the session is the same for every family.
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

from glm_jax import GLMForCausalLM, knowledge
from glm_jax.checkpoints import default_tokenizer, load_checkpoint, shipped_tokenizer_warning, tokenizer_or_shipped
from glm_jax.config import DTYPES, read_json
from glm_jax.generation import SamplingParams
from glm_jax.knowledge.documents import Passage
from glm_jax.knowledge.grounding import fitted_messages, has_system_role, sources
from glm_jax.platforms import skip_absent_tpu
from glm_jax.tokenizers import Tokenizer
from glm_jax.tokenizers.formats import check_tools

# The module, even if the package re-exports a `generate` function under the same name.
from glm_jax import generation as _generate
from glm_jax import speculative as _speculative

log = logging.getLogger(__name__)

class ChatSession:
    """One conversation with a model of any GLM family, through a `glm_jax.tokenizers.Tokenizer` (see the module
    docstring). `tools`: OpenAI tool schemas (bare function schemas are wrapped). `enable_thinking`: None leaves
    the chat template's default; settable between turns.

    Sampling keywords go to `glm_jax.generation.stream_generate`: max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, seed (advanced by one each turn so turns differ), mesh, chunk; or `sampling=` a
    `SamplingParams` whole (its stop_token_ids join the tokenizer's stop ids). `reuse_cache`: keep the
    decode cache between turns (`glm_jax.generation.ConversationCache`), so a turn runs only the tokens that
    differ from what the cache holds instead of the whole conversation. `speculative` ("mtp" | "ngram") and
    `num_speculative_tokens`: speculative decoding (glm_jax.speculative; every turn then runs its whole prompt).

    `knowledge`: a `glm_jax.KnowledgeIndex` (anything with its `search(query, k=, mode=)`): each user turn first
    retrieves its `knowledge_k` best passages (`knowledge_mode`: the index's default, "bm25", "dense" or "hybrid"),
    which go into the prompt before the question (glm_jax.knowledge.grounding; the worst are left out where the
    prompt would leave less than max_new_tokens of the model's max_seq_len); the reply's "sources" lists them.
    """

    def __init__(self, model, params, tokenizer, system: str | None = None, tools: Sequence[dict] | None = None,
                 *, enable_thinking: bool | None = None, max_new_tokens: int = 512, temperature: float = 0.8,
                 top_p: float = 0.8, top_k: int = 0, repetition_penalty: float = 1.0, seed: int = 0, mesh=None,
                 chunk: int = 1, reuse_cache: bool = True, sampling: SamplingParams | None = None,
                 speculative: str | None = None, num_speculative_tokens: int | None = None, knowledge=None,
                 knowledge_k: int = 3, knowledge_mode: str | None = None):
        if sampling is not None:  # passed whole, in place of the loose keywords
            if sampling.stop:
                raise ValueError("stop: a chat session stops on the tokenizer's stop ids and stop_token_ids, not on "
                                 "strings")
            max_new_tokens = sampling.max_tokens or max_new_tokens
            temperature, top_p, top_k = sampling.temperature, sampling.top_p, sampling.top_k
            repetition_penalty, seed = sampling.repetition_penalty, sampling.seed or 0
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"ChatSession needs a glm_jax.Tokenizer (glm_jax.load_tokenizer), got "
                            f"{type(tokenizer).__name__}")
        self.stop_ids = tuple(dict.fromkeys([*tokenizer.stop_ids, *(sampling.stop_token_ids if sampling else ())]))
        self.model, self.params, self.tokenizer = model, params, tokenizer
        # ChatGLM-6B's turns are not extensions of each other ([Round n] prompts re-read the whole history, the
        # first turn has none) and its positions hang on the prompt's <sop>: every turn runs its whole prompt
        reuse_cache = reuse_cache and not getattr(getattr(model, "cfg", None), "position_encoding_2d", False)
        self.conversation = _generate.ConversationCache() if reuse_cache else None
        check_tools(tools)
        self.system = system
        self.tools = self._tools(tools)
        self.enable_thinking = enable_thinking
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, mesh=mesh, chunk=chunk, speculative=speculative,
                             num_speculative_tokens=num_speculative_tokens)
        if speculative is not None:  # bad settings fail here, not at the first reply
            _speculative.check(model, speculative, num_speculative_tokens, penalty=repetition_penalty != 1.0)
        if knowledge is not None and knowledge_k < 1:
            raise ValueError(f"knowledge_k: must be at least 1, got {knowledge_k}")
        self.knowledge, self.knowledge_k, self.knowledge_mode = knowledge, knowledge_k, knowledge_mode
        self._system_role = knowledge is not None and has_system_role(tokenizer)
        self.last_sources: list[dict[str, Any]] = []
        self.seed = int(seed)
        self.turns = 0
        self.last_reply: dict[str, Any] | None = None
        self.last_ids: list[int] = []
        self.last_prompt: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.reset()

    @staticmethod
    def _tools(tools):
        """OpenAI tool schemas: a bare function schema ({"name", "parameters"}) is wrapped."""
        if not tools:
            return None
        return [copy.deepcopy(t) if "function" in t else {"type": "function", "function": copy.deepcopy(t)}
                for t in tools]

    def reset(self) -> None:
        """Forgets the conversation, keeping the system prompt and tools."""
        self.history = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.last_reply, self.last_ids = None, []

    @property
    def pending_tool_call(self) -> dict[str, Any] | None:
        """The last reply if it called tools whose results `observe` has not sent yet."""
        if self.last_reply is not None and self.last_reply.get("tool_calls"):
            return self.last_reply
        return None

    def prompt(self, messages: Sequence[dict] = ()) -> list[int]:
        """The prompt ids of the conversation followed by `messages`, with the generation prompt."""
        return self.tokenizer.apply_chat_template(self.history + list(messages), tools=self.tools,
                                                  add_generation_prompt=True, enable_thinking=self.enable_thinking)

    def send(self, text: str, role: str = "user") -> dict[str, Any]:
        """Sends a message, generates the reply and returns it parsed: {"type": "text" | "tool_call", "content",
        "reasoning_content", "tool_calls"} (OpenAI tool calls, `arguments` a dict)."""
        for _ in self.stream_events(text, role):
            pass
        return self.last_reply

    def observe(self, result: Any, *more: Any) -> dict[str, Any]:
        """Answers the pending tool calls with their results (each a string, or anything JSON-serializable: one
        `tool` message each, in the order of the calls) and returns the next reply."""
        return self.send([_observation_text(r) for r in (result, *more)], role="tool")

    def stream_observe(self, result: Any, *more: Any) -> Iterator[str]:
        return self.stream([_observation_text(r) for r in (result, *more)], role="tool")

    def stream(self, text, role: str = "user") -> Iterator[str]:
        """Like `stream_events`, yielding only the answer's text (not the reasoning)."""
        for event in self.stream_events(text, role):
            if event["type"] == "content":
                yield event["text"]

    def stream_events(self, text, role: str = "user") -> Iterator[dict[str, Any]]:
        """Sends a message (role "user", or "tool" / "observation" with one result or a list of results) and yields
        the reply's `StreamParser` events as it is generated: {"type": "reasoning" | "content", "text"} and
        {"type": "tool_call", "tool_call"}. When the iterator is exhausted the reply is in `last_reply` and
        `last_ids`, and the messages are in `history`; stopping early records the partial reply."""
        new = self._turn_messages(text, role)
        tok = self.tokenizer
        prompt = self.last_prompt = self.prompt(new)
        parser = tok.stream_parser(self.tools, prompt=prompt)
        ids: list[int] = []
        shown, finished = "", False
        try:
            for token in self._reply_tokens(prompt):
                ids.append(token)
                full = tok.decode(ids)
                if full.endswith("\ufffd") or not full.startswith(shown):  # partial character / re-segmentation
                    continue
                delta, shown = full[len(shown):], full
                yield from parser.feed(delta)
            final = tok.decode(ids)
            if final != shown and final.startswith(shown):  # a reply ending in a partial character
                yield from parser.feed(final[len(shown):])
            yield from parser.finish()
            finished = True
        finally:
            self._record(new, ids, finished)

    def _turn_messages(self, text, role: str) -> list[dict[str, Any]]:
        """The messages a turn adds: with a knowledge base, a user turn's retrieved passages before it."""
        new = _new_messages(text, role)
        self.last_sources = []
        if self.knowledge is None or role != "user":
            return new
        hits = self.knowledge.search(text, k=self.knowledge_k, mode=self.knowledge_mode)
        cfg = getattr(self.model, "cfg", None)
        budget = None if cfg is None else cfg.max_seq_len - self.sampling["max_new_tokens"]
        turn, kept = fitted_messages(self.tokenizer, text, hits, self.prompt, budget, system_role=self._system_role)
        self.last_sources = sources(kept)
        return turn

    def _reply_tokens(self, prompt: list[int]) -> Iterator[int]:
        """The generated ids of one reply, up to (not including) a stop id."""
        tok = self.tokenizer
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and len(prompt) + self.sampling["max_new_tokens"] > cfg.max_seq_len:
            log.warning("conversation (%d tokens) + max_new_tokens exceeds the model's max_seq_len %d; "
                        "consider /reset", len(prompt), cfg.max_seq_len)
        stops = set(self.stop_ids)
        for token in _generate.stream_generate(
                self.model, self.params, np.asarray(prompt, np.int32), stop_ids=self.stop_ids,
                pad_id=tok.pad_token_id, seed=self.seed + self.turns, vocab_limit=tok.vocab_size,
                conversation=self.conversation, **self.sampling):
            if int(token) in stops:
                return
            yield int(token)

    def _record(self, new: list[dict], ids: list[int], finished: bool) -> None:
        self.turns += 1
        self.last_ids = ids
        parsed = self.tokenizer.parse_reply(ids, tools=self.tools)
        reply = {"type": "tool_call" if parsed["tool_calls"] else "text", **parsed}
        if self.knowledge is not None:
            reply["sources"] = self.last_sources
        if not finished:
            reply["interrupted"] = True
        self.last_reply = reply
        message: dict[str, Any] = {"role": "assistant", "content": parsed["content"]}
        if parsed["reasoning_content"] is not None:
            message["reasoning_content"] = parsed["reasoning_content"]
        if parsed["tool_calls"]:
            message["tool_calls"] = copy.deepcopy(parsed["tool_calls"])
        self.history += new + [message]


def _new_messages(text, role: str) -> list[dict[str, Any]]:
    """The messages a turn sends: one user message, or one `tool` message per result."""
    if role in ("tool", "observation"):
        results = [text] if isinstance(text, str) else list(text)
        if not results or not all(isinstance(r, str) for r in results):
            raise TypeError("tool results must be a str or a non-empty list of str")
        return [{"role": "tool", "content": r} for r in results]
    if role != "user":
        raise ValueError(f"role must be 'user' or 'tool', got {role!r}")
    if not isinstance(text, str):
        raise TypeError(f"message text must be a str, got {type(text).__name__}")
    return [{"role": "user", "content": text}]


def _observation_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except TypeError:
        return str(result)


# ---------------------------------------------------------------------------------------------------- terminal
def _print_calls(reply: dict, out) -> None:
    for call in reply["tool_calls"]:
        f = call["function"]
        out.write(f"\n[tool call] {json.dumps({'name': f['name'], 'arguments': f['arguments']}, ensure_ascii=False)}")
    out.write("\n")


def _print_sources(reply: dict, out) -> None:
    """The passages a grounded reply was given, as numbered in its prompt."""
    for source in reply.get("sources") or ():
        out.write(f"\n[{source['rank']}] {Passage.from_json(source).citation}")


class _EventPrinter:
    """Writes a reply's stream events: reasoning apart from the answer (dim on a terminal, else after a
    `[thinking]` label), tool calls once the reply is parsed."""

    def __init__(self, out, color: bool):
        self.out, self.color, self.section = out, color, None

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind not in ("reasoning", "content") or not event["text"]:
            return
        if kind != self.section:
            if kind == "reasoning":
                self.out.write("\x1b[2m" if self.color else "[thinking] ")
            elif self.section == "reasoning":
                self.out.write("\x1b[0m\n" if self.color else "\n[answer] ")
            self.section = kind
        self.out.write(event["text"])
        self.out.flush()

    def close(self) -> None:
        if self.section == "reasoning" and self.color:
            self.out.write("\x1b[0m")


def _turn(session, message, role: str, out, color: bool) -> bool:
    """Streams one reply; False when the user interrupted it."""
    out.write("\nAssistant: ")
    out.flush()
    printer = _EventPrinter(out, color)
    try:
        for event in session.stream_events(message, role=role):
            printer(event)
    except KeyboardInterrupt:
        printer.close()
        out.write("\n(interrupted)\n")
        return False
    printer.close()
    return True


def _command(session, text: str, out) -> bool:
    """Runs a /command; False when `text` is none."""
    command = text.strip()
    if command == "/reset":
        session.reset()
        out.write("(conversation reset)\n")
    elif command in ("/think", "/nothink"):
        session.enable_thinking = command == "/think"
        out.write(f"(thinking {'on' if session.enable_thinking else 'off'})\n")
    else:
        return False
    return True


def run_cli(session: ChatSession, stdin=None, out=None) -> int:
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    color = interactive and hasattr(out, "isatty") and out.isatty()

    def ask(prompt: str) -> str | None:
        out.write(prompt)
        out.flush()
        line = stdin.readline()
        if not line:
            return None
        if not interactive:
            out.write(line if line.endswith("\n") else line + "\n")
        return line.rstrip("\n")

    out.write("GLM chat. /think and /nothink switch thinking, /reset starts over, /exit quits.\n")
    while True:
        text = ask("\nUser: ")
        if text is None or text.strip() == "/exit":
            out.write("\nbye\n")
            return 0
        if not text.strip() or _command(session, text, out):
            continue
        role, message = "user", text
        while _turn(session, message, role, out, color):
            reply = session.pending_tool_call
            if reply is None:
                _print_sources(session.last_reply, out)
                out.write("\n")
                break
            _print_calls(reply, out)
            results = [ask(f"Result of {c['function']['name']} (JSON or text): ") for c in reply["tool_calls"]]
            if any(r is None for r in results):
                out.write("\nbye\n")
                return 0
            role, message = "tool", results


class _CliError(Exception):
    """A one-line error of the chat CLI (exit 2)."""


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glm_jax.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="THUDM / transformers checkpoint or train.py run directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json or a directory (default: the "
                                                       "checkpoint's, else the small one shipped with glm_jax)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", default=None, help="JSON file with a list of tool descriptions")
    thinking = p.add_mutually_exclusive_group()
    thinking.add_argument("--think", dest="enable_thinking", action="store_const", const=True, default=None,
                          help="start with thinking on (the template's enable_thinking; /think, /nothink switch)")
    thinking.add_argument("--no-think", dest="enable_thinking", action="store_const", const=False)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", choices=_speculative.METHODS, default=None,
                   help="speculative decoding: drafts from the model's MTP layer or from the context (n-gram)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts per verify step (default: 1 for mtp, 3 for ngram)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="compute and parameter dtype (default: the checkpoint's)")
    p.add_argument("--knowledge", default=None, metavar="INDEX_DIR",
                   help="ground each question in this knowledge index (python -m glm_jax.knowledge index)")
    p.add_argument("--knowledge-k", type=int, default=3, help="passages retrieved per question")
    p.add_argument("--knowledge-mode", choices=("bm25", "dense", "hybrid"), default=None,
                   help="retrieval (default: hybrid for an index with embeddings, else bm25)")
    return p


def _read_tools(path: str) -> list[dict]:
    """--tools: a JSON list of tool objects (or one object)."""
    try:
        tools = read_json(path, what="the tools JSON")
    except FileNotFoundError as e:
        raise _CliError(f"--tools: {path}: cannot read the tools JSON ({e.strerror or e})") from None
    except ValueError as e:
        raise _CliError(f"--tools: {e}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        what = type(tools).__name__ if not isinstance(tools, list) else "a list holding non-objects"
        raise _CliError(f"--tools: {path}: must hold a list of tool objects (or one object), got {what}")
    try:
        check_tools(tools, context="OpenAI function tools")
    except ValueError as e:
        raise _CliError(f"--tools: {path}: {e}") from None
    return tools


def _check_sampling_args(args) -> None:
    """The sampling options' ranges, before anything is loaded."""
    try:
        _generate.check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        raise _CliError(f"--{name.replace('_', '-')}: {why}") from None


def _cli_tokenizer(source: str | Path | None):
    try:
        return tokenizer_or_shipped(source)
    except ValueError as e:
        raise _CliError(str(e)) from None


def _cli_knowledge(args):
    """--knowledge: the index (with its embedding model when it has one)."""
    if args.knowledge_k < 1:
        raise _CliError(f"--knowledge-k: must be at least 1, got {args.knowledge_k}")
    try:  # bm25s, which starts JAX's backends, is imported here: after main() chose the platform
        index = knowledge.KnowledgeIndex.load(args.knowledge)
    except (OSError, ValueError) as e:
        raise _CliError(f"--knowledge: {e}") from None
    try:
        index.check_mode(args.knowledge_mode or "bm25")
    except ValueError as e:
        raise _CliError(f"--knowledge-mode: {args.knowledge}: {e}") from None
    return index


def _cli_session(args) -> ChatSession:
    _check_sampling_args(args)
    tools = _read_tools(args.tools) if args.tools else None
    knowledge = _cli_knowledge(args) if args.knowledge else None
    source = args.tokenizer if args.tokenizer is not None else default_tokenizer(args.checkpoint)
    tokenizer = _cli_tokenizer(source)
    overrides = dict(dtype=args.dtype, param_dtype=args.dtype) if args.dtype else {}
    try:
        cfg, params = load_checkpoint(args.checkpoint, **overrides)
    except (OSError, ValueError, KeyError) as e:
        raise _CliError(str(e)) from None
    if source is None:  # a real model's ids mean nothing in this vocabulary: say so
        print(shipped_tokenizer_warning(args.checkpoint), file=sys.stderr, flush=True)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise _CliError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
                        f"({tokenizer.vocab_size})")
    sampling = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    try:
        return ChatSession(GLMForCausalLM(cfg), params, tokenizer, system=args.system, tools=tools,
                           enable_thinking=args.enable_thinking, sampling=sampling, speculative=args.speculative,
                           num_speculative_tokens=args.num_speculative_tokens, knowledge=knowledge,
                           knowledge_k=args.knowledge_k, knowledge_mode=args.knowledge_mode)
    except ValueError as e:
        name, _, why = str(e).partition(": ")
        raise _CliError(f"--{name.replace('_', '-')}: {why}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The chat CLI: exit 0, or 2 with one line `error: ...` on stderr for bad arguments or files."""
    args = _arg_parser().parse_args(argv)
    skip_absent_tpu()
    try:
        session = _cli_session(args)
    except _CliError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return 2
    return run_cli(session)


def entry() -> None:
    """`glm-chat` / `python -m glm_jax.chat`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
