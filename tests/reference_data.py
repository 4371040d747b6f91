"""A plain-numpy reference of the input pipeline's semantics (tests/test_pipeline.py compares the library's
arrays, batches and checkpointed positions with it; benchmarks/loader.py uses it as its baseline).

The example rules are written here from their documentation, not imported from the code they check: packing and
targets from docs/training-code.md ("How examples are made"), the ChatGLM3 SFT encoding and loss mask from
docs/tokenizer.md ("ChatGLM3 `conversations` records", "SFT loss mask"). Only record reading and validation
(what counts as a bad record, and its message) are the library's own."""

from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from glm_jax.train.data import (BadRecords, DataError, check_conversation, no_examples, num_examples, read_jsonl,
                                read_text_documents)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the documented rules

def pack_documents(docs: Iterable[list[int]], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents end to end in rows of seq_len; segment ids number the documents' pieces 1, 2, ... within each
    row; the last row's tail is padding (segment 0). Written as one stream of (token, document) pairs cut into
    rows, not as the library's fill-a-row loop."""
    stream = [(t, d) for d, doc in enumerate(docs) for t in doc]
    if not stream:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    rows = -(-len(stream) // seq_len)
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    segments = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        piece = stream[r * seq_len:(r + 1) * seq_len]
        first_doc = {}
        for j, (token, doc) in enumerate(piece):
            tokens[r, j] = token
            segments[r, j] = first_doc.setdefault(doc, len(first_doc) + 1)
    return tokens, segments


def lm_examples(tokens: np.ndarray, segments: np.ndarray, is_target: np.ndarray | None = None) -> dict:
    """targets[t] = tokens[t+1]; loss_mask[t] = real(t) and segment(t+1) == segment(t) and is_target(t+1)."""
    real = segments > 0
    is_target = real if is_target is None else np.asarray(is_target, bool)
    rows = tokens.shape[0]
    after = lambda a, fill: np.concatenate([a[:, 1:], np.full((rows, 1), fill, a.dtype)], axis=1)  # noqa: E731
    loss = real & (after(segments, -1) == segments) & after(is_target, False)
    return {"input_ids": tokens.astype(np.int32), "segment_ids": segments.astype(np.int32),
            "targets": after(tokens, 0).astype(np.int32), "loss_mask": loss.astype(np.float32)}


def encode_conversation(tok, conversation: list[dict], tools=None) -> tuple[list[int], list[bool]]:
    """[gMASK] sop + build_message(m) for every message + eos; is_target[t] = own[t-1], own[t] meaning "token t
    belongs to an assistant message". Record-level tools go onto a leading system message without tools of its
    own, else into a new system message with empty content."""
    messages = [dict(m) for m in conversation]
    if tools is not None:
        if messages and messages[0]["role"] == "system" and "tools" not in messages[0]:
            messages[0]["tools"] = tools
        elif not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    pieces = [(tok.prefix_ids, False)] + [(tok.build_message(m), m["role"] == "assistant") for m in messages]
    pieces.append(([tok.eos_token_id], False))
    ids = [i for piece, _ in pieces for i in piece]
    own = [assistant for piece, assistant in pieces for _ in piece]
    return ids, [False] + own[:-1]


def expand_files(patterns: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(str(pat), recursive=True))
        if not hits:
            raise DataError(f"{pat}:0: no such file")
        files = [Path(h) for h in hits if Path(h).is_file()]
        if not files:
            raise DataError(f"{pat}:0: not a file (a directory?); give files or a glob pattern such as DIR/*.txt")
        out += files
    return out


class PretrainDocuments:
    """Token ids of each document (+ eos) of pretraining text files, in order; `tokens` counts what was read."""

    def __init__(self, files: list[Path], tok, split: str, bad: BadRecords, text_key: str = "text",
                 max_tokens: int | None = None):
        self.files, self.tok, self.split, self.bad, self.text_key = files, tok, split, bad, text_key
        self.max_tokens = max_tokens
        self.tokens = 0

    BATCH = 256  # documents per SentencePiece call (encoded on all cores)

    def _texts(self) -> Iterator[list[str]]:
        batch: list[str] = []
        for path in self.files:
            docs = 0
            for text in read_text_documents(path, self.split, self.bad, self.text_key):
                docs += 1
                batch.append(text)
                if len(batch) == self.BATCH:
                    yield batch
                    batch = []
            if not docs:
                log.warning("%s: no documents (empty or blank file, or every record bad)", path)
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        eos = self.tok.eos_token_id
        for texts in self._texts():
            for ids in self.tok.encode(texts, add_special_tokens=False):
                ids = ids + [eos]
                if self.max_tokens is not None and self.tokens + len(ids) > self.max_tokens:
                    ids = ids[:self.max_tokens - self.tokens]
                self.tokens += len(ids)
                if ids:
                    yield ids
                if self.max_tokens is not None and self.tokens >= self.max_tokens:
                    return


def build_pretrain(files: list[Path], tok, seq_len: int, split: str, bad: BadRecords, text_key: str = "text",
                   max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Each document -> tokens + eos, packed into rows of seq_len."""
    docs = PretrainDocuments(files, tok, split, bad, text_key, max_tokens)
    tokens, segments = pack_documents(docs, seq_len, tok.pad_token_id)
    log.info("pretraining data: %d tokens from %d files -> %d rows of %d", docs.tokens, len(files), len(tokens),
             seq_len)
    if not len(tokens):
        raise no_examples(files, bad)
    return lm_examples(tokens, segments)


def build_sft(files: list[Path], tok, seq_len: int, bad: BadRecords) -> tuple[dict[str, np.ndarray], dict]:
    """One conversation per row, right-padded. Truncation rule: a conversation longer than seq_len keeps its
    first seq_len tokens (the prompt is never cut before the answer); one left with no target token is dropped
    and counted in stats["dropped_no_target"]."""
    rows_ids, rows_tgt = [], []
    stats = {"conversations": 0, "truncated": 0, "dropped_no_target": 0}
    for path in files:
        for n, obj in read_jsonl(path, bad):
            try:
                conv, tools = check_conversation(obj)
                ids, tgt = encode_conversation(tok, conv, tools)
            except (ValueError, KeyError, TypeError) as e:
                bad.handle(f"{path}:{n}", str(e))
                continue
            except RecursionError:  # tools / a tool call nested too deeply to serialise
                bad.handle(f"{path}:{n}", "nested too deeply")
                continue
            stats["conversations"] += 1
            if len(ids) > seq_len:
                stats["truncated"] += 1
                ids, tgt = ids[:seq_len], tgt[:seq_len]
            if not any(tgt[1:]):
                stats["dropped_no_target"] += 1
                continue
            rows_ids.append(ids)
            rows_tgt.append(tgt)
    n = len(rows_ids)
    if not n:
        raise no_examples(files, bad, None if not stats["dropped_no_target"] else
                          f"all {stats['dropped_no_target']} conversations were dropped: no assistant token within "
                          f"the first data.seq_len={seq_len} tokens")
    tokens = np.full((n, seq_len), tok.pad_token_id, np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    target = np.zeros((n, seq_len), bool)
    for i, (ids, tgt) in enumerate(zip(rows_ids, rows_tgt)):
        tokens[i, :len(ids)] = ids
        segments[i, :len(ids)] = 1
        target[i, :len(tgt)] = tgt
    log.info("SFT data: %s", stats)
    return lm_examples(tokens, segments, target), stats


def build_classification(files: list[Path], tok, seq_len: int, num_labels: int,
                         bad: BadRecords) -> dict[str, np.ndarray]:
    """{"text", "label"} records -> [gMASK] sop + text, truncated to its first seq_len tokens, right-padded.
    The classifier reads the last real token."""
    ids_rows, labels = [], []
    for path in files:
        for n, obj in read_jsonl(path, bad):
            text = obj.get("text") if isinstance(obj, dict) else None
            label = obj.get("label") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not isinstance(label, int) or isinstance(label, bool):
                bad.handle(f"{path}:{n}", 'expected {"text": str, "label": int}')
                continue
            if not 0 <= label < num_labels:
                bad.handle(f"{path}:{n}", f"label {label} is outside [0, {num_labels}) (model num_labels)")
                continue
            ids_rows.append(tok.encode(text)[:seq_len])
            labels.append(label)
    n = len(ids_rows)
    if not n:
        raise no_examples(files, bad)
    tokens = np.full((n, seq_len), tok.pad_token_id, np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    for i, ids in enumerate(ids_rows):
        tokens[i, :len(ids)] = ids
        segments[i, :len(ids)] = 1
    return {"input_ids": tokens, "segment_ids": segments, "labels": np.asarray(labels, np.int32)}


class Loader:
    """Deterministic, resumable batches from in-memory example arrays.

    The stream is an endless sequence of epochs, each a permutation of the examples drawn from
    (seed, epoch). Global batch k takes stream items [k*B, (k+1)*B), laid out as [grad_accum, B/grad_accum];
    this process gets rows [lo, hi) of every microbatch. The state is just the number of batches delivered,
    so it is the same on every process and restores exactly.
    """

    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, grad_accum: int = 1, seed: int = 0,
                 rows: tuple[int, int] | None = None, shuffle: bool = True):
        self.arrays = arrays
        self.n = num_examples(arrays)
        if self.n == 0:
            raise DataError("no examples to train on")
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.micro = global_batch // grad_accum
        self.rows = rows or (0, self.micro)
        self.seed, self.shuffle = seed, shuffle
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def state(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed), "num_examples": int(self.n),
                "global_batch": int(self.global_batch)}

    def restore(self, state: dict) -> None:
        if int(state["num_examples"]) != self.n or int(state["global_batch"]) != self.global_batch:
            log.warning("data changed since the checkpoint (examples %s -> %d, batch %s -> %d): the resumed order "
                        "differs from an uninterrupted run", state["num_examples"], self.n, state["global_batch"],
                        self.global_batch)
        self.position = int(state["position"])

    def _perm_of(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, k: int) -> np.ndarray:
        """Example indices of this process's part of global batch k, shape [grad_accum, hi - lo]."""
        lo, hi = self.rows
        out = np.empty((self.grad_accum, hi - lo), np.int64)
        for a in range(self.grad_accum):
            for j, r in enumerate(range(lo, hi)):
                item = k * self.global_batch + a * self.micro + r
                out[a, j] = self._perm_of(item // self.n)[item % self.n]
        return out

    def batch(self, k: int) -> dict[str, np.ndarray]:
        idx = self.indices(k)
        return {name: v[idx] for name, v in self.arrays.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch(self.position)
        self.position += 1
        return b

    def __iter__(self):
        return self
