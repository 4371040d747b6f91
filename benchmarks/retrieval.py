"""Retrieval: recall and query latency of a knowledge index, BM25 / dense / hybrid, exact and HNSW dense search.

    python benchmarks/retrieval.py --docs data/knowledge/docs --questions data/knowledge/questions.jsonl \
        [--embedding-model CKPT] [--distractors data/corpus]       # the shipped base, optionally with distractors
    python benchmarks/retrieval.py --vectors 200000 --dim 1024     # exact against HNSW on random unit vectors
    python benchmarks/retrieval.py --tiny --json out.json          # CPU smoke test

For a knowledge base: recall@1, recall@5 and MRR@5 of every mode (glm_jax.knowledge.recall), and the median
milliseconds of one `index.search` (query embedding included), for exact dense search and for the usearch HNSW
graph (`--vector-index hnsw`) when an embedding model is given. For `--vectors`: the time to build the graph,
the median milliseconds of one nearest-10 query by a product with every vector (numpy, what exact search does)
and through the graph, and the graph's recall@10 of the exact neighbours; the vectors are clustered (n / 100
topic directions plus each vector's own part, as embeddings of text are) and the queries are vectors plus noise.
The table is printed; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from glm_jax.platforms import skip_absent_tpu  # noqa: E402

skip_absent_tpu()  # before bm25s (with the index) starts JAX's backends

from glm_jax.knowledge import Embedder, read_passages, read_questions, recall  # noqa: E402
from glm_jax.knowledge.index import HNSW, HNSWGraph, KnowledgeIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, inputs) -> float:
    times = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def knowledge_rows(args) -> list[dict]:
    passages = read_passages(args.docs)
    for extra in args.distractors:
        passages += read_passages(extra)
    questions = read_questions(args.questions)
    embedder = Embedder.load(args.embedding_model) if args.embedding_model else None
    builds = {"exact": KnowledgeIndex.build(passages, embedder=embedder)}
    if embedder is not None and HNSWGraph is not None:
        builds["hnsw"] = KnowledgeIndex.build(passages, embedder=embedder, vector_index="hnsw")
    rows = []
    for kind, index in builds.items():
        for mode in ("bm25",) + (("dense", "hybrid") if embedder is not None else ()):
            if kind == "hnsw" and mode == "bm25":
                continue
            search = lambda q, k, mode=mode, index=index: index.search(q, k, mode=mode)  # noqa: E731
            found = recall(index, questions, ks=(1, 5), search=search)
            ms = median_ms(lambda q: search(q, 5), [q["question"] for q in questions])
            rows.append({"passages": len(passages), "mode": mode, "vectors": kind if mode != "bm25" else "-",
                         **{k: round(v, 3) for k, v in found.items()}, "query_ms": round(ms, 2)})
    return rows


def vector_rows(n: int, dim: int, queries: int = 200, k: int = 10) -> list[dict]:
    # Embeddings of real text are clustered (topics), not uniform on the sphere (where every neighbour is almost
    # orthogonal and "nearest" is noise): each vector is one of n / 100 topic directions plus its own part.
    rng = np.random.default_rng(0)
    topics = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
    vectors = topics[rng.integers(0, len(topics), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = rng.choice(n, queries, replace=False)
    asked = vectors[picks] + 0.5 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim)
    asked /= np.linalg.norm(asked, axis=1, keepdims=True)
    exact = [np.argsort(-(vectors @ q), kind="stable")[:k] for q in asked]
    rows = [{"vectors": n, "dim": dim, "search": "exact (numpy product)", "build_s": 0.0,
             "query_ms": round(median_ms(lambda q: np.argpartition(-(vectors @ q), k)[:k], asked), 3),
             "recall@10": 1.0}]
    if HNSWGraph is not None:
        start = time.perf_counter()
        graph = HNSWGraph(ndim=dim, metric="cos", dtype=np.float32, **HNSW)
        graph.add(np.arange(n), vectors)
        build = time.perf_counter() - start
        got = [graph.search(q, k).keys for q in asked]
        hit = np.mean([len(set(map(int, g)) & set(map(int, e))) / k for g, e in zip(got, exact)])
        rows.append({"vectors": n, "dim": dim, "search": "hnsw (usearch)", "build_s": round(build, 2),
                     "query_ms": round(median_ms(lambda q: graph.search(q, k), asked), 3),
                     "recall@10": round(float(hit), 3)})
    return rows


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", default=str(ROOT / "data" / "knowledge" / "docs"))
    p.add_argument("--questions", default=str(ROOT / "data" / "knowledge" / "questions.jsonl"))
    p.add_argument("--distractors", nargs="*", default=[], help="more directories or files of passages")
    p.add_argument("--embedding-model", help="a GLM checkpoint for dense and hybrid search")
    p.add_argument("--vectors", type=int, help="random unit vectors instead of a knowledge base")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="the shipped base (BM25) and 2,000 random vectors of 64")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    tables = []
    if args.tiny or not args.vectors:
        tables.append(knowledge_rows(args))
    if args.tiny or args.vectors:
        tables.append(vector_rows(2000, 64, queries=20) if args.tiny else vector_rows(args.vectors, args.dim))
    print("\n\n".join(table(rows) for rows in tables))
    if args.json:
        Path(args.json).write_text(json.dumps([r for rows in tables for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
