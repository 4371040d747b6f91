"""python -m glm_jax.compress prune --checkpoint DIR --calibration FILE... --out DIR [...] (console: glm-compress).

Exit codes: 0 done; 2 bad arguments, data or destination (one line naming the flag, file or field); the
output directory is written whole or not at all, and never over anything already there (docs/compression.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from glm_jax import GLMForCausalLM
from glm_jax.checkpoints import default_tokenizer, load_checkpoint, tokenizer_or_shipped
from glm_jax.compress.prune import apply_plan, choose_units, collect_importance, sparsify
from glm_jax.convert.hf import detect_format, save_hf
from glm_jax.train.atomic_dir import Protected, check_destination, write_atomically
from glm_jax.tokenizers import TOKENIZER_FILES
from glm_jax.train.config import ConfigError
from glm_jax.train.data import BadRecords, DataError, iter_packed_rows, read_text_documents
from glm_jax.train.step import lm_token_losses


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.compress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="structured pruning by activation importance (or at random)")
    p.add_argument("--checkpoint", required=True, help="THUDM / transformers checkpoint or train.py run directory")
    p.add_argument("--calibration", required=True, nargs="+", help=".txt (paragraphs) or .jsonl ('text') files")
    p.add_argument("--out", required=True, help="the pruned checkpoint directory (same format as the input)")
    p.add_argument("--mlp-keep", type=float, help="fraction of each dense MLP's channels to keep")
    p.add_argument("--heads-keep", type=float,
                   help="fraction of KV groups (with their query heads; MLA: of heads) to keep in each block")
    p.add_argument("--width-keep", type=float, help="fraction of the hidden size (residual channels) to keep")
    p.add_argument("--layers-drop", default="0", help="how many blocks to drop, or a comma list of block indices")
    p.add_argument("--experts-keep", type=int, help="routed experts to keep in each MoE layer")
    p.add_argument("--expert-score", choices=("reap", "frequency"), default="reap")
    p.add_argument("--method", choices=("importance", "random"), default="importance")
    p.add_argument("--sparsity", help="then mask the block linears: a fraction (0.5: unstructured) or 2:4")
    p.add_argument("--sparsity-method", choices=("wanda", "magnitude"), default="wanda",
                   help="wanda: |W| x ||X|| per output (default); magnitude: |W|")
    p.add_argument("--text-split", choices=("paragraph", "line", "file"), default="paragraph",
                   help=".txt documents, as train.py's data.text_split")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=256, help="calibration rows of seq-len tokens")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out rows for the eval loss before / after")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the checkpoint's, else the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="the draw of --method random")
    return parser


def calibration_rows(files, tok, seq_len: int, count: int, text_split: str = "paragraph") -> np.ndarray:
    """[n, 2, seq_len] packed (tokens, segment_ids) rows from the files' documents, up to `count`."""
    def docs():
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise DataError(f"--calibration: {path}: no such file")
            for text in read_text_documents(path, text_split, BadRecords()):
                yield tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]

    rows = []
    for tokens, segments in iter_packed_rows(docs(), seq_len, tok.pad_token_id or 0):
        rows.append(np.stack([tokens, segments]))
        if len(rows) == count:
            break
    return np.asarray(rows, np.int32).reshape(-1, 2, seq_len)


@jax.jit
def _loss_sums(logits, tokens, segments):
    """(sum of next-token losses, count) over positions whose next token is in the same document."""
    nll, _ = lm_token_losses(logits[:, :-1], tokens[:, 1:], 0.0)
    valid = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens, segments):
    return model.apply({"params": params}, tokens, segment_ids=segments)


