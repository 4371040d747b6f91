"""Input-pipeline throughput: rows/s that train.py's Grain loader delivers from prepared (memory-mapped) rows,
next to the plain-numpy loader it replaced (tests/reference_data.py), in one run.

    python train.py --config configs/tiny.yaml --prepare-data /tmp/prep      # once
    python benchmarks/loader.py /tmp/prep --global-batch 64 --workers 0 2 --prefetch 0 2
    python benchmarks/loader.py --tiny                                         # CPU smoke test (60k tokens)

Each row: one process, all rows of each global batch, `--batches` batches after 5 of warm-up, the best of
`--repeats`; a batch counts when its input_ids were read (summed) on the host.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/reference_data.py (and glm_jax from a checkout without installing)

from glm_jax.train import data as D  # noqa: E402
from glm_jax.train.pipeline import GrainLoader, PretrainDocuments, expand_sources  # noqa: E402
from tests.reference_data import Loader as NumpyLoader  # noqa: E402


def makers(arrays, global_batch: int, workers, prefetch):
    yield "numpy loader (before Grain)", lambda: NumpyLoader(arrays, global_batch, seed=0)
    for w in workers:
        for p in prefetch:
            yield (f"GrainLoader(workers={w}, prefetch={p})",
                   lambda w=w, p=p: GrainLoader(arrays, global_batch=global_batch, seed=0, workers=w, prefetch=p))


def rows_per_s(make, global_batch: int, batches: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        loader = make()
        for _ in range(5):
            next(loader)
        t = time.perf_counter()
        for _ in range(batches):
            next(loader)["input_ids"].sum()
        best = max(best, batches * global_batch / (time.perf_counter() - t))
        getattr(loader, "close", lambda: None)()
    return best


def tiny_prepared(out: Path) -> Path:
    from glm_jax.tokenizers import ChatGLMTokenizer

    tok = ChatGLMTokenizer()
    docs = PretrainDocuments(expand_sources([str(ROOT / "data/corpus/*.txt")]), tok, "paragraph", D.BadRecords(),
                             max_tokens=60_000)
    n = D.prepare_pretrain(docs, 64, tok.pad_token_id, out, "train", progress=False)
    (out / D.PREPARED_META).write_text(json.dumps({"seq_len": 64, "vocab_size": tok.vocab_size, "rows": {"train": n}}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prepared", nargs="?", help="a directory written by train.py --prepare-data")
    ap.add_argument("--tiny", action="store_true", help="prepare 60k tokens of the shipped corpus and run briefly")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    if a.tiny:
        a.prepared = str(tiny_prepared(Path(tempfile.mkdtemp(prefix="glm_prep_"))))
        a.batches, a.repeats, a.workers, a.prefetch = 20, 1, [0], [0, 2]
    if not a.prepared:
        ap.error("give a prepared directory or --tiny")
    meta = json.loads((Path(a.prepared) / D.PREPARED_META).read_text())
    arrays = D.open_prepared(a.prepared, "train", int(meta["seq_len"]), int(meta["vocab_size"]))
    rows = []
    print(f"| loader | rows/s ({a.global_batch} x {meta['seq_len']}) |\n|---|---:|")
    for name, make in makers(arrays, a.global_batch, a.workers, a.prefetch):
        rate = rows_per_s(make, a.global_batch, a.batches, a.repeats)
        rows.append({"loader": name, "rows_per_s": rate, "global_batch": a.global_batch, "seq_len": meta["seq_len"]})
        print(f"| {name} | {rate:,.0f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
