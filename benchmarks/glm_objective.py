"""GLM's objective, measured: a small ChatGLM-6B-architecture model pretrained with blank infilling on the
shipped corpus (train.py with configs/glm-objective-tiny.yaml) fills a [MASK] in text it never saw.

    python benchmarks/glm_objective.py --steps 1000 --json out.json   # train, then measure
    python benchmarks/glm_objective.py --run-dir DIR --no-train         # measure a finished run of this split
    python benchmarks/glm_objective.py --steps 400 --set train.global_batch_size=16 ...   # train.py overrides

The corpus (data/corpus/*.txt, paragraphs) is split per file: the first 90% of the paragraphs are the training
text, the last 10% are held out. In every held-out paragraph (its first --task-tokens tokens, at most the run's
data.seq_len) --tasks single tokens at random inner positions are masked, one per prompt: the text with [MASK] in the token's place, framed as
ChatGLM-6B's tokenizer frames it (text, </s>, <sop>). The model's distribution for the first token of the span
(GLM's special tokens left out: a span is never empty) is scored against the masked token: top-1 and top-5
accuracy and the mean log-probability. Baselines on the same tasks: the unigram distribution of the training
paragraphs (the best guess without context; its top-1 is the most frequent token) and the untrained model.
The table is printed; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax import GLMForCausalLM, init_params, load_tokenizer  # noqa: E402
from glm_jax.tokenizers import CHATGLM6B_VOCABULARY  # noqa: E402
from glm_jax.train.build import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 0.1


def split_corpus(out: Path) -> list[str]:
    """Writes each corpus file's first 90% of paragraphs under `out`; returns the held-out paragraphs."""
    out.mkdir(parents=True, exist_ok=True)
    held = []
    for path in sorted((ROOT / "data" / "corpus").glob("*.txt")):
        paragraphs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        keep = int(len(paragraphs) * (1 - HELD_OUT))
        (out / path.name).write_text("\n\n".join(paragraphs[:keep]), encoding="utf-8")
        held += paragraphs[keep:]
    return held


def fill_tasks(tok, paragraphs: list[str], per_paragraph: int, length: int, seed: int = 0):
    """(prompts, masked token ids): one masked token per prompt, at distinct inner positions of a paragraph."""
    special = tok.special_tokens
    rng = np.random.default_rng(seed)
    prompts, truths = [], []
    for ids in tok.encode(paragraphs, add_special_tokens=False):
        ids = ids[:length]
        if len(ids) < 12:
            continue
        for at in rng.choice(np.arange(4, len(ids) - 4), size=min(per_paragraph, len(ids) - 8), replace=False):
            prompts.append(ids[:at] + [special["[MASK]"]] + ids[at + 1:] + [special["</s>"], special["<sop>"]])
            truths.append(ids[at])
    return prompts, np.asarray(truths)


def model_scores(model, params, prompts, truths, excluded, batch: int = 32) -> dict:
    """Top-1 / top-5 accuracy and mean log-probability of the masked tokens at the <sop> that starts the span."""
    log_probs = []
    for i in range(0, len(prompts), batch):
        rows = prompts[i:i + batch]
        width = max(map(len, rows))
        ids = np.asarray([[0] * (width - len(r)) + r for r in rows], np.int32)
        mask = np.asarray([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
        logits = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))[:, -1].astype(np.float64)
        logits[:, excluded] = -np.inf
        log_probs.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    return scores(np.concatenate(log_probs), truths)


def scores(log_probs: np.ndarray, truths: np.ndarray) -> dict:
    ranks = (log_probs > log_probs[np.arange(len(truths)), truths][:, None]).sum(-1)
    return {"top1": float(np.mean(ranks == 0)), "top5": float(np.mean(ranks < 5)),
            "log_prob": float(np.mean(log_probs[np.arange(len(truths)), truths]))}


def unigram_scores(tok, train_dir: Path, truths, excluded) -> dict:
    counts = np.zeros(tok.vocab_size)
    for path in sorted(train_dir.glob("*.txt")):
        for ids in tok.encode(path.read_text(encoding="utf-8").split("\n\n"), add_special_tokens=False):
            np.add.at(counts, ids, 1)
    counts[excluded] = 0
    with np.errstate(divide="ignore"):
        log_p = np.log(np.maximum(counts, 1e-3) / counts.sum())  # unseen tokens: a small floor, not -inf
    return scores(np.broadcast_to(log_p, (len(truths), len(log_p))), truths)


def train(run_dir: Path, train_dir: Path, steps: int, overrides: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "glm-objective-tiny.yaml"),
           f"run_dir={run_dir}", f"data.train_files=[{train_dir}/*.txt]", f"train.steps={steps}",
           f"checkpoint.every={steps}", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")),
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"train.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides")
    parser.add_argument("--run-dir", help="the run directory (default: a temporary one)")
    parser.add_argument("--no-train", action="store_true", help="measure the run already in --run-dir")
    parser.add_argument("--tasks", type=int, default=3, help="masked tokens per held-out paragraph")
    parser.add_argument("--task-tokens", type=int, default=64, help="the first tokens of each held-out paragraph")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.no_train and not args.run_dir:
        parser.error("--no-train needs --run-dir")
    work = Path(tempfile.mkdtemp(prefix="glm-objective-"))
    run_dir = Path(args.run_dir) if args.run_dir else work / "run"
    held = split_corpus(work / "train")
    seconds = None if args.no_train else train(run_dir, work / "train", args.steps, args.set)
    tok = load_tokenizer(CHATGLM6B_VOCABULARY)
    excluded = np.asarray(sorted(set(tok.special_tokens.values())))
    prompts, truths = fill_tasks(tok, held, args.tasks, args.task_tokens)
    cfg, params = load_run(run_dir)
    model = GLMForCausalLM(cfg)
    rows = [{"model": f"pretrained ({cfg.num_params() / 1e6:.2f}M parameters)", **model_scores(
                model, params, prompts, truths, excluded)},
            {"model": "unigram of the training text", **unigram_scores(tok, work / "train", truths, excluded)},
            {"model": "untrained (random initialisation)", **model_scores(
                model, init_params(model, jax.random.key(0)), prompts, truths, excluded)}]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    print(f"{len(truths)} masked tokens in {len(held)} held-out paragraphs; run {run_dir}"
          + (f": {args.steps} steps in {seconds:.0f} s" if seconds else "")
          + (f", eval loss {evals[0]:.3f} -> {evals[-1]:.3f}" if evals else ""))
    print("| model | top-1 | top-5 | mean log-prob |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['top1']:.3f} | {r['top5']:.3f} | {r['log_prob']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tasks": len(truths), "steps": args.steps, "overrides": args.set,
                                               "eval_loss": evals, "train_seconds": seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
