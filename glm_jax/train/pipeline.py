"""The input pipeline on Grain: sources, tokenization and packing as Grain transforms, and a resumable loader.

Two halves (tests/reference_data.py keeps the plain-numpy builders and loader this replaced; the tests check that
both give the same arrays and batches):

1. Reading: `FileRecords` (a Grain IterDataset) reads text / JSONL / Parquet files and Hugging Face datasets
   saved with `save_to_disk`, chosen by file extension / directory layout. Grain transforms turn the records into
   the example dicts of data.py (layout in data.py's docstring): pretraining text is tokenized 256 documents per
   SentencePiece call (`Tokenize`), cut at data.max_tokens (`LimitTokens`) and packed greedily into rows
   (`PackRows`, data.iter_packed_rows); SFT conversations and classification records are encoded one per row.
   `build_pretrain` / `build_sft` / `build_classification` run these pipelines to the end and return the
   example arrays (the whole epoch must be known to draw its permutation); `PretrainDocuments` feeds
   `train.py --prepare-data`.

2. Loading: `GrainLoader` gives deterministic, resumable global batches (`state()` / `restore()` /
   `position`): a Grain MapDataset whose element k is this process's rows of global batch k (`BatchIndices`,
   then `Gather`), iterated in this process or, with `workers > 0`, by Grain's worker processes (`mp_prefetch`).
   Its state holds Grain's own iterator state (JSON, in the orbax checkpoint's "loader" item) and the position,
   so the checkpoints of the loader before Grain (position only) restore here too.

Why not Grain's own `shuffle` / `ShardOptions` / `ConcatThenSplitIterDataset`: Grain's index shuffle is a
different permutation than ours (numpy's, per (seed, epoch), as before Grain), and Grain's sharding gives each process
its own slice of the dataset rather than rows [lo, hi) of every global batch (the layout the mesh shards): either
would change the batches of an existing config, which the classes below keep bit-identical. Grain's
concat-then-split packer gives the same rows as `PackRows` (checked on the shipped corpus) but packs them 17x
slower (0.73 s instead of 0.044 s for its 7243 rows of 128).
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import grain
import numpy as np

from glm_jax.train import blank_infilling as BI
from glm_jax.train import data as D
from glm_jax.train.data import BadRecords, DataError

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 256  # documents per tokenizer call (SentencePiece encodes a list on all cores)
ROWS_PER_BATCH = 1024  # rows per lm_examples call while reading


# ------------------------------------------------------------------------------------------------ sources

def hf_split_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face `Dataset.save_to_disk` directory (one split)."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def expand_sources(patterns: Iterable[str]) -> list[Path]:
    """Files matching the glob patterns, in order, and Hugging Face `save_to_disk` directories (a DatasetDict's directory is an
    error naming its splits: give DIR/train)."""
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(str(pat), recursive=True))
        if not hits:
            raise DataError(f"{pat}:0: no such file")
        paths = []
        for h in map(Path, hits):
            if h.is_file() or hf_split_dir(h):
                paths.append(h)
            elif (h / "dataset_dict.json").is_file():
                try:
                    splits = json.loads((h / "dataset_dict.json").read_text())["splits"]
                except (OSError, ValueError, KeyError, TypeError):
                    splits = ["train"]
                raise DataError(f"{h}:0: a Hugging Face DatasetDict: name one of its splits, e.g. "
                                f"{h / str(splits[0])}")
        if not paths:
            raise DataError(f"{pat}:0: not a file (a directory?); give files, a glob pattern such as DIR/*.txt, or "
                            f"a directory written by datasets' save_to_disk")
        out += paths
    return out


def source_format(path: Path, documents: bool) -> str:
    """"hf" | "parquet" | "jsonl" | "text". `.txt` (any other extension) is "text" when `documents` (pretraining
    text) and JSONL otherwise, as data.py's builders read it."""
    if hf_split_dir(path):
        return "hf"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".jsonl", ".json") or not documents:
        return "jsonl"
    return "text"


