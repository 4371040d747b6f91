"""python -m glm_jax.knowledge index | search | eval | pairs | sft (console script: glm-knowledge).

    python -m glm_jax.knowledge index --docs data/knowledge/docs --out kb_index [--embedding-model CKPT
                                      [--vector-index exact|hnsw]]
    python -m glm_jax.knowledge search kb_index "布达拉宫建在哪里？" -k 3 [--json] [--mode bm25|dense|hybrid]
    python -m glm_jax.knowledge eval kb_index --questions data/knowledge/questions.jsonl [--mode ...]
    python -m glm_jax.knowledge pairs --docs data/knowledge/docs --out pairs.jsonl   # train.py data.task: embedding
    python -m glm_jax.knowledge sft kb_index --qa qa.jsonl --out sft.jsonl [-k 3]     # train.py data.task: sft

Exit codes: 0 done; 2 bad arguments, files or destination (one `error: ...` line naming the flag or file); the
index directory is written whole or not at all, and never over a directory that is not an index
(docs/knowledge.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glm_jax.platforms import skip_absent_tpu

skip_absent_tpu()  # before bm25s, imported with the index, starts JAX's backends (on CPU where nothing else is)

from glm_jax.checkpoints import tokenizer_or_shipped  # noqa: E402
from glm_jax.knowledge.documents import read_passages  # noqa: E402
from glm_jax.knowledge.embeddings import POOLINGS, Embedder  # noqa: E402
from glm_jax.knowledge.evaluate import read_questions, recall  # noqa: E402
from glm_jax.knowledge.grounding import grounded_sft_record, has_system_role, read_qa  # noqa: E402
from glm_jax.knowledge.index import MODES, VECTOR_INDEXES, KnowledgeIndex  # noqa: E402
from glm_jax.knowledge.lexical import SEGMENTERS  # noqa: E402
from glm_jax.knowledge.pairs import write_cloze_pairs  # noqa: E402
from glm_jax.train.config import ConfigError  # noqa: E402


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.knowledge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("index", help="split files into passages and build their BM25 index")
    p.add_argument("--docs", required=True, help="a directory of .md / .txt / .jsonl (/ .pdf) files, or one file")
    p.add_argument("--out", required=True, help="the index directory (new, empty, or an index to replace)")
    p.add_argument("--tokenizer", help="counts the passage budget (default: the tokenizer shipped with glm_jax)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per passage at most")
    p.add_argument("--overlap", type=int, default=32, help="tokens of the previous passage repeated at the start")
    p.add_argument("--segmenter", choices=sorted(SEGMENTERS), default="jieba",
                   help="Chinese words by jieba (default) or single characters")
    p.add_argument("--embedding-model", help="a GLM checkpoint whose embeddings also index the passages")
    p.add_argument("--pooling", choices=POOLINGS, default="last", help="of the embeddings (glm_jax.embed)")
    p.add_argument("--vector-index", choices=VECTOR_INDEXES, default="exact",
                   help="dense search: exact, or an approximate HNSW graph (usearch: pip install 'glm_jax[ann]')")
    p = sub.add_parser("search", help="the best passages for a query")
    p.add_argument("index")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    _search_options(p)
    p = sub.add_parser("eval", help="recall@k on a question set ({question, source, title} per JSONL line)")
    p.add_argument("index")
    p.add_argument("--questions", required=True)
    p.add_argument("-k", type=int, nargs="+", default=[1, 5])
    _search_options(p)
    p = sub.add_parser("sft", help="knowledge-grounded SFT records from question / answer pairs")
    p.add_argument("index")
    p.add_argument("--qa", required=True, help='a JSONL file of {"question", "answer"} records')
    p.add_argument("--out", required=True, help="the SFT JSONL file (not overwritten)")
    p.add_argument("-k", type=int, default=3, help="passages per question, as glm-chat --knowledge-k")
    p.add_argument("--tokenizer", help="the chat format to be trained (a format without a system role gets the "
                                       "passages in the user message; default: the tokenizer shipped with glm_jax)")
    _search_options(p)
    p = sub.add_parser("pairs", help="inverse-cloze training pairs for data.task: embedding")
    p.add_argument("--docs", required=True)
    p.add_argument("--out", required=True, help="a JSONL file (not overwritten)")
    p.add_argument("--per-passage", type=int, default=3, help="queries (sentences) per passage at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256)
    return parser


def _search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, help="default: hybrid for an index with embeddings, else bm25")
    p.add_argument("--embedding-model", help="the index's embedding model, when it is not where the index says")


def run(args) -> int:
    if args.command == "index":
        tok = tokenizer_or_shipped(args.tokenizer)
        passages = read_passages(args.docs, tokenizer=tok, max_tokens=args.max_tokens, overlap=args.overlap)
        embedder = Embedder.load(args.embedding_model, pooling=args.pooling) if args.embedding_model else None
        if args.vector_index != "exact" and embedder is None:
            raise ValueError("--vector-index: needs --embedding-model")
        index = KnowledgeIndex.build(passages, segmenter=args.segmenter, embedder=embedder,
                                     vector_index=args.vector_index)
        out = index.save(args.out)
        print(f"indexed {len(passages)} passages from {args.docs} into {out}")
        return 0
    if args.command == "pairs":
        _check_new_file(args.out)
        n = write_cloze_pairs(read_passages(args.docs, max_tokens=args.max_tokens), args.out,
                              per_passage=args.per_passage, seed=args.seed)
        print(f"wrote {n} query / positive pairs to {args.out}")
        return 0
    index = KnowledgeIndex.load(args.index, embedder=Embedder.load(args.embedding_model)
                                if args.embedding_model else None)
    if args.command == "search":
        for hit in index.search(args.query, args.k, mode=args.mode):
            if args.json:
                print(json.dumps(hit.to_json(), ensure_ascii=False))
            else:
                print(f"{hit.rank}. [{hit.score:.2f}] {hit.passage.citation}\n   {hit.passage.text}")
        return 0
    if args.command == "sft":
        return _write_sft(index, args)
    search = lambda query, k: index.search(query, k, mode=args.mode)  # noqa: E731
    print(json.dumps(recall(index, read_questions(args.questions), ks=args.k, search=search)))
    return 0


def _check_new_file(out: str) -> None:
    """The JSONL outputs (pairs, sft) are never written over an existing file."""
    if Path(out).exists():
        raise ValueError(f"--out: {out} exists; choose a new file")


def _write_sft(index, args) -> int:
    _check_new_file(args.out)
    if args.k < 1:
        raise ValueError(f"-k: must be at least 1, got {args.k}")
    try:
        qa = read_qa(args.qa)
    except OSError as e:
        raise ValueError(f"--qa: {args.qa}: cannot read it ({e.strerror or e})") from None
    tok = tokenizer_or_shipped(args.tokenizer)
    system_role = has_system_role(tok)
    records = [grounded_sft_record(index, tok, r["question"], r["answer"], k=args.k, mode=args.mode,
                                   system_role=system_role) for r in qa]
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} grounded SFT records to {args.out}")
    return 0


def main(argv=None) -> int:
    args = _arg_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
