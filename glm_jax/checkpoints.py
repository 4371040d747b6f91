"""Loading a model and its tokenizer from any checkpoint directory glm_jax reads: a THUDM (`chatglm`) or
transformers (`glm`, `glm4`, `glm4_moe`, ...) checkpoint (`glm_jax.load_hf`) or a `python train.py` run directory
(its latest orbax checkpoint, LoRA merged). The chat CLI, the server, the pruning CLI, the knowledge base's
embedder and the benchmarks all load through here."""

from __future__ import annotations

from pathlib import Path

import yaml

from glm_jax.convert import load_hf
from glm_jax.tokenizers import (CHATGLM6B_VOCABULARY, TOKENIZER_FILES, TOKENIZER_FILES_TEXT, SentencePieceTokenizer,
                                load_tokenizer)
from glm_jax.train.build import build_model_config, load_run
from glm_jax.train.config import load_config


def load_checkpoint(path: str | Path, **overrides):
    """(GLMConfig, params) from a checkpoint directory: THUDM / transformers (config.json) via `load_hf`, or a
    `python train.py` run directory (its orbax checkpoints) via `glm_jax.train.build.load_run`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if (path / "config.json").exists():
        return load_hf(path, **overrides)
    if path.is_dir() and _looks_like_orbax(path):
        return load_orbax_run(path, **overrides)
    raise ValueError(f"{path}: not a checkpoint directory (expected a config.json from a THUDM or transformers "
                     f"checkpoint, or an orbax training run)")


def _looks_like_orbax(path: Path) -> bool:
    """A `python train.py` run directory: its resolved config and orbax checkpoints."""
    return (path / "config.yaml").exists() and (path / "checkpoints").is_dir()


def load_orbax_run(path: Path, **overrides):
    """(GLMConfig, params) of the latest checkpoint of a `python train.py` run directory (LoRA merged, P-tuning
    prefix in place); `overrides` are GLMConfig fields (e.g. dtype)."""
    cfg, params = load_run(path)
    return cfg.replace(**overrides), params


def default_tokenizer(checkpoint: str | Path) -> Path | None:
    """Where a checkpoint's tokenizer is: the directory itself when it holds one of TOKENIZER_FILES;
    for a train.py run directory, its config's `data.tokenizer`, else its `model.init_from` directory's, else for a
    model with 2D positions the shipped ChatGLM-6B-style vocabulary (what train.py used); None: the tokenizer
    shipped with glm_jax."""
    path = Path(checkpoint)
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    if not (path / "config.yaml").is_file():
        return None
    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    if data.get("tokenizer"):
        return Path(data["tokenizer"])
    init = model.get("init_from")
    if init and any((Path(init) / f).is_file() for f in TOKENIZER_FILES):
        return Path(init)
    return CHATGLM6B_VOCABULARY if _run_has_2d_positions(path) else None


def _run_has_2d_positions(run_dir: Path) -> bool:
    """Whether a train.py run's model has 2D positions (ChatGLM-6B): train.py then used the shipped ChatGLM-6B-style
    vocabulary when the run named no tokenizer."""
    try:
        return build_model_config(load_config(run_dir / "config.yaml", check_paths=False)).position_encoding_2d
    except (OSError, ValueError, KeyError):
        return False


def tokenizer_or_shipped(source: str | Path | None):
    """The tokenizer at `source` (--tokenizer, else `default_tokenizer` of the checkpoint), else (None) the small
    SentencePiece model shipped with glm_jax: the chat CLI's and the server's choice. ValueError naming
    --tokenizer when it cannot be loaded."""
    if source is not None and not Path(source).exists():
        raise ValueError(f"--tokenizer: {source}: no such file")
    try:
        return SentencePieceTokenizer() if source is None else load_tokenizer(source)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"--tokenizer: {source}: cannot load the tokenizer ({e})") from None


def shipped_tokenizer_warning(checkpoint) -> str:
    """The one line said when the shipped tokenizer stands in for a checkpoint's own."""
    return (f"warning: {checkpoint} has no {TOKENIZER_FILES_TEXT}: using the small SentencePiece "
            f"tokenizer shipped with glm_jax (pass --tokenizer for the model's own)")
