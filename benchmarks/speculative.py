"""Speculative decoding: tokens/s and accept length of MTP and n-gram drafts against plain greedy decoding, same
model, same prompts, one run.

    python train.py --config configs/moe-tiny.yaml            # a small glm4_moe with a trained MTP layer
    python benchmarks/speculative.py --checkpoint runs/moe-tiny
    python benchmarks/speculative.py --checkpoint DIR --batch-sizes 1 8 --new-tokens 128 --k 1 2 3 --json out.json
    python benchmarks/speculative.py --tiny         # smoke test: a random glm-moe-test with an MTP layer, few tokens

`--checkpoint`: a train.py run directory or a THUDM / transformers checkpoint (MTP rows need MTP layers; n-gram
rows run for any model). Prompts: the first `--prompt-tokens` tokens of paragraphs of the shipped corpus
(data/corpus), tokenized with the checkpoint's tokenizer (else the shipped one). Greedy, no stop ids, so every
row decodes exactly `--new-tokens` tokens. Each configuration runs once to compile, then `--repeats` times
timed; tokens/s = batch * new tokens / the best time. Accept length: tokens emitted per verify step (1 .. k + 1),
the mean over rows. Every speculative row is checked to give plain greedy decoding's tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax import GLMConfig, GLMForCausalLM, generate, init_params  # noqa: E402
from glm_jax.checkpoints import default_tokenizer, load_checkpoint, tokenizer_or_shipped  # noqa: E402
from glm_jax.speculative import generate_speculative  # noqa: E402


def corpus_prompts(tokenizer, count: int, length: int) -> np.ndarray:
    """[count, length] token ids: the starts of the corpus' longer paragraphs, from every file in turn."""
    files = sorted((ROOT / "data" / "corpus").glob("*.txt"))
    paragraphs = [[p for p in f.read_text(encoding="utf-8").split("\n\n") if len(p) > 4 * length] for f in files]
    rows, i = [], 0
    while len(rows) < count:
        source = paragraphs[len(rows) % len(files)]
        ids = tokenizer.encode(source[i % len(source)])[:length]
        if len(ids) == length:
            rows.append(ids)
        i += 7
    return np.asarray(rows, np.int32)


def best_time(fn, repeats: int):
    result = fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a train.py run directory or a THUDM / transformers checkpoint")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a random small model, batch 1, 8 tokens, k 1")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="MTP drafts per step to measure")
    ap.add_argument("--ngram-k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.checkpoint, args.batch_sizes, args.new_tokens, args.k, args.ngram_k, args.repeats = "tiny", [1], 8, [1], 2, 1
        cfg = GLMConfig.from_preset("glm-moe-test", vocab_size=8192, num_mtp_layers=1)
        params = init_params(GLMForCausalLM(cfg), jax.random.key(0))
        tokenizer = tokenizer_or_shipped(None)
    elif args.checkpoint is None:
        ap.error("--checkpoint is required (or --tiny)")
    else:
        cfg, params = load_checkpoint(args.checkpoint)
        tokenizer = tokenizer_or_shipped(default_tokenizer(args.checkpoint))
    model = GLMForCausalLM(cfg)
    print(f"{args.checkpoint}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_mtp_layers} MTP layer(s); "
          f"{jax.devices()[0].device_kind}; prompts of {args.prompt_tokens} tokens, {args.new_tokens} new, greedy")
    methods = [("mtp", k) for k in args.k if cfg.num_mtp_layers] + [("ngram", args.ngram_k)]
    rows = []
    for batch in args.batch_sizes:
        ids = corpus_prompts(tokenizer, batch, args.prompt_tokens)
        kw = dict(max_new_tokens=args.new_tokens, stop_ids=())
        plain, t_plain = best_time(lambda: generate(model, params, ids, **kw), args.repeats)
        rows.append({"batch": batch, "method": "plain", "k": 0, "tokens_per_s": batch * args.new_tokens / t_plain,
                     "accept_length": 1.0, "speedup": 1.0, "same_tokens": True})
        for method, k in methods:
            res, t = best_time(lambda: generate_speculative(model, params, ids, speculative=method,
                                                            num_speculative_tokens=k, **kw), args.repeats)
            rows.append({"batch": batch, "method": method, "k": k, "tokens_per_s": batch * args.new_tokens / t,
                         "accept_length": float(np.mean(res.accept_length)), "speedup": t_plain / t,
                         "same_tokens": bool((res.tokens == plain).all())})
    print(f"{'batch':>5} {'method':>7} {'k':>2} {'tokens/s':>10} {'accept len':>10} {'speedup':>8} {'same':>5}")
    for r in rows:
        print(f"{r['batch']:>5} {r['method']:>7} {r['k']:>2} {r['tokens_per_s']:>10.1f} {r['accept_length']:>10.2f} "
              f"{r['speedup']:>7.2f}x {'yes' if r['same_tokens'] else 'NO':>5}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
