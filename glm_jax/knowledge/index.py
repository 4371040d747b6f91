"""A searchable knowledge base: passages, their BM25 index and optionally their embeddings, saved to a directory
and loaded back (docs/knowledge.md, "The index directory").

    index = KnowledgeIndex.build(read_passages("data/knowledge/docs"), embedder=Embedder.load("ckpt"))
    hits = index.search("布达拉宫建在哪里？", k=5)        # [Hit(passage, score, rank), ...], best first
    index.save("kb_index"); KnowledgeIndex.load("kb_index")

BM25 comes from the bm25s library (Lucene's variant, k1 = 1.5, b = 0.75) over the words of
glm_jax/knowledge/lexical.py; each passage is indexed with its headings, which name its topic. With an embedder,
"dense" ranks by cosine similarity (exact search over the normalised vectors, or with `vector_index="hnsw"` an
approximate nearest-neighbour graph from the usearch library) and "hybrid" (the default then) fuses the BM25 and
dense rankings by reciprocal rank fusion (Cormack et al., 2009): sum over the rankings of 1 / (60 + rank).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import bm25s
import numpy as np

try:  # the optional approximate vector index (pip install 'glm_jax[ann]')
    from usearch.index import Index as HNSWGraph
except ImportError:
    HNSWGraph = None

from glm_jax.knowledge.documents import Passage
from glm_jax.knowledge.embeddings import Embedder
from glm_jax.knowledge.lexical import SEGMENTERS, STOPWORDS
from glm_jax.train.atomic_dir import check_destination, write_atomically

FORMAT = "glm_jax.knowledge/1"
MODES = ("bm25", "dense", "hybrid")
VECTOR_INDEXES = ("exact", "hnsw")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack, Clarke and Buettcher, 2009)
HYBRID_CANDIDATES = 100  # dense candidates an HNSW graph gives the fusion (exact search ranks every passage)
HNSW = dict(connectivity=16, expansion_add=128, expansion_search=64)  # M, efConstruction, ef (usearch's names)
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
    """Passages with a BM25 index over their words (`segmenter`: "jieba" or the "chars" baseline) and, with an
    `embedder`, their embeddings `vectors` [n, dim] (normalised), searched exactly or through an HNSW `graph`.

    `embedder`: a `glm_jax.knowledge.Embedder` (a GLM checkpoint, recorded and reloaded with the index) or any
    callable mapping a list of texts to L2-normalised [n, dim] vectors (another embedding model: pass it again to
    `load`)."""

    def __init__(self, passages: Sequence[Passage], bm25: bm25s.BM25, *, segmenter: str = "jieba",
                 vectors: np.ndarray | None = None, embedder: Embedder | None = None, graph=None):
        self.passages, self.bm25, self.segmenter = list(passages), bm25, segmenter
        self.vectors, self.embedder, self.graph = vectors, embedder, graph
        self._words = SEGMENTERS[segmenter]

    @classmethod
    def build(cls, passages: Sequence[Passage], *, segmenter: str = "jieba", embedder: Embedder | None = None,
              vector_index: str = "exact", k1: float = 1.5, b: float = 0.75) -> "KnowledgeIndex":
        """`vector_index` (with an embedder): "exact" search, or "hnsw", an approximate nearest-neighbour graph
        (usearch; for bases where a product with every vector per query is too slow)."""
        if segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter: {segmenter!r} is not one of {sorted(SEGMENTERS)}")
        if vector_index not in VECTOR_INDEXES:
            raise ValueError(f"vector_index: {vector_index!r} is not one of {VECTOR_INDEXES}")
        if not passages:
            raise ValueError("no passages to index (no .md, .txt, .jsonl or .pdf text found)")
        words = SEGMENTERS[segmenter]
        bm25 = bm25s.BM25(k1=k1, b=b)
        bm25.index([words(indexed_text(p)) or [""] for p in passages], show_progress=False)
        vectors = None if embedder is None else _passage_vectors(embedder, passages)
        graph = _hnsw(vectors) if vectors is not None and vector_index == "hnsw" else None
        return cls(passages, bm25, segmenter=segmenter, vectors=vectors, embedder=embedder, graph=graph)

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

    def similarities(self, query: str) -> np.ndarray:
        """Cosine similarity of every passage's embedding to the query's."""
        return self.vectors @ self._query_vector(query)

    def _query_vector(self, query: str) -> np.ndarray:
        if self.vectors is None or self.embedder is None:
            raise ValueError("dense search: this index has no embeddings (build it with an embedding model)")
        vector = np.asarray(self.embedder([query]), np.float32)
        if vector.shape != (1, self.vectors.shape[1]):
            raise ValueError(f"dense search: the embedder gave a vector of shape {vector.shape[1:]}, the index "
                             f"holds vectors of width {self.vectors.shape[1]}")
        return vector[0]

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[Hit]:
        """The `k` best passages for `query`, best first (ties: the earlier passage). mode "bm25": by BM25 score,
        passages sharing no word with the query left out; "dense": by cosine similarity; "hybrid": by reciprocal
        rank fusion of the two (Hit.score is then the fused score). Default: hybrid with embeddings, else bm25."""
        mode = mode or ("hybrid" if self.vectors is not None else "bm25")
        self.check_mode(mode)
        if mode == "bm25":
            scores = self.scores(query)
            order = _ranking(scores, matching=True)
            scores = scores[order]
        elif mode == "dense":
            order, scores = self.nearest(query, k)
        else:
            order, scores = self._fused(query, k)
        return [Hit(self.passages[i], float(s), r) for r, (i, s) in enumerate(zip(order[:k], scores[:k]), 1)]

    def check_mode(self, mode: str) -> None:
        """ValueError unless this index can search in `mode` (dense and hybrid need its embeddings)."""
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        if mode != "bm25" and (self.vectors is None or self.embedder is None):
            raise ValueError(f"mode: {mode!r} needs an index with embeddings (build it with an embedding model)")

    def nearest(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(passage indices, cosines) of the `n` passages nearest the query's embedding, best first: exact, or
        from the HNSW graph when the index has one."""
        if self.graph is None:
            similarities = self.similarities(query)
            order = _ranking(similarities)[:n]
            return order, similarities[order]
        found = self.graph.search(self._query_vector(query), min(n, len(self.passages)))
        return np.asarray(found.keys, np.int64), 1.0 - np.asarray(found.distances, np.float64)

    def _fused(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Reciprocal rank fusion: per passage, 1 / (RRF_K + its BM25 rank) (passages with a matching word
        only) + 1 / (RRF_K + its dense rank) (every passage; with a graph, its HYBRID_CANDIDATES nearest)."""
        fused = np.zeros(len(self.passages), np.float64)
        dense, _ = self.nearest(query, len(self.passages) if self.graph is None else max(k, HYBRID_CANDIDATES))
        for order in (_ranking(self.scores(query), matching=True), dense):
            fused[order] += 1.0 / (RRF_K + np.arange(1, len(order) + 1))
        order = _ranking(fused, matching=True)
        return order, fused[order]

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
            meta = {"format": FORMAT, "segmenter": self.segmenter, "passages": len(self.passages),
                    "bm25": {"k1": self.bm25.k1, "b": self.bm25.b, "method": self.bm25.method}}
            if self.vectors is not None:
                np.save(tmp / "vectors.npy", self.vectors.astype(np.float32))
                meta["embedding"] = {"checkpoint": getattr(self.embedder, "checkpoint", None),
                                     "pooling": getattr(self.embedder, "pooling", None),
                                     "max_len": getattr(self.embedder, "max_len", None),
                                     "dim": int(self.vectors.shape[1]),
                                     "vector_index": "exact" if self.graph is None else "hnsw"}
                if self.graph is not None:
                    self.graph.save(str(tmp / "vectors.usearch"))
            (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")

        return write_atomically(write, out)

    @classmethod
    def load(cls, path: str | Path, *, embedder: Embedder | None = None) -> "KnowledgeIndex":
        """The index at `path`; one built with embeddings loads the embedding model it records, unless
        `embedder` is given (the same model elsewhere: its vectors must have the recorded width)."""
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
        vectors, graph, emb = None, None, meta.get("embedding")
        if emb is not None:
            vectors = np.load(path / "vectors.npy")
            if emb.get("vector_index") == "hnsw":
                graph = _hnsw_restore(path / "vectors.usearch")
            if embedder is None:
                if not emb["checkpoint"]:
                    raise ValueError(f"{path}: its vectors come from an embedding model outside glm_jax (pass it "
                                     f"as KnowledgeIndex.load(..., embedder=...))")
                if not Path(emb["checkpoint"]).exists():
                    raise ValueError(f"{path}: its embedding model {emb['checkpoint']} is not there (pass the "
                                     f"model with --embedding-model)")
                embedder = Embedder.load(emb["checkpoint"], pooling=emb["pooling"], max_len=emb["max_len"])
            if getattr(embedder, "dim", vectors.shape[1]) != vectors.shape[1]:
                raise ValueError(f"{path}: vectors of width {vectors.shape[1]}, the embedding model gives "
                                 f"{embedder.dim}")
        return cls(passages, bm25, segmenter=meta["segmenter"], vectors=vectors, embedder=embedder, graph=graph)


def _passage_vectors(embedder, passages: Sequence[Passage]) -> np.ndarray:
    """[n, dim] float32 embeddings of the passages' indexed texts; ValueError unless the embedder gives one
    finite, L2-normalised row per text."""
    vectors = np.asarray(embedder([indexed_text(p) for p in passages]), np.float32)
    if vectors.ndim != 2 or len(vectors) != len(passages):
        raise ValueError(f"embedder: expected [{len(passages)}, dim] vectors for {len(passages)} passages, got "
                         f"shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("embedder: vectors must be finite and L2-normalised (cosine = dot product)")
    return vectors


def _needs_usearch() -> None:
    if HNSWGraph is None:
        raise ValueError("vector index 'hnsw': needs the optional usearch package (pip install 'glm_jax[ann]')")


def _hnsw(vectors: np.ndarray):
    """An HNSW graph (usearch) over the normalised vectors, cosine distance; passage i is key i."""
    _needs_usearch()
    graph = HNSWGraph(ndim=vectors.shape[1], metric="cos", dtype=np.float32, **HNSW)
    graph.add(np.arange(len(vectors)), np.asarray(vectors, np.float32))
    return graph


def _hnsw_restore(path: Path):
    _needs_usearch()
    graph = HNSWGraph.restore(str(path))
    if graph is None:
        raise ValueError(f"{path}: missing or not a usearch index")
    return graph


def _ranking(scores: np.ndarray, matching: bool = False) -> np.ndarray:
    """Passage indices by descending score (ties: the earlier passage); `matching`: only those scoring > 0."""
    order = np.argsort(-scores, kind="stable")
    return order[scores[order] > 0] if matching else order


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _ours(path: Path) -> str | None:
    return None if _read_meta(path) is not None else "holds files that are not a knowledge index"
