"""`train.py --prepare-data DIR`: pretraining text tokenized and packed once into memory-mapped rows
(`data.prepared: DIR`), written beside DIR and swapped in complete (glm_jax/train/atomic_dir.py)."""

from __future__ import annotations

import json
from pathlib import Path

from glm_jax.train import data as D
from glm_jax.train import pipeline as P
from glm_jax.train.atomic_dir import Protected, check_destination, write_atomically
from glm_jax.train.build import load_train_tokenizer
from glm_jax.train.config import Config, ConfigError
from glm_jax.train.exit_codes import ExitCode


def prepare_data(cfg: Config, out_dir: str | Path) -> ExitCode:
    """`train.py --prepare-data DIR`: tokenizes and packs data.train_files (and data.eval_files) once into DIR
    for `data.prepared: DIR`. DIR is written beside itself and swapped in complete (atomic_dir), so a bad input
    file leaves an earlier DIR as it was; only a new, empty or prepared directory is replaced."""
    dc = cfg.data
    if dc.task != "pretrain":
        raise ConfigError(f"data.task: --prepare-data packs pretraining text, not {dc.task} data")
    if dc.objective != "causal":
        raise ConfigError(f"data.objective: --prepare-data packs next-token rows; {dc.objective} examples are "
                          f"corrupted when the run starts")
    if not dc.train_files:
        raise ConfigError("data.train_files: nothing to prepare")
    sources = {split: P.expand_sources(files) for split, files in (("train", dc.train_files),
                                                                    ("eval", dc.eval_files)) if files}
    inputs = [Protected(f"a {split} file", Path(p)) for split, paths in sources.items() for p in paths]
    if dc.tokenizer:
        inputs.append(Protected("the tokenizer (data.tokenizer)", Path(dc.tokenizer)))
    check_destination(out_dir, "--prepare-data", protected=inputs, ours=lambda d: None if (
        d / D.PREPARED_META).is_file() else f"holds no {D.PREPARED_META} (it is not a prepared data directory)")
    tok = load_train_tokenizer(cfg)  # the run's tokenizer, any family: the rows must be its ids
    write_atomically(lambda tmp: _pack_splits(cfg, tok, sources, tmp, shown=Path(out_dir)), out_dir)
    print(f"train with: data.prepared={out_dir}", flush=True)
    return ExitCode.OK


def _pack_splits(cfg: Config, tok, sources: dict, out: Path, shown: Path) -> None:
    """Each split's packed rows into `out`, then meta.json (its presence marks a complete directory)."""
    dc = cfg.data
    bad = D.BadRecords(skip=dc.skip_bad_records)
    meta = {"seq_len": dc.seq_len, "vocab_size": tok.vocab_size, "tokenizer": str(dc.tokenizer or cfg.model.init_from or "glm_jax"),
            "text_split": dc.text_split, "rows": {}, "tokens": {}, "files": {}}
    for split, paths in sources.items():
        docs = P.PretrainDocuments(paths, tok, dc.text_split, bad, dc.text_key, dc.max_tokens)
        meta["rows"][split] = D.prepare_pretrain(docs, dc.seq_len, tok.pad_token_id, out, split)
        meta["tokens"][split], meta["files"][split] = docs.tokens, [str(p) for p in paths]
        print(f"{split}: {docs.tokens} tokens from {len(paths)} files -> {meta['rows'][split]} rows of "
              f"{dc.seq_len} in {shown}", flush=True)
    meta["bad_records_skipped"] = bad.count
    (out / D.PREPARED_META).write_text(json.dumps(meta, indent=2))
