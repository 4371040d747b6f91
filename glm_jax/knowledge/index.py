"""A searchable knowledge base: passages and their BM25 index, saved to a directory and loaded back
(docs/knowledge.md, "The index directory").

    index = KnowledgeIndex.build(read_passages("data/knowledge/docs"))
    hits = index.search("布达拉宫建在哪里？", k=5)        # [Hit(passage, score, rank), ...], best first
    index.save("kb_index"); KnowledgeIndex.load("kb_index")

BM25 comes from the bm25s library (Lucene's variant, k1 = 1.5, b = 0.75) over the words of
glm_jax/knowledge/lexical.py; each passage is indexed with its headings, which name its topic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np

from glm_jax.knowledge.documents import Passage
from glm_jax.knowledge.lexical import SEGMENTERS, STOPWORDS
from glm_jax.train.atomic_dir import check_destination, write_atomically

FORMAT = "glm_jax.knowledge/1"
logging.getLogger("bm25s").setLevel(logging.WARNING)  # its per-call progress messages


@dataclasses.dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float
    rank: int  # 1 = best

    def to_json(self) -> dict:
        return {"rank": self.rank, "score": self.score, **self.passage.to_json()}


def indexed_text(p: Passage) -> str:
    """What BM25 sees of a passage: its headings (outermost first), then its text."""
    return " ".join([*p.headings, p.text])


class KnowledgeIndex:
    """Passages with a BM25 index over their words (`segmenter`: "jieba" or the "chars" baseline)."""

    def __init__(self, passages: Sequence[Passage], bm25: bm25s.BM25, *, segmenter: str = "jieba"):
        self.passages, self.bm25, self.segmenter = list(passages), bm25, segmenter
        self._words = SEGMENTERS[segmenter]

    @classmethod
    def build(cls, passages: Sequence[Passage], *, segmenter: str = "jieba", k1: float = 1.5,
              b: float = 0.75) -> "KnowledgeIndex":
        if segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter: {segmenter!r} is not one of {sorted(SEGMENTERS)}")
        if not passages:
            raise ValueError("no passages to index (no .md, .txt, .jsonl or .pdf text found)")
        words = SEGMENTERS[segmenter]
        bm25 = bm25s.BM25(k1=k1, b=b)
        bm25.index([words(indexed_text(p)) or [""] for p in passages], show_progress=False)
        return cls(passages, bm25, segmenter=segmenter)

    def __len__(self) -> int:
        return len(self.passages)

    def query_terms(self, query: str) -> list[str]:
        """The query's words that the index knows; a word it does not know (the segmenter cut the passages'
        text differently around it: 之首 against 之 / 首) is replaced by its characters that it knows."""
        vocab = self.bm25.vocab_dict
        out = []
        for w in self._words(query):
            out.extend([w] if w in vocab else [c for c in w if len(w) > 1 and c in vocab and c not in STOPWORDS])
        return out

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for `query` (0 where no query word occurs)."""
        terms = self.query_terms(query)
        if not terms:
            return np.zeros(len(self.passages), np.float32)
        return np.asarray(self.bm25.get_scores(terms), np.float32)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The `k` best passages for `query` that share a word with it, best first (ties: earlier passage)."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(self.passages[i], float(scores[i]), r) for r, i in enumerate(order, 1) if scores[i] > 0]

    # ---------------------------------------------------------------------------------------------- on disk
    def save(self, out: str | Path) -> Path:
        """Writes the index directory whole (beside `out`, then renamed into place); an existing `out` must be
        empty or an index this class wrote, never anything else."""
        check_destination(out, "--out", ours=_ours)

        def write(tmp: Path) -> None:
            tmp.mkdir()
            with (tmp / "passages.jsonl").open("w", encoding="utf-8") as f:
                for p in self.passages:
                    f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
            self.bm25.save(str(tmp / "bm25"))
            (tmp / "index.json").write_text(json.dumps(
                {"format": FORMAT, "segmenter": self.segmenter, "passages": len(self.passages),
                 "bm25": {"k1": self.bm25.k1, "b": self.bm25.b, "method": self.bm25.method}}, indent=2) + "\n")

        return write_atomically(write, out)

    @classmethod
    def load(cls, path: str | Path) -> "KnowledgeIndex":
        path = Path(path)
        meta = _read_meta(path)
        if meta is None:
            raise ValueError(f"{path}: not a knowledge index (no index.json of format {FORMAT}; build one with "
                             f"python -m glm_jax.knowledge index)")
        with (path / "passages.jsonl").open(encoding="utf-8") as f:
            passages = [Passage.from_json(json.loads(line)) for line in f if line.strip()]
        bm25 = bm25s.BM25.load(str(path / "bm25"))
        if len(passages) != meta["passages"]:
            raise ValueError(f"{path}: index.json counts {meta['passages']} passages, passages.jsonl holds "
                             f"{len(passages)}")
        return cls(passages, bm25, segmenter=meta["segmenter"])


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _ours(path: Path) -> str | None:
    return None if _read_meta(path) is not None else "holds files that are not a knowledge index"