def _without_nones(obj: Any) -> Any:
    """A columnar row as the JSON object it was made from: Arrow structs give every record all the fields any
    record has, None where it had none (a message without "metadata" gets metadata=None, a tool the union of all
    tools' parameters); drop None-valued keys at every level (a JSON null in a nested object is lost with them:
    Arrow cannot tell the two apart)."""
    if isinstance(obj, dict):
        return {k: _without_nones(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_nones(v) for v in obj]
    return obj


def read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}:0: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError
        raise DataError(f"{path}:0: not a readable Parquet file ({type(e).__name__}: {str(e)[:200]})") from None
    n = 0
    for batch in f.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:{n}", _without_nones(row)


def read_hf_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}:0: a Hugging Face dataset directory; reading it needs the datasets package "
                        f"(pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path)).with_format(None)
    except Exception as e:  # a damaged directory: name it, in one line
        raise DataError(f"{path}:0: cannot load the dataset ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                        ) from None
    n = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            n += 1
            yield f"{path}:{n}", _without_nones(dict(zip(keys, values)))


def read_records(path: Path, bad: BadRecords, documents: bool, text_split: str = "paragraph"
                 ) -> Iterator[tuple[str, Any]]:
    """(where, record) of one source in order: `where` is "file:line" (the row, from 1, in Parquet / datasets;
    the file for .txt documents). Records are parsed JSON objects / rows, or the str documents of a text file
    (split by text_split). Unparsable lines go to `bad`."""
    fmt = source_format(path, documents)
    if fmt == "text":
        for text in D.read_text_documents(path, text_split, bad):
            yield str(path), text
    elif fmt == "jsonl":
        for n, obj in D.read_jsonl(path, bad):
            yield f"{path}:{n}", obj
    elif fmt == "parquet":
        yield from read_parquet(path)
    else:
        yield from read_hf_dataset(path)


class _ReplayIterator(grain.DatasetIterator):
    """A Grain iterator over a sequential generator (reading files, packing): the state is the number of elements
    delivered; set_state restarts the generator and skips that many (exact, at the cost of re-reading). The
    trainer never restores these stages: they are read once and resume happens on GrainLoader's batches."""

    def __init__(self, make: Callable[[], Iterator]):
        super().__init__()
        self._make = make
        self._gen = make()
        self._delivered = 0

    def __next__(self):
        item = next(self._gen)
        self._delivered += 1
        return item

    def get_state(self) -> dict:
        return {"delivered": self._delivered}

    def set_state(self, state: dict) -> None:
        self._gen = self._make()
        self._delivered = 0
        for _ in range(int(state["delivered"])):
            next(self)


class _StreamDataset(grain.IterDataset):
    """An IterDataset whose iterator runs `self._generate(parent iterator or None)`."""

    def __iter__(self):
        if self._parents:
            return _ReplayIterator(lambda: self._generate(iter(self._parent)))
        return _ReplayIterator(lambda: self._generate(None))

    def _generate(self, parent):
        raise NotImplementedError


class FileRecords(_StreamDataset):
    """(where, record) of every source in order (read_records). With `documents` (pretraining), .txt files are
    documents split by `text_split`; otherwise every file but .parquet / a datasets directory is JSONL."""

    def __init__(self, files: list[Path], bad: BadRecords, documents: bool, text_split: str = "paragraph"):
        super().__init__()
        self.files, self.bad, self.documents, self.text_split = list(files), bad, documents, text_split

    def _generate(self, _):
        for path in self.files:
            count = 0
            for item in read_records(path, self.bad, self.documents, self.text_split):
                count += 1
                yield item
            if not count:
                log.warning("%s: no records (empty or blank file, or every record bad)", path)

    def __str__(self):
        return f"FileRecords({len(self.files)} files)"


# ------------------------------------------------------------------------------------------------ transforms

def _not_none(x) -> bool:
    return x is not None


class PretrainText(grain.transforms.Map):
    """(where, record) -> the document's text, or None (a blank text; a bad record, reported to `bad`). Text-file
    documents pass as they are; objects must have a string field `text_key` (data.read_text_documents)."""

    def __init__(self, text_key: str, bad: BadRecords):
        self.text_key, self.bad = text_key, bad

    def map(self, element):
        where, rec = element
        if isinstance(rec, str):
            return rec
        text = rec.get(self.text_key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            self.bad.handle(where, f"expected an object with a string field {self.text_key!r}")
            return None
        return text if text.strip() else None


class Tokenize(grain.transforms.Map):
    """A list of texts -> their token ids, each + eos unless `eos` is false (one SentencePiece call for the
    list)."""

    def __init__(self, tok, eos: bool = True):
        self.tok, self.eos = tok, eos

    def map(self, texts):
        end = [self.tok.eos_token_id] if self.eos else []
        return [ids + end for ids in self.tok.encode(list(texts), add_special_tokens=False)]


class Unbatch(_StreamDataset):
    """Lists -> their items."""

    def _generate(self, parent):
        for items in parent:
            yield from items


class LimitTokens(_StreamDataset):
    """Documents (token lists) until `max_tokens` tokens were read, the last one cut there;
    no limit when max_tokens is None."""

    def __init__(self, parent, max_tokens: int | None):
        super().__init__(parent)
        self.max_tokens = max_tokens

    def _generate(self, parent):
        total, limit = 0, self.max_tokens
        for ids in parent:
            if limit is not None and total + len(ids) > limit:
                ids = ids[:limit - total]
            total += len(ids)
            if ids:
                yield ids
            if limit is not None and total >= limit:
                return


class PackRows(_StreamDataset):
    """Documents -> (tokens, segment_ids) rows of seq_len, packed greedily (data.iter_packed_rows: a document that
    does not fit continues as a new segment of the next row; the last row is padded)."""

    def __init__(self, parent, seq_len: int, pad_id: int):
        super().__init__(parent)
        self.seq_len, self.pad_id = seq_len, pad_id

    def _generate(self, parent):
        return D.iter_packed_rows(parent, self.seq_len, self.pad_id)


class LmExamples(grain.transforms.Map):
    """Batched (tokens, segment_ids[, target_mask]) rows -> the example dict (data.lm_examples)."""

    def map(self, rows):
        return D.lm_examples(*rows)


class EncodeConversation(grain.transforms.Map):
    """(where, record) -> (ids, is_target) of an SFT conversation (data.encode_sft_record: OpenAI `messages`
    through the tokenizer's chat template and assistant mask, or ChatGLM3 `conversations`), or None for a bad
    record (reported to `bad`)."""

    def __init__(self, tok, bad: BadRecords):
        self.tok, self.bad = tok, bad

    def map(self, element):
        where, obj = element
        try:
            return D.encode_sft_record(self.tok, obj)
        except (ValueError, KeyError, TypeError) as e:
            self.bad.handle(where, str(e))
        except RecursionError:  # tools / a tool call nested too deeply to serialise
            self.bad.handle(where, "nested too deeply")
        return None


class SftRow(grain.transforms.Map):
    """(ids, is_target) -> a right-padded (tokens, segment_ids, target_mask) row, truncated to its first seq_len
    tokens; None (counted in stats["dropped_no_target"]) when no target token is left."""

    def __init__(self, seq_len: int, pad_id: int, stats: dict):
        self.seq_len, self.pad_id, self.stats = seq_len, pad_id, stats

    def map(self, element):
        ids, tgt = element
        self.stats["conversations"] += 1
        if len(ids) > self.seq_len:
            self.stats["truncated"] += 1
            ids, tgt = ids[:self.seq_len], tgt[:self.seq_len]
        if not any(tgt[1:]):
            self.stats["dropped_no_target"] += 1
            return None
        tokens = np.full(self.seq_len, self.pad_id, np.int32)
        segments = np.zeros(self.seq_len, np.int32)
        target = np.zeros(self.seq_len, bool)
        tokens[:len(ids)] = ids
        segments[:len(ids)] = 1
        target[:len(tgt)] = tgt
        return tokens, segments, target


def labelled_text(element, num_labels: int, limit: str, bad: BadRecords) -> tuple[str, int] | None:
    """(text, label) of a (where, {"text", "label"}) record, or None for a bad one (reported to `bad`; `limit`
    names the setting that bounds the labels)."""
    where, obj = element
    text = obj.get("text") if isinstance(obj, dict) else None
    label = obj.get("label") if isinstance(obj, dict) else None
    if not isinstance(text, str) or not isinstance(label, int) or isinstance(label, bool):
        bad.handle(where, 'expected {"text": str, "label": int}')
        return None
    if not 0 <= label < num_labels:
        bad.handle(where, f"label {label} is outside [0, {num_labels}) ({limit})")
        return None
    return text, label


class ClassificationRow(grain.transforms.Map):
    """(where, {"text", "label"}) -> {input_ids, segment_ids, labels} ([gMASK] sop + text, first seq_len tokens,
    right-padded), or None for a bad record."""

    def __init__(self, tok, seq_len: int, num_labels: int, bad: BadRecords):
        self.tok, self.seq_len, self.num_labels, self.bad = tok, seq_len, num_labels, bad

    def map(self, element):
        record = labelled_text(element, self.num_labels, "model num_labels", self.bad)
        if record is None:
            return None
        text, label = record
        ids = self.tok.encode(text)[:self.seq_len]
        tokens = np.full(self.seq_len, self.tok.pad_token_id, np.int32)
        segments = np.zeros(self.seq_len, np.int32)
        tokens[:len(ids)] = ids
        segments[:len(ids)] = 1
        return {"input_ids": tokens, "segment_ids": segments, "labels": np.int32(label)}


class ClozeRow(grain.transforms.Map):
    """(where, {"text", "label"}) -> GLM's cloze rows of the record (blank_infilling.cloze_rows: one per label
    word) and its label, or None for a bad record."""

    def __init__(self, tok, seq_len: int, pattern: str, candidates: list[list[int]], bad: BadRecords):
        self.tok, self.seq_len, self.pattern, self.candidates, self.bad = tok, seq_len, pattern, candidates, bad

    def map(self, element):
        record = labelled_text(element, len(self.candidates), "cloze.verbalizer", self.bad)
        if record is None:
            return None
        text, label = record
        rows = BI.cloze_rows(self.tok, text, self.pattern, self.candidates, self.seq_len)
        return {**rows, "labels": np.int32(label)}


class EmbeddingPairRow(grain.transforms.Map):
    """(where, {"query", "positive", "negatives"?}) -> {query_ids, query_segments, passage_ids, passage_segments}:
    each text's `Tokenizer.embedding_ids` (as glm_jax.embed encodes it), right-padded; the passages are the
    positive and the record's first `negatives` hard negatives. None for a bad record."""

    def __init__(self, tok, seq_len: int, negatives: int, bad: BadRecords):
        self.tok, self.seq_len, self.negatives, self.bad = tok, seq_len, negatives, bad

    def _row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tok.embedding_ids(text, self.seq_len)
        tokens = np.full(self.seq_len, self.tok.pad_token_id or 0, np.int32)
        segments = np.zeros(self.seq_len, np.int32)
        tokens[:len(ids)], segments[:len(ids)] = ids, 1
        return tokens, segments

    def map(self, element):
        where, obj = element
        query = obj.get("query") if isinstance(obj, dict) else None
        positive = obj.get("positive") if isinstance(obj, dict) else None
        negatives = obj.get("negatives", []) if isinstance(obj, dict) else None
        if not (isinstance(query, str) and isinstance(positive, str) and isinstance(negatives, list)
                and all(isinstance(n, str) for n in negatives)):
            self.bad.handle(where, 'expected {"query": str, "positive": str, "negatives": [str, ...] (optional)}')
            return None
        if len(negatives) < self.negatives:
            self.bad.handle(where, f"{len(negatives)} negatives; embedding.negatives asks for {self.negatives}")
            return None
        q_ids, q_seg = self._row(query)
        rows = [self._row(t) for t in [positive, *negatives[:self.negatives]]]
        return {"query_ids": q_ids, "query_segments": q_seg, "passage_ids": np.stack([r[0] for r in rows]),
                "passage_segments": np.stack([r[1] for r in rows])}


# ------------------------------------------------------------------------------------------------ pipelines

def document_dataset(files: list[Path], tok, split: str, bad: BadRecords, text_key: str = "text",
                     max_tokens: int | None = None, eos: bool = True) -> grain.IterDataset:
    """The token ids (+ eos) of every pretraining document, in order, up to max_tokens in all."""
    ds = FileRecords(files, bad, documents=True, text_split=split)
    ds = ds.map(PretrainText(text_key, bad)).filter(_not_none)
    ds = Unbatch(ds.batch(TOKENIZE_BATCH, batch_fn=list).map(Tokenize(tok, eos)))
    return LimitTokens(ds, max_tokens)


def pretrain_dataset(files: list[Path], tok, seq_len: int, split: str, bad: BadRecords, text_key: str = "text",
                     max_tokens: int | None = None) -> grain.IterDataset:
    """Example dicts of up to ROWS_PER_BATCH packed pretraining rows at a time."""
    ds = PackRows(document_dataset(files, tok, split, bad, text_key, max_tokens), seq_len, tok.pad_token_id)
    return ds.batch(ROWS_PER_BATCH).map(LmExamples())


class PretrainDocuments:
    """The pretraining documents of `files` through the Grain pipeline (for `train.py --prepare-data`, which packs and streams the
    rows to disk itself): iterating yields each document's ids; `tokens` counts what was read."""

    def __init__(self, files: list[Path], tok, split: str, bad: BadRecords, text_key: str = "text",
                 max_tokens: int | None = None):
        self.dataset = document_dataset(files, tok, split, bad, text_key, max_tokens)
        self.tokens = 0

    def __iter__(self) -> Iterator[list[int]]:
        self.tokens = 0
        try:
            for ids in self.dataset:
                self.tokens += len(ids)
                yield ids
        except DataError as e:
            raise _without_grain_note(e) from None


def sft_dataset(files: list[Path], tok, seq_len: int, bad: BadRecords, stats: dict) -> grain.IterDataset:
    ds = FileRecords(files, bad, documents=False)
    ds = ds.map(EncodeConversation(tok, bad)).filter(_not_none)
    ds = ds.map(SftRow(seq_len, tok.pad_token_id, stats)).filter(_not_none)
    return ds.batch(ROWS_PER_BATCH).map(LmExamples())


def classification_dataset(files: list[Path], tok, seq_len: int, num_labels: int,
                           bad: BadRecords) -> grain.IterDataset:
    ds = FileRecords(files, bad, documents=False)
    ds = ds.map(ClassificationRow(tok, seq_len, num_labels, bad)).filter(_not_none)
    return ds.batch(ROWS_PER_BATCH)


def cloze_dataset(files: list[Path], tok, seq_len: int, pattern: str, candidates: list[list[int]],
                  bad: BadRecords) -> grain.IterDataset:
    ds = FileRecords(files, bad, documents=False)
    ds = ds.map(ClozeRow(tok, seq_len, pattern, candidates, bad)).filter(_not_none)
    return ds.batch(ROWS_PER_BATCH)


def embedding_dataset(files: list[Path], tok, seq_len: int, negatives: int, bad: BadRecords) -> grain.IterDataset:
    ds = FileRecords(files, bad, documents=False)
    ds = ds.map(EmbeddingPairRow(tok, seq_len, negatives, bad)).filter(_not_none)
    return ds.batch(ROWS_PER_BATCH)


def _without_grain_note(e: DataError) -> DataError:
    """A DataError stays the one line it was: drop the note Grain adds about its traceback filtering."""
    notes = [n for n in getattr(e, "__notes__", []) if "Grain" not in n]
    if hasattr(e, "__notes__"):
        if notes:
            e.__notes__ = notes
        else:
            del e.__notes__
    return e


def collect(ds: grain.IterDataset) -> dict[str, np.ndarray] | None:
    """The batches of `ds` concatenated into one dict of arrays; None if it gave none."""
    try:
        parts = list(ds)
    except DataError as e:
        raise _without_grain_note(e) from None
    if not parts:
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def build_pretrain(files: list[Path], tok, seq_len: int, split: str, bad: BadRecords, text_key: str = "text",
                   max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Pretraining rows: each document -> tokens + eos, packed into rows of seq_len."""
    arrays = collect(pretrain_dataset(files, tok, seq_len, split, bad, text_key, max_tokens))
    if arrays is None:
        raise D.no_examples(files, bad)
    log.info("pretraining data: %d tokens from %d files -> %d rows of %d", int((arrays["segment_ids"] > 0).sum()),
             len(files), len(arrays["input_ids"]), seq_len)
    return arrays


def build_blank_infilling(files: list[Path], tok, corruptor, seed: int, split: str, bad: BadRecords,
                          text_key: str = "text", max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """GLM blank-infilling rows (train/blank_infilling.py): every document (no eos: <eop> ends each span) cut
    to fit, corrupted by `corruptor` with numpy's generator of `seed`, the examples packed whole."""
    try:
        documents = list(document_dataset(files, tok, split, bad, text_key, max_tokens, eos=False))
    except DataError as e:
        raise _without_grain_note(e) from None
    arrays = corruptor.rows(documents, np.random.default_rng(seed), tok.pad_token_id or 0)
    if not len(arrays["input_ids"]):
        raise D.no_examples(files, bad)
    c = corruptor.counts
    log.info("blank-infilling data: %d tokens from %d documents, %d examples (token %d, sentence %d, document %d), "
             "%.1f%% masked -> %d rows of %d", c["tokens"], len(documents), c["token"] + c["sentence"] + c["document"],
             c["token"], c["sentence"], c["document"], 100 * c["masked"] / max(c["tokens"], 1),
             len(arrays["input_ids"]), corruptor.seq_len)
    return arrays


def build_sft(files: list[Path], tok, seq_len: int, bad: BadRecords) -> tuple[dict[str, np.ndarray], dict]:
    """SFT rows, one conversation per row, right-padded (truncation rule: SftRow) and the counts of what was kept."""
    stats = {"conversations": 0, "truncated": 0, "dropped_no_target": 0}
    arrays = collect(sft_dataset(files, tok, seq_len, bad, stats))
    if arrays is None:
        raise D.no_examples(files, bad, None if not stats["dropped_no_target"] else
                            f"all {stats['dropped_no_target']} conversations were dropped: no assistant token within "
                            f"the first data.seq_len={seq_len} tokens")
    log.info("SFT data: %s", stats)
    return arrays, stats


def build_classification(files: list[Path], tok, seq_len: int, num_labels: int,
                         bad: BadRecords) -> dict[str, np.ndarray]:
    """Classification rows: {"text", "label"} records, right-padded, and their labels."""
    arrays = collect(classification_dataset(files, tok, seq_len, num_labels, bad))
    if arrays is None:
        raise D.no_examples(files, bad)
    return arrays


def build_cloze(files: list[Path], tok, seq_len: int, pattern: str, candidates: list[list[int]],
                bad: BadRecords) -> dict[str, np.ndarray]:
    """GLM cloze rows: {"text", "label"} records -> [records, label words, seq_len] rows and their labels."""
    arrays = collect(cloze_dataset(files, tok, seq_len, pattern, candidates, bad))
    if arrays is None:
        raise D.no_examples(files, bad)
    return arrays


def build_embedding(files: list[Path], tok, seq_len: int, negatives: int, bad: BadRecords) -> dict[str, np.ndarray]:
    """Contrastive pairs: {"query", "positive", "negatives"} records -> query and passage rows."""
    arrays = collect(embedding_dataset(files, tok, seq_len, negatives, bad))
    if arrays is None:
        raise D.no_examples(files, bad)
    return arrays


# ------------------------------------------------------------------------------------------------ loader

class BatchIndices(grain.MapDataset):
    """Element k: the example indices of this process's part of global batch k, int64 [grad_accum, hi - lo].

    The batch order: an endless sequence of epochs, each a permutation of the n examples drawn from
    (seed, epoch); global batch k takes stream items [k*B, (k+1)*B) laid out as [grad_accum, B/grad_accum], and
    this process gets rows [lo, hi) of every microbatch (per-host sharding: it never reads the other rows)."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, n: int, global_batch: int, grad_accum: int, rows: tuple[int, int], seed: int,
                 shuffle: bool = True):
        super().__init__()
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        micro = global_batch // grad_accum
        lo, hi = rows
        self._offsets = np.arange(grad_accum, dtype=np.int64)[:, None] * micro + np.arange(lo, hi, dtype=np.int64)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize  # endless: epochs follow one another

    def __getstate__(self):  # for worker processes: no lock, no cached permutations
        state = self.__dict__.copy()
        state["_perms"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                        else np.arange(self.n))
                if len(self._perms) >= 2:  # the current epoch and the next (a batch may straddle them)
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        items = int(k) * self.global_batch + self._offsets  # offsets grow along both axes
        first, last = int(items[0, 0]) // self.n, int(items[-1, -1]) // self.n
        if first == last:
            return self._perm(first)[items - first * self.n]
        epochs, pos = np.divmod(items, self.n)
        out = np.empty_like(pos)
        for e in range(first, last + 1):
            where = epochs == e
            out[where] = self._perm(e)[pos[where]]
        return out

    def __str__(self) -> str:
        return f"BatchIndices(n={self.n}, global_batch={self.global_batch}, seed={self.seed})"


class Gather(grain.transforms.Map):
    """Example indices -> {name: array[indices]} (memory-mapped prepared rows read only those rows)."""

    def __init__(self, arrays: dict):
        self.arrays = arrays
        # prepared data: every column is a view of the same PackedRows; read the rows once, for all columns
        rows = {id(v.rows): v.rows for v in arrays.values() if isinstance(v, D.PackedColumn)}
        self.packed = next(iter(rows.values())) if len(rows) == 1 and all(
            isinstance(v, D.PackedColumn) for v in arrays.values()) else None

    def map(self, idx):
        if self.packed is not None:
            examples = self.packed.examples(idx)
            return {name: examples[v.name] for name, v in self.arrays.items()}
        return {name: v[idx] for name, v in self.arrays.items()}


def batch_dataset(arrays: dict, global_batch: int, grad_accum: int = 1, seed: int = 0,
                  rows: tuple[int, int] | None = None, shuffle: bool = True) -> grain.MapDataset:
    """The Grain MapDataset of this process's batches: element k = this process's rows of global batch k."""
    micro = global_batch // grad_accum
    indices = BatchIndices(D.num_examples(arrays), global_batch, grad_accum, rows or (0, micro), seed, shuffle)
    return indices.map(Gather(arrays))


class GrainLoader:
    """Deterministic, resumable global batches on Grain: `next(loader)` -> dict of [grad_accum, hi - lo, ...] arrays.

    workers=0 reads in this process (`prefetch` batches ahead in a thread; 0 = on demand), workers>0 in that many
    Grain worker processes (`mp_prefetch`; spawned, each reads every workers-th batch, `prefetch` ahead).
    `state()` is JSON: position (batches delivered) plus Grain's iterator state; `restore` sets Grain's state
    when it was saved with the same number of workers, and otherwise starts Grain at the position (a change of
    workers, or a checkpoint of the loader before Grain): the same batches either way.
    """

    def __init__(self, arrays: dict, *, global_batch: int, grad_accum: int = 1, seed: int = 0,
                 rows: tuple[int, int] | None = None, shuffle: bool = True, workers: int = 0, prefetch: int = 0):
        self.arrays = arrays
        self.n = D.num_examples(arrays)
        if self.n == 0:
            raise DataError("no examples to train on")
        if workers < 0 or prefetch < 0:
            raise ValueError(f"workers={workers} and prefetch={prefetch} must be >= 0")
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.micro = global_batch // grad_accum
        self.rows = tuple(rows or (0, self.micro))
        self.seed, self.shuffle, self.workers, self.prefetch = seed, shuffle, workers, prefetch
        self.dataset = batch_dataset(arrays, global_batch, grad_accum, seed, self.rows, shuffle)
        self.position = 0
        self._start = 0  # the iterator runs over self.dataset[self._start:]
        self._it = None  # made at the first batch (worker processes start then)

    # the loader interface the trainer uses
    def indices(self, k: int) -> np.ndarray:
        return self.dataset.parents[0][k]

    def batch(self, k: int) -> dict[str, np.ndarray]:
        return self.dataset[k]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._set_iterator()
        b = next(self._it)
        self.position += 1
        return b

    def state(self) -> dict:
        it = self._it.get_state() if self._it is not None else None
        return {"position": int(self.position), "seed": int(self.seed), "num_examples": int(self.n),
                "global_batch": int(self.global_batch),
                "grain": {"start": int(self._start), "workers": int(self.workers), "iterator": copy.deepcopy(it)}}

    def restore(self, state: dict) -> None:
        if int(state["num_examples"]) != self.n or int(state["global_batch"]) != self.global_batch:
            log.warning("data changed since the checkpoint (examples %s -> %d, batch %s -> %d): the resumed order "
                        "differs from an uninterrupted run", state["num_examples"], self.n, state["global_batch"],
                        self.global_batch)
        self.close()
        self.position = int(state["position"])
        self._start = self.position
        g = state.get("grain") or {}
        it_state = g.get("iterator")
        if isinstance(it_state, dict) and isinstance(it_state.get("future_states"), dict):  # int keys, as JSON strs
            it_state = dict(it_state, future_states={int(k): v for k, v in it_state["future_states"].items()})
        delivered = _delivered(it_state) if isinstance(it_state, dict) else None
        if (delivered is not None and g.get("workers") == self.workers
                and int(g.get("start", -1)) + delivered == self.position):
            self._start = int(g["start"])
            self._set_iterator()
            try:
                self._it.set_state(it_state)
            except Exception as e:  # not a state this Grain can set: start at the position instead
                log.warning("loader: Grain's iterator state not restored (%s: %s); starting at batch %d",
                            type(e).__name__, e, self.position)
                self.close()
                self._start = self.position

    def _set_iterator(self) -> None:
        self._it = self._iterator()
        # closed at the latest when the interpreter exits (Grain's threads and workers then stop cleanly)
        self._finalizer = weakref.finalize(self, self._it.close)

    def _iterator(self):
        ds = self.dataset[self._start:] if self._start else self.dataset
        read = grain.ReadOptions(num_threads=1 if self.prefetch else 0, prefetch_buffer_size=self.prefetch)
        ds = ds.to_iter_dataset(read)
        if self.workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain 0.2 reads its absl flags when it starts workers
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=max(1, self.prefetch)))
        return iter(ds)

    def close(self) -> None:
        """Stops Grain's threads / worker processes (also at garbage collection)."""
        if self._it is not None:
            self._finalizer()
            self._it = None


def _delivered(it_state: dict) -> int | None:
    """Batches a Grain iterator state says were delivered: next_index in this process, the workers' sum with
    mp_prefetch; None for a state of another form."""
    if isinstance(it_state.get("next_index"), int):
        return it_state["next_index"]
    workers = it_state.get("iterators_in_use_states")
    if isinstance(workers, list) and all(isinstance(w, dict) and isinstance(w.get("next_index"), int)
                                         for w in workers):
        return sum(w["next_index"] for w in workers)
    return None
