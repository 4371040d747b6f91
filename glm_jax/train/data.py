"""Training data, the parts the input pipeline (pipeline.py) is built from: record readers with file:line errors,
document packing, the shifted-target layout, SFT conversation encoding and checks, and prepared (pre-tokenized,
memory-mapped) pretraining rows. pipeline.py turns files into the example arrays below and batches them.

Batch layout (all int32 unless noted, [rows, seq_len]):
  pretrain / sft:   input_ids, segment_ids (documents from 1, 0 = padding), targets (the next token),
                    loss_mask (float32: 1 where `targets` is trained on)
  classification:   input_ids, segment_ids (1 = token, 0 = padding), labels [rows]
  embedding:        query_ids, query_segments [rows, seq_len]; passage_ids, passage_segments
                    [rows, 1 + negatives, seq_len] (the positive, then the hard negatives)

Targets are shifted on the host: targets[t] = input_ids[t+1], and loss_mask[t] says whether token t+1 is a
target. In a packed row a document's last token predicts nothing (the next document is a different segment).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from glm_jax.tokenizers.formats import check_tools
from glm_jax.tokenizers.parsers import parse_tool_call, unfence

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed record; the message starts with file:line."""


@dataclass
class BadRecords:
    """Counts (and remembers the first few) records skipped with data.skip_bad_records=true."""

    skip: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def handle(self, where: str, why: str) -> None:
        msg = f"{where}: {why}"
        if not self.skip:
            raise DataError(msg + " (set data.skip_bad_records=true to skip such records)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(msg)
        log.warning("skipping bad record %s", msg)


def no_examples(files: list[Path], bad: BadRecords, why: str | None = None) -> DataError:
    """The DataError of data files that gave no example at all, naming them (an empty or blank file, every record
    bad or dropped)."""
    names = ", ".join(str(f) for f in files[:3]) + (f" (and {len(files) - 3} more)" if len(files) > 3 else "")
    if why is None:
        if bad.count:
            why = f"{bad.count} bad record(s) skipped, no good one left"
        else:
            why = "the file is empty or blank" if len(files) == 1 else "the files are empty or blank"
    return DataError(f"{names or 'no files'}: no examples ({why})")


def read_jsonl(path: Path, bad: BadRecords) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; unparsable lines go to `bad`."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.handle(f"{path}:{n}", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.handle(f"{path}:{n}", f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            except RecursionError:  # e.g. "[[[[..." thousands deep: the decoder's nesting limit
                bad.handle(f"{path}:{n}", "JSON nested too deeply")
                continue
            yield n, obj


def read_text_documents(path: Path, split: str, bad: BadRecords, text_key: str = "text") -> Iterator[str]:
    """Documents of a .txt file (split by blank lines, lines, or the whole file) or of a JSONL file's text_key."""
    if path.suffix in (".jsonl", ".json"):
        for n, obj in read_jsonl(path, bad):
            text = obj.get(text_key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                bad.handle(f"{path}:{n}", f"expected an object with a string field {text_key!r}")
                continue
            if text.strip():
                yield text
        return
    lines: list[str] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad.handle(f"{path}:{n}", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if split == "line":
                if line.strip():
                    yield line
            elif split == "paragraph" and not line.strip():
                if lines:
                    yield "\n".join(lines)
                lines = []
            else:
                lines.append(line)
    if lines:
        yield "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pretraining

def iter_packed_rows(docs: Iterable[list[int]], seq_len: int, pad_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Greedy packing into rows of seq_len, one (tokens, segment_ids) int32 row at a time.

    Documents are laid end to end; one that does not fit in the rest of a row continues at the start of the
    next row (as a new segment there). Segments are numbered from 1 within each row; the tail of the last
    row is padding (segment 0).
    """
    cur_t = np.full(seq_len, pad_id, np.int32)
    cur_s = np.zeros(seq_len, np.int32)
    fill, seg = 0, 0
    for doc in docs:
        doc = np.asarray(doc, np.int32)
        start = 0
        while start < len(doc):
            take = min(seq_len - fill, len(doc) - start)
            seg += 1
            cur_t[fill:fill + take] = doc[start:start + take]
            cur_s[fill:fill + take] = seg
            fill += take
            start += take
            if fill == seq_len:
                yield cur_t, cur_s
                cur_t = np.full(seq_len, pad_id, np.int32)
                cur_s = np.zeros(seq_len, np.int32)
                fill, seg = 0, 0
    if fill:
        yield cur_t, cur_s


def pack_documents(docs: Iterable[list[int]], seq_len: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`iter_packed_rows` as arrays: (tokens, segment_ids), both int32 [rows, seq_len]."""
    rows = list(iter_packed_rows(docs, seq_len, pad_id))
    if not rows:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.stack([t for t, _ in rows]), np.stack([s for _, s in rows])


def lm_examples(tokens: np.ndarray, segments: np.ndarray, target_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Shifted targets and loss mask for rows of tokens. `target_mask[t]` (default: every real token) says
    whether token t may be predicted; token t+1 is predicted from t only within the same segment."""
    if target_mask is None:
        target_mask = segments > 0
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.zeros(tokens.shape, np.float32)
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    mask[:, :-1] = (same & target_mask[:, 1:].astype(bool)).astype(np.float32)
    return {"input_ids": tokens.astype(np.int32), "segment_ids": segments.astype(np.int32),
            "targets": targets.astype(np.int32), "loss_mask": mask}


# ------------------------------------------------------------------------------------------------ prepared data
# Pretraining corpora too large to tokenize at every start (and on every host): `train.py --prepare-data DIR`
# tokenizes and packs once, streaming rows to raw int32 files; runs with `data.prepared: DIR` memory-map them,
# so each process reads only the rows of its batches.

PREPARED_META = "meta.json"


def prepare_pretrain(docs: Iterable[list[int]], seq_len: int, pad_id: int, out_dir: Path, split: str,
                     progress: bool = True) -> int:
    """Packs `docs` into `{out_dir}/{split}.tokens.bin` and `.segments.bin` (int32 rows of seq_len, written as
    they are produced); returns the number of rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    # closed on an error too: the error line must not be glued to the bar's last line
    with tqdm(desc=f"packing {split} rows", unit="row", mininterval=1.0, disable=not progress) as bar, \
            open(out_dir / f"{split}.tokens.bin", "wb") as ft, open(out_dir / f"{split}.segments.bin", "wb") as fs:
        for tokens, segments in iter_packed_rows(docs, seq_len, pad_id):
            ft.write(tokens.tobytes())
            fs.write(segments.tobytes())
            n += 1
            bar.update(1)
    return n


class PackedRows:
    """Memory-mapped packed rows; indexing computes the example arrays (lm_examples) of those rows only. The
    last result is kept: a batch indexes every column with the same rows, which are then read once.

    `origin` = (tokens file, segments file, rows in the files, seq_len, first row, end row) makes it pickle as
    those paths, not as the rows (Grain's worker processes map the files themselves)."""

    def __init__(self, tokens: np.ndarray, segments: np.ndarray, origin: tuple | None = None):
        self.tokens, self.segments, self.origin = tokens, segments, origin
        self._last: tuple[bytes, dict] | None = None
        self._views = np.asarray(tokens), np.asarray(segments)  # plain ndarrays of the mapping: cheaper to index

    def examples(self, idx) -> dict[str, np.ndarray]:
        """The example arrays of rows `idx` (any shape), uncached: what __getitem__ computes (lm_examples, every
        real token a target), in place on the freshly read rows (the Grain loader's path: about half the time)."""
        idx = np.asarray(idx)
        flat = idx.reshape(-1)
        tokens, segments = self._views[0].take(flat, axis=0), self._views[1].take(flat, axis=0)
        targets = np.empty_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        targets[:, -1] = 0
        mask = np.empty(tokens.shape, np.float32)
        prev = segments[:, :-1]
        np.logical_and(segments[:, 1:] == prev, prev > 0, out=mask[:, :-1], casting="unsafe")
        mask[:, -1] = 0
        out = {"input_ids": tokens, "segment_ids": segments, "targets": targets, "loss_mask": mask}
        return {k: v.reshape(idx.shape + v.shape[1:]) for k, v in out.items()}

    @classmethod
    def open(cls, tokens_path, segments_path, n: int, seq_len: int, start: int = 0, stop: int | None = None):
        stop = n if stop is None else stop
        arrays = [np.memmap(p, np.int32, "r", shape=(n, seq_len))[start:stop] for p in (tokens_path, segments_path)]
        return cls(*arrays, origin=(str(tokens_path), str(segments_path), n, seq_len, start, stop))

    def __reduce__(self):
        if self.origin is None:
            return PackedRows, (np.asarray(self.tokens), np.asarray(self.segments))
        return PackedRows.open, self.origin

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            origin = None
            start, stop, step = idx.indices(len(self))
            if self.origin is not None and step == 1:
                first = self.origin[4]
                origin = self.origin[:4] + (first + start, first + max(start, stop))
            return PackedRows(self.tokens[idx], self.segments[idx], origin)
        idx = np.asarray(idx)
        key = repr(idx.shape).encode() + idx.tobytes()
        last = self._last  # one read of the attribute: safe when Grain's threads index concurrently
        if last is None or last[0] != key:
            flat = idx.reshape(-1)  # lm_examples works on [rows, seq_len]; the loader indexes [microbatches, rows]
            out = lm_examples(np.asarray(self.tokens[flat]), np.asarray(self.segments[flat]))
            last = key, {k: v.reshape(idx.shape + v.shape[1:]) for k, v in out.items()}
            self._last = last
        return last[1]


class PackedColumn:
    """One example array ("input_ids", "targets", ...) of PackedRows, array-like enough for the loader (indexing, len, shape, dtype)."""

    def __init__(self, rows: PackedRows, name: str):
        self.rows, self.name = rows, name
        self.dtype = np.dtype(np.float32 if name == "loss_mask" else np.int32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.tokens.shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return PackedColumn(self.rows[idx], self.name)
        return self.rows[idx][self.name]


def open_prepared(directory: str | Path, split: str, seq_len: int, vocab_size: int) -> dict | None:
    """The example arrays of `split` ("train" / "eval") of a prepared directory (memory-mapped), or None when
    the directory has no such split. DataError naming the file on a mismatch."""
    directory = Path(directory)
    meta_path = directory / PREPARED_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path}: not a prepared data directory ({type(e).__name__}: {e}); write one with "
                        f"`python train.py --config ... --prepare-data {directory}`") from None
    if int(meta["seq_len"]) != seq_len:
        raise DataError(f"{meta_path}: rows of {meta['seq_len']} tokens, but data.seq_len={seq_len}")
    if int(meta["vocab_size"]) > vocab_size:
        raise DataError(f"{meta_path}: prepared with a {meta['vocab_size']}-token vocabulary, larger than the "
                        f"model's {vocab_size}")
    if split not in meta["rows"]:
        return None
    n = int(meta["rows"][split])
    paths = []
    for kind in ("tokens", "segments"):
        path = directory / f"{split}.{kind}.bin"
        expected = n * seq_len * 4
        if not path.exists() or path.stat().st_size != expected:
            size = path.stat().st_size if path.exists() else "missing"
            raise DataError(f"{path}: expected {expected} bytes ({n} rows of {seq_len} int32), found {size}")
        paths.append(path)
    rows = PackedRows.open(*paths, n, seq_len)
    return {name: PackedColumn(rows, name) for name in ("input_ids", "segment_ids", "targets", "loss_mask")}


# ------------------------------------------------------------------------------------------------ SFT

SFT_ROLES = ("system", "user", "assistant", "observation")


def encode_conversation(tok, conversation: list[dict], tools: Any = None) -> tuple[list[int], list[bool]]:
    """ChatGLM3 SFT encoding (docs/tokenizer.md, "SFT loss mask"; THUDM's finetune_demo): ids and, per id, whether
    it is a target.

    ids = [gMASK] sop + every message (`tok.build_message`) + eos. Assistant messages (including tool calls)
    are trained on, shifted by one: the assistant role token is NOT a target, every later token of the message
    is, and so is the token that closes the message (the next message's role token, or the final eos).
    A conversation-level `tools` list is attached to a leading system message (or becomes one).
    """
    msgs = [dict(m) for m in conversation]
    if tools is not None:
        if msgs and msgs[0].get("role") == "system":
            msgs[0].setdefault("tools", tools)
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": tools})
    ids = list(tok.prefix_ids)
    train_on = [False] * len(ids)  # unshifted: "this token belongs to an assistant message"
    for m in msgs:
        piece = tok.build_message(m)
        ids += piece
        train_on += [m["role"] == "assistant"] * len(piece)
    ids.append(tok.eos_token_id)
    train_on.append(False)
    is_target = [False] + train_on[:-1]  # shifted by one: docs/tokenizer.md, "SFT loss mask"
    return ids, is_target


def check_conversation(obj: Any) -> tuple[list[dict], Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise ValueError('expected {"messages": [...]} (OpenAI format) or {"conversations": [...]} (ChatGLM3)')
    conv = obj["conversations"]
    if not conv:
        raise ValueError("empty conversation")
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if m.get("role") not in SFT_ROLES:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {list(SFT_ROLES)}")
        if not isinstance(m.get("content"), (str, dict)):
            raise ValueError(f"message {i}: content must be a string (or a tool-call object)")
        if "metadata" in m and not isinstance(m["metadata"], str):
            raise ValueError(f"message {i}: metadata must be a string")
        if "tools" in m:
            check_tools(m["tools"], f"message {i}: tools")
    return _with_tools(conv, obj)


def _with_tools(msgs: list[dict], obj: dict) -> tuple[list[dict], Any]:
    """A checked conversation and the record's top-level tools, once it has a reply to train on."""
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant message to train on")
    tools = obj.get("tools")
    if tools is not None:
        check_tools(tools, "tools")
    return msgs, tools


# OpenAI-format conversations, any tokenizer (docs/tokenizer.md, "SFT data formats"): the checkpoint's own chat
# template renders them and `Tokenizer.assistant_mask` says which tokens the assistant writes.

OPENAI_ROLES = ("system", "user", "assistant", "tool")


def encode_openai_conversation(tok, messages: list[dict], tools: Any = None) -> tuple[list[int], list[bool]]:
    """ids and per-id target flags of an OpenAI-format conversation in `tok`'s chat format (any family).

    Targets: every token the assistant writes (`tok.assistant_mask`: reasoning, content, tool calls, after the
    generation prompt), plus the stop token that ends each assistant turn (the next message's `<|user|>` /
    `<|observation|>`, when it is one of `tok.stop_ids`), plus an eos appended after a final assistant turn: the
    same shifted-by-one rule as ChatGLM3's `encode_conversation` and THUDM's GLM-4 finetune demo.
    """
    ids, mask = tok.assistant_mask(messages, tools=tools or None)
    ids = list(ids)
    is_target = [bool(m) for m in mask]
    stops = set(tok.stop_ids)
    for t in range(1, len(ids)):
        if mask[t - 1] and not mask[t] and ids[t] in stops:
            is_target[t] = True
    if mask and mask[-1]:
        ids.append(tok.eos_token_id)
        is_target.append(True)
    return ids, is_target


def check_openai_conversation(obj: Any) -> tuple[list[dict], Any]:
    """(messages, tools) of a `{"messages": [...], "tools"?: [...]}` record; ValueError saying what is wrong."""
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list):
        raise ValueError('expected {"messages": [...]} (OpenAI format) or {"conversations": [...]} (ChatGLM3)')
    if not msgs:
        raise ValueError("empty conversation")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if m.get("role") not in OPENAI_ROLES:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {list(OPENAI_ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"message {i}: content must be a string, a list of parts or null")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise ValueError(f"message {i}: reasoning_content must be a string")
        if m.get("tool_calls") is not None:
            _check_tool_calls(m, i)
    return _with_tools(msgs, obj)


def _check_tool_calls(m: dict, i: int) -> None:
    calls = m["tool_calls"]
    if m["role"] != "assistant" or not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list, on an assistant message")
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"message {i}: tool_calls[{j}] needs function.name")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(f"message {i}: tool_calls[{j}]: arguments are not JSON") from None
        if not isinstance(args, dict):
            raise ValueError(f"message {i}: tool_calls[{j}]: arguments must be an object (or its JSON)")


def chatglm3_to_openai(conversation: list[dict], tools: Any = None) -> tuple[list[dict], Any]:
    """A checked ChatGLM3 `conversations` record as OpenAI messages (for tokenizers of the other families):
    observation -> tool, tool calls (`{"name", "parameters"}` content, or `metadata` + a `tool_call(...)` block,
    `interpreter` + code) -> tool_calls, a system message's `tools` -> the record's tools."""
    out, tools = [], list(tools) if tools else []
    for m in conversation:
        role, content, name = m["role"], m["content"], (m.get("metadata") or "").strip()
        tools += [t if "function" in t else {"type": "function", "function": t} for t in m.get("tools") or []]
        if role == "assistant" and isinstance(content, dict):
            name, args = content["name"], content["parameters"]
        elif role == "assistant" and name:
            body = unfence(content)
            args = {"code": body} if name == "interpreter" else parse_tool_call(body)
        else:
            out.append({"role": "tool" if role == "observation" else role, "content": content})
            continue
        out.append({"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]})
    return out, tools or None


def encode_sft_record(tok, obj: Any) -> tuple[list[int], list[bool]]:
    """(ids, is_target) of one SFT record: `{"messages"}` (OpenAI format, any tokenizer) or `{"conversations"}`
    (ChatGLM3: encoded exactly as `encode_conversation` with a ChatGLM3 tokenizer, converted to OpenAI messages
    for the others). ValueError / KeyError / TypeError on a bad record."""
    if isinstance(obj, dict) and "messages" in obj and "conversations" not in obj:
        return encode_openai_conversation(tok, *check_openai_conversation(obj))
    conv, tools = check_conversation(obj)
    if getattr(tok, "reply_format", "chatglm3") == "chatglm3":  # ChatGLM3's tokenizer: its own exact encoding
        return encode_conversation(tok, conv, tools)
    return encode_openai_conversation(tok, *chatglm3_to_openai(conv, tools))


# ------------------------------------------------------------------------------------------------ example arrays

def example_spec(task: str, seq_len: int, negatives: int = 0, objective: str = "causal",
                 labels: int = 0) -> dict[str, tuple[tuple[int, ...], type]]:
    """Per-example shape and dtype of every array the pipeline's builders produce for `task` (for abstract batches:
    compiling a step without reading any data). embedding: `negatives` hard negatives after each positive;
    blank_infilling: GLM's 2D positions and Part A ends too; cloze: a row per label word (`labels`)."""
    row = ((seq_len,), np.int32)
    if task == "classification":
        return {"input_ids": row, "segment_ids": row, "labels": ((), np.int32)}
    if task == "embedding":
        passages = ((1 + negatives, seq_len), np.int32)
        return {"query_ids": row, "query_segments": row, "passage_ids": passages, "passage_segments": passages}
    if task == "cloze":
        rows = ((labels, seq_len), np.int32)
        return {"input_ids": rows, "segment_ids": rows, "targets": rows, "target_mask": ((labels, seq_len), np.float32),
                "labels": ((), np.int32)}
    spec = {"input_ids": row, "segment_ids": row, "targets": row, "loss_mask": ((seq_len,), np.float32)}
    if objective == "blank_infilling":
        spec.update(position_ids=row, block_position_ids=row, context_ends=row)
    return spec


def split_holdout(arrays: dict[str, np.ndarray], fraction: float) -> tuple[dict, dict]:
    """The last `fraction` of the examples (before any shuffling) as held-out data."""
    n = len(next(iter(arrays.values())))
    k = int(round(n * fraction))
    if fraction > 0 and k == 0:
        k = 1
    if k >= n:
        raise DataError(f"data.eval_fraction={fraction} leaves no training examples out of {n}")
    return {a: v[:n - k] for a, v in arrays.items()}, {a: v[n - k:] for a, v in arrays.items()}


def num_examples(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))


def eval_batches(arrays: dict[str, np.ndarray], micro_batch: int, count: int,
                 rows: tuple[int, int] | None = None) -> list[dict[str, np.ndarray]]:
    """`count` fixed, unshuffled microbatches [micro_batch, ...] (this process's rows), cycling if short."""
    n = num_examples(arrays)
    lo, hi = rows or (0, micro_batch)
    count = min(count, max(1, -(-n // micro_batch)))
    out = []
    for k in range(count):
        idx = np.array([(k * micro_batch + r) % n for r in range(lo, hi)])
        out.append({name: v[idx] for name, v in arrays.items()})
    return out