def eval_loss(model, params, rows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss within documents over `rows` [n, 2, seq] (one compiled program per model and shape)."""
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        tokens, segments = rows[b:b + batch_size, 0], rows[b:b + batch_size, 1]
        s, n = _loss_sums(_logits(model, params, tokens, segments), tokens, segments)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)


def _layers_drop(text: str) -> int | list[int]:
    try:
        return [int(i) for i in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise ConfigError(f"--layers-drop: {text!r} is not a count or a comma list of block indices") from None


def _check_flags(args, cfg) -> None:
    """The cheap checks, before any calibration runs: one line naming the flag."""
    for flag, value in (("--mlp-keep", args.mlp_keep), ("--heads-keep", args.heads_keep),
                        ("--width-keep", args.width_keep)):
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"{flag}: {value} is not a fraction in (0, 1]")
    drop = _layers_drop(args.layers_drop)
    count = drop if isinstance(drop, int) else len(set(drop))
    if count >= cfg.num_layers or (isinstance(drop, list) and not all(0 <= i < cfg.num_layers for i in drop)):
        raise ConfigError(f"--layers-drop: {args.layers_drop} leaves no layer of {cfg.num_layers}, or names a block "
                          f"outside 0..{cfg.num_layers - 1}")
    if args.experts_keep is not None and not (cfg.is_moe and 1 <= args.experts_keep <= cfg.n_routed_experts):
        raise ConfigError(f"--experts-keep: {args.experts_keep} for a model with {cfg.n_routed_experts} routed "
                          f"experts per layer")
    if args.width_keep is not None and cfg.num_mtp_layers:
        raise ConfigError("--width-keep: the model has MTP layers (their eh_proj concatenates two hidden states)")
    if cfg.quantization_bit:
        raise ConfigError("--checkpoint: a quantized checkpoint; prune the full-precision one, then quantize")
    if args.sparsity is not None and args.sparsity != "2:4":
        try:
            ok = 0 < float(args.sparsity) < 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--sparsity: {args.sparsity!r} is not a fraction in (0, 1) or 2:4")


def prune_command(args) -> dict:
    ckpt = Path(args.checkpoint)
    check_destination(args.out, "--out", ours=lambda p: "holds files", protected=[Protected("the checkpoint", ckpt, whole=True)])
    cfg, params = load_checkpoint(ckpt)
    _check_flags(args, cfg)
    fmt = detect_format(ckpt)[0] if (ckpt / "config.json").exists() else "transformers"
    tok = tokenizer_or_shipped(args.tokenizer or default_tokenizer(ckpt))
    rows = calibration_rows(args.calibration, tok, args.seq_len, args.samples + args.eval_samples, args.text_split)
    if len(rows) <= args.eval_samples:
        raise DataError(f"--calibration: {len(rows)} rows of {args.seq_len} tokens; need more than --eval-samples "
                        f"({args.eval_samples}) plus calibration rows")
    held_out, calib = rows[:args.eval_samples], rows[args.eval_samples:]
    model = GLMForCausalLM(cfg)
    batches = [(calib[b:b + args.batch_size, 0], calib[b:b + args.batch_size, 1])
               for b in range(0, len(calib) - args.batch_size + 1, args.batch_size)] or [(calib[:, 0], calib[:, 1])]
    scores = collect_importance(model, params, tqdm(batches, desc="importance", disable=None))
    plan = choose_units(cfg, scores, mlp_keep=args.mlp_keep, heads_keep=args.heads_keep,
                        layers_drop=_layers_drop(args.layers_drop), experts_keep=args.experts_keep,
                        width_keep=args.width_keep, expert_score=args.expert_score, method=args.method, seed=args.seed)
    new_cfg, new_params = apply_plan(cfg, params, plan)
    sparse = None
    if args.sparsity is not None:  # on the pruned model, with its own input statistics when units went
        sparse_scores = scores if new_cfg == cfg else collect_importance(GLMForCausalLM(new_cfg), new_params, batches)
        new_params, counts = sparsify(new_params, sparse_scores, args.sparsity, args.sparsity_method)
        sparse = {"pattern": args.sparsity, "method": args.sparsity_method, **counts}
    report = {"checkpoint": str(ckpt), "format": fmt, "method": args.method,
              "params_before": cfg.num_params(), "params_after": new_cfg.num_params(),
              "eval_loss_before": eval_loss(model, params, held_out, args.batch_size),
              "eval_loss_after": eval_loss(GLMForCausalLM(new_cfg), new_params, held_out, args.batch_size),
              "calibration_rows": len(calib), "eval_rows": len(held_out), "seq_len": args.seq_len,
              "plan": plan.to_json(), **({"sparsity": sparse} if sparse else {})}

    def write(tmp: Path) -> None:
        save_hf(new_cfg, new_params, tmp, format=fmt)
        source = Path(args.tokenizer) if args.tokenizer else default_tokenizer(ckpt)
        for name in TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            src = source / name if source is not None and source.is_dir() else None
            if src is not None and src.is_file():
                shutil.copy2(src, tmp / name)
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n")

    write_atomically(write, args.out)
    return report


def main(argv=None) -> int:
    args = _arg_parser().parse_args(argv)
    try:
        report = prune_command(args)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("params_before", "params_after", "eval_loss_before", "eval_loss_after")}
    print(json.dumps(summary))
    print(f"pruned checkpoint: {args.out} (report: {Path(args.out) / 'prune_report.json'})")
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
