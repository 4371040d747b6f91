"""Compression: parameters, held-out loss and decode tokens/s of a model and its pruned / recovered copies.

    python benchmarks/compress.py --model teacher=runs/tiny --model pruned=runs/tiny-pruned \
        --model distilled=runs/minitron-tiny --eval data/corpus/bible_asv_en.txt   # the Minitron recipe's models
    python benchmarks/compress.py --tiny --json out.json    # CPU smoke test: a random glm-test and its pruned copy

Each `--model NAME=DIR` is any checkpoint glm_jax loads (THUDM, transformers, a train.py run). For each one:

  params        GLMConfig.num_params()
  eval loss     mean next-token loss within documents on the first --eval-samples rows of --seq-len tokens of
                --eval (the same rows for every model; glm_jax.compress's eval_loss)
  decode        glm_jax.generate, greedy, --prompt-len prompt and --new-tokens new tokens at each --batch-sizes:
                tokens/s of the whole call (benchmarks/decode.py's bench_params)
  transformers  AutoModelForCausalLM.generate on the same checkpoint beside it (a config.json checkpoint in the
                transformers format, torch installed; --no-torch skips it)

The table (docs/compression.md) is printed; --json writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from decode import bench_params, timed  # noqa: E402
from glm_jax import GLMConfig, GLMForCausalLM, init_params, save_hf  # noqa: E402
from glm_jax import generation as G  # noqa: E402
from glm_jax.checkpoints import default_tokenizer, load_checkpoint, tokenizer_or_shipped  # noqa: E402
from glm_jax.compress import apply_plan, choose_units, collect_importance  # noqa: E402
from glm_jax.compress.__main__ import calibration_rows, eval_loss  # noqa: E402
from glm_jax.convert.hf import detect_format  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "bible_asv_en.txt"


def torch_decode(path: Path, batch_sizes, prompt: int, new: int, repeats: int) -> dict[int, float]:
    """{batch: tokens/s} of transformers' greedy generate on the checkpoint at `path` (CPU fp32, or CUDA bf16)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    out, rng = {}, np.random.RandomState(0)
    for b in batch_sizes:
        ids = torch.tensor(rng.randint(3, model.config.vocab_size, (b, prompt)), device=device)

        def run():
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
            if device == "cuda":
                torch.cuda.synchronize()

        run()  # warm-up
        out[b] = b * new / timed(run, repeats)
    return out  # the model goes with this frame


def measure(name: str, path: Path, rows: np.ndarray, args) -> dict:
    cfg, params = load_checkpoint(path)
    model = GLMForCausalLM(cfg)
    row = {"model": name, "path": str(path), "params": cfg.num_params(),
           "eval_loss": eval_loss(model, params, rows, args.batch_size)}
    decode, _ = bench_params(cfg, params, args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats)
    row["decode_tokens_per_s"] = {r["batch"]: r["tokens_per_s"] for r in decode}
    del params
    G.clear_cache()
    jax.clear_caches()
    gc.collect()
    if not args.no_torch and (path / "config.json").is_file() and detect_format(path)[0] == "transformers":
        try:
            row["transformers_tokens_per_s"] = torch_decode(path, args.batch_sizes, args.prompt_len,
                                                            args.new_tokens, args.repeats)
        except ImportError:
            print("transformers / torch not installed: no transformers column", flush=True)
    return row


def tiny_models(work: Path) -> list[tuple[str, Path]]:
    """A random glm-test (vocabulary of the shipped tokenizer) and a copy with half its MLP and KV groups pruned."""
    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192)
    params = init_params(GLMForCausalLM(cfg), jax.random.key(0))
    save_hf(cfg, params, work / "model", format="transformers")
    rows = calibration_rows([CORPUS], tokenizer_or_shipped(None), 32, 8)
    scores = collect_importance(GLMForCausalLM(cfg), params, [(rows[:, 0], rows[:, 1])])
    small_cfg, small = apply_plan(cfg, params, choose_units(cfg, scores, mlp_keep=0.5, heads_keep=0.5))
    save_hf(small_cfg, small, work / "pruned", format="transformers")
    return [("model", work / "model"), ("pruned", work / "pruned")]


def table(rows: list[dict], batch_sizes) -> str:
    head = "| model | params | eval loss | " + " | ".join(
        f"decode b={b} glm_jax / transformers (tok/s)" for b in batch_sizes) + " |"
    lines = [head, "|" + "---|" * (3 + len(batch_sizes))]
    for r in rows:
        theirs = r.get("transformers_tokens_per_s", {})
        cells = [f"{r['decode_tokens_per_s'][b]:.0f} / " + (f"{theirs[b]:.0f}" if b in theirs else "-")
                 for b in batch_sizes]
        lines.append(f"| {r['model']} | {r['params']:,} | {r['eval_loss']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a checkpoint to measure")
    p.add_argument("--eval", default=str(CORPUS), help="held-out text (.txt paragraphs or .jsonl 'text')")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="of the eval loss")
    p.add_argument("--tokenizer", help="default: the first model's, else the shipped one")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a random glm-test and its pruned copy, small shapes")
    p.add_argument("--json")
    args = p.parse_args(argv)
    work = tempfile.TemporaryDirectory()
    if args.tiny:
        models = tiny_models(Path(work.name))
        args.eval_samples, args.seq_len, args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats = \
            4, 32, [1, 2], 8, 8, 1
    else:
        models = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.model if "=" in spec]
        if not models or len(models) != len(args.model):
            p.error("--model NAME=DIR, at least one")
    tok = tokenizer_or_shipped(args.tokenizer or default_tokenizer(models[0][1]))
    rows = calibration_rows([args.eval], tok, args.seq_len, args.eval_samples)
    results = [measure(name, path, rows, args) for name, path in models]
    print(f"\n{len(rows)} eval rows of {args.seq_len} tokens from {args.eval}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {jax.devices()[0].platform}")
    print(table(results, args.batch_sizes))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
