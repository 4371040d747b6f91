"""Training configuration: YAML file + dotted command-line overrides, checked against a dataclass schema.

    cfg = load_config("configs/tiny.yaml", ["train.steps=30", "mesh.fsdp=4"])

Override values are parsed as YAML scalars (``train.lr=3e-4`` is a float, ``data.train_files=[a.txt,b.txt]`` a
list). Every problem - unknown key, wrong type, impossible combination - raises `ConfigError` whose message is
one line starting with the offending key; `train.py` prints it and exits with status 2 before touching jax.
Every float must be finite (`.nan` / `.inf` are errors); `train.lr` must be at most `MAX_LR`; `train.seed` is in
[0, 2**31 - 1]; `data.max_tokens` is positive or null (no limit). `load_config` also checks the two paths a run
needs before it starts: `data.tokenizer` must be an existing tokenizer file or a directory holding one, and
`run_dir` a non-empty path that is not an existing file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from glm_jax.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, GLMConfig
from glm_jax.tokenizers import TOKENIZER_FILES, TOKENIZER_FILES_TEXT

MAX_LR = 10.0  # a learning rate above this is a typo (1e39, 3e4 for 3e-4), not a setting
MAX_SEED = 2**31 - 1  # jax.random.key keeps only the low 32 bits of larger seeds (2**32 would be seed 0)


class ConfigError(ValueError):
    """A bad configuration; str(e) is one line naming the key."""


@dataclasses.dataclass
class ModelSection:
    preset: str = "glm-tiny"  # a glm_jax.PRESETS name; ignored when init_from is set
    init_from: Optional[str] = None  # a THUDM / transformers checkpoint directory (load_hf)
    overrides: dict = dataclasses.field(default_factory=dict)  # GLMConfig fields, e.g. {num_layers: 2}
    dtype: Optional[str] = None  # compute dtype (float32 | bfloat16 | float16); None = the preset's
    param_dtype: Optional[str] = None  # master-weight dtype; float32 gives fp32 master weights
    remat_policy: Optional[str] = None  # none | full | save_dots | save_dots_no_batch
    attention_impl: Optional[str] = None  # auto | xla | cudnn | splash


@dataclasses.dataclass
class DataSection:
    # pretrain | sft | classification | embedding (query / positive pairs: docs/knowledge.md) | cloze (classification
    # as GLM's blank filling, the cloze section: docs/glm-objective.md)
    task: str = "pretrain"
    # pretrain: causal (next token) | blank_infilling (GLM's objective, for a model with 2D positions such as
    # ChatGLM-6B; the blank_infilling section; docs/glm-objective.md)
    objective: str = "causal"
    train_files: list = dataclasses.field(default_factory=list)  # files or glob patterns
    eval_files: list = dataclasses.field(default_factory=list)
    eval_fraction: float = 0.0  # without eval_files: hold out this fraction of the packed rows / records
    seq_len: int = 128
    text_split: str = "paragraph"  # .txt documents: paragraph (blank-line separated) | line | file
    text_key: str = "text"  # JSONL pretraining: the field holding the text
    max_tokens: Optional[int] = None  # pretraining: stop reading documents after this many tokens (null: no limit)
    skip_bad_records: bool = False
    # tokenizer.model (SentencePiece / tiktoken) or tokenizer.json file, or a checkpoint directory holding one (must
    # exist); None = model.init_from's tokenizer, else the SentencePiece model shipped with glm_jax (docs/tokenizer.md;
    # for a model with 2D positions, the shipped ChatGLM-6B-style vocabulary glm_jax/assets/chatglm6b)
    tokenizer: Optional[str] = None
    # pretrain: a directory written by `train.py --prepare-data DIR` (rows packed once, memory-mapped; each
    # process reads only its rows); train_files / eval_files are then not read
    prepared: Optional[str] = None
    # the loader (glm_jax/train/pipeline.py, Grain): 0 = batches read in the training process; N > 0 = read by N
    # Grain worker processes (spawned). The batches, and so the run, are the same for every value.
    workers: int = 0
    prefetch: int = 0  # batches read ahead (a thread with workers=0, per worker otherwise); 0 = on demand


@dataclasses.dataclass
class TrainSection:
    steps: int = 100
    global_batch_size: int = 8  # rows per optimizer step, over all hosts and microbatches
    grad_accum: int = 1  # microbatches per step (scanned inside the one jitted step)
    seed: int = 0
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0
    z_loss: float = 0.0
    loss_chunk: int = 0  # >0: cross-entropy over the vocabulary this many positions at a time (must divide seq_len)
    on_nan: str = "stop"  # stop (exit 3, last good checkpoint kept) | skip (drop the update, count it)
    max_skips: int = 10  # on_nan=skip: this many non-finite steps in a row stop the run (exit 3)
    mode: str = "full"  # full | lora | ptuning (P-tuning v2: only the per-layer prefix K/V are trained)
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 4
    # MoE models (docs/training.md, "MoE models"). train.mode=full: auxiliary-loss-free balancing (DeepSeek-V3 /
    # GLM-4.5): after each step every router's e_score_correction_bias += rate * sign(mean load - load of the
    # expert); 0 = off. moe_balance_loss: weight of DeepSeek-V3's sequence-wise balance loss; 0 = off.
    moe_bias_update_rate: float = 1e-3
    moe_balance_loss: float = 0.0
    # MTP layers (docs/mtp.md): weight of their next-next-token loss; 0 = they are not trained (kept as loaded).
    # GLM-4.5 trained its MTP layer with 0.3 (NVIDIA Megatron-Bridge's GLM 4.5 page: "MTP with 1 layer, 0.3
    # scaling factor"), the value configs/moe-tiny.yaml uses.
    mtp_loss_weight: float = 0.0


@dataclasses.dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = dataclasses.field(default_factory=lambda: ["query", "key", "value", "out"])


@dataclasses.dataclass
class PtuningSection:
    pre_seq_len: int = 16  # prefix key/value slots per layer (docs/architecture.md, "P-tuning v2 prefix")


@dataclasses.dataclass
class MeshSection:
    data: int = 1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1  # one of data/fsdp may be -1: all devices the others leave
    # expert parallelism (MoE): routed experts split over it, tokens exchanged by all-to-all; every other layer
    # treats it as one more FSDP-like data-parallel axis (its devices take their own rows). docs/moe.md
    expert: int = 1


@dataclasses.dataclass
class CheckpointSection:
    enabled: bool = True
    every: int = 50
    keep: int = 3
    keep_best: bool = False  # also keep the checkpoint with the lowest eval loss in {run_dir}/checkpoints_best
    async_save: bool = True


@dataclasses.dataclass
class DistributedSection:
    enabled: Optional[bool] = None  # None: initialise when the env (JAX_COORDINATOR_ADDRESS, TPU pod, SLURM) says so
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass
class ExportSection:
    path: Optional[str] = None  # save_hf directory written at the end of the run
    format: str = "transformers"  # transformers | thudm


@dataclasses.dataclass
class DistillSection:
    # Knowledge distillation (docs/training.md, "Distillation"): set `teacher` to train the model (full or LoRA) on
    # alpha * T^2 KL(teacher || student at temperature T) + (1 - alpha) * the data loss, the teacher frozen in the
    # same step. A checkpoint directory glm_jax loads (THUDM, transformers) or a train.py run directory.
    teacher: Optional[str] = None
    temperature: float = 1.0
    alpha: float = 0.5  # the weight of the KL term; 1: distillation only
    kl: str = "forward"  # forward: KL(teacher || student), mass-covering; reverse: KL(student || teacher)
    teacher_dtype: str = "bfloat16"  # the teacher's parameters and activations (no optimizer state for it)
    top_k: int = 0  # > 0: the KL over the teacher's k most likely tokens (renormalised); forward KL only
    # > 0: plus this weight x the mean squared difference of the final hidden states; a width-pruned student
    # (model.init_from holding glm-compress's prune_report.json) is matched to the teacher channels it kept
    hidden_weight: float = 0.0


@dataclasses.dataclass
class EmbeddingSection:
    # data.task: embedding (docs/knowledge.md, "Training an embedder"): InfoNCE over {"query", "positive",
    # "negatives"} records, every other passage of the microbatch a negative too
    temperature: float = 0.05  # the softmax temperature of the cosine similarities
    pooling: str = "last"  # of the final hidden states, as glm_jax.embed
    negatives: int = 0  # hard negatives per record (its first `negatives` of "negatives"; fewer: a bad record)


@dataclasses.dataclass
class BlankInfillingSection:
    # data.objective: blank_infilling (docs/glm-objective.md). The mix of corruption kinds, drawn per text piece:
    # THUDM/GLM's pretraining scripts (config/ds_block_10B.sh): --bert-prob 0.4, --gap-sentence-prob 0.3, the
    # rest document-level generation; GLM-130B (its paper, section 2.1): token 0.3, sentence 0, document 0.7
    token: float = 0.4  # [MASK] spans of Poisson(mean_span) lengths until mask_ratio of the tokens
    sentence: float = 0.3  # [sMASK] whole sentences until mask_ratio of the tokens
    document: float = 0.3  # [gMASK] one span at the end, document_min_ratio .. 100% of the text
    mask_ratio: float = 0.15
    mean_span: float = 3.0
    document_min_ratio: float = 0.5
    copies: int = 1  # differently corrupted copies of every document (new spans, as another epoch would draw)


@dataclasses.dataclass
class ClozeSection:
    # data.task: cloze (docs/glm-objective.md, "Classification as cloze"): {"text", "label"} records as GLM
    # fine-tuned for SuperGLUE, the label a word filling the [MASK] of `pattern`, scored by its log-probability
    pattern: str = "{text} [MASK]"  # "{text}" once and "[MASK]" once
    verbalizer: list = dataclasses.field(default_factory=list)  # the word of label 0, 1, ...


@dataclasses.dataclass
class Config:
    run_dir: str = "runs/tiny"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    ptuning: PtuningSection = dataclasses.field(default_factory=PtuningSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    export: ExportSection = dataclasses.field(default_factory=ExportSection)
    distill: DistillSection = dataclasses.field(default_factory=DistillSection)
    embedding: EmbeddingSection = dataclasses.field(default_factory=EmbeddingSection)
    blank_infilling: BlankInfillingSection = dataclasses.field(default_factory=BlankInfillingSection)
    cloze: ClozeSection = dataclasses.field(default_factory=ClozeSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.task": ("pretrain", "sft", "classification", "embedding", "cloze"),
    "data.objective": ("causal", "blank_infilling"),
    "embedding.pooling": ("last", "mean"),
    "data.text_split": ("paragraph", "line", "file"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.on_nan": ("stop", "skip"),
    "train.mode": ("full", "lora", "ptuning"),
    "model.dtype": (*DTYPES, None),
    "model.param_dtype": (*DTYPES, None),
    "model.remat_policy": (*REMAT_POLICIES, None),
    "model.attention_impl": (*ATTENTION_IMPLS, None),
    "export.format": ("transformers", "thudm"),
    "distill.kl": ("forward", "reverse"),
    "distill.teacher_dtype": DTYPES,
}
LORA_TARGETS = ("query", "key", "value", "out", "wi", "wo", "experts_wi", "experts_wo",  # glm_jax/train/lora.py
                "q_a", "q_b", "kv_a", "kv_b",  # latent attention (MLA)
                "kda_q", "kda_k", "kda_v", "kda_o")  # Kimi delta attention (glm5_next)


# ---------------------------------------------------------------------------------------------- parsing

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` (no dot, which YAML 1.1 leaves a string) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """`value` checked against annotation `tp` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                raise ConfigError(f"{key}: {value} is too large") from None
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value}")
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, str):  # a single path is a one-element list
            return [value]
        if isinstance(value, list):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known in {prefix.rstrip('.') or 'the top level'}: "
                              f"{', '.join(sorted(names))})")
    kw = {k: _coerce(prefix + k, v, hints[k]) for k, v in raw.items()}
    return cls(**kw)


def _parse_scalar(text: str) -> Any:
    try:
        return _yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like key=value (e.g. train.steps=30)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"{item}: bad override key")
    node = raw
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a section, cannot set {key}")
        node = nxt
    node[parts[-1]] = _parse_scalar(text)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_paths: bool = True) -> Config:
    """YAML file (None = defaults only) + overrides -> validated `Config` (static checks only).

    check_paths=False skips the file-system checks (`validate_paths`), e.g. to read the config.yaml of a run
    whose tokenizer file is not on this machine."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config: {p} is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            raw = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {p} is not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {p} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    cfg = _build(Config, raw)
    validate_static(cfg)
    if check_paths:
        validate_paths(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- checks

def validate_static(cfg: Config) -> None:
    """Checks that need no devices and no model."""
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v not in allowed:
            raise ConfigError(f"{key}: {v!r} is not one of {[a for a in allowed if a is not None]}")
    _check_sizes(cfg)
    _check_optimizer(cfg.train)
    _check_data(cfg)
    _check_adapters(cfg)
    _check_distill(cfg)
    _check_embedding(cfg)
    _check_blank_infilling(cfg)
    _check_cloze(cfg)
    _check_mesh(cfg)
    if cfg.model.overrides:
        fields = {f.name for f in dataclasses.fields(GLMConfig)}
        own = {f.name for f in dataclasses.fields(ModelSection)}  # dtype, param_dtype, remat_policy, ...
        for k in cfg.model.overrides:
            if k not in fields:
                raise ConfigError(f"model.overrides.{k}: not a GLMConfig field")
            if k in own:
                raise ConfigError(f"model.overrides.{k}: set model.{k} instead (one place for each setting)")


def _check_sizes(cfg: Config) -> None:
    t, d = cfg.train, cfg.data
    positive = {"train.steps": t.steps, "train.global_batch_size": t.global_batch_size, "train.grad_accum": t.grad_accum,
                "data.seq_len": d.seq_len, "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
                "train.log_every": t.log_every, "train.eval_batches": t.eval_batches, "lora.rank": cfg.lora.rank,
                "ptuning.pre_seq_len": cfg.ptuning.pre_seq_len}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k}: must be positive, got {v}")
    for k, v in {"train.warmup_steps": t.warmup_steps, "train.eval_every": t.eval_every, "train.z_loss": t.z_loss,
                 "train.weight_decay": t.weight_decay, "train.lr": t.lr, "train.max_skips": t.max_skips,
                 "train.moe_bias_update_rate": t.moe_bias_update_rate,
                 "train.moe_balance_loss": t.moe_balance_loss, "train.mtp_loss_weight": t.mtp_loss_weight}.items():
        if v < 0:
            raise ConfigError(f"{k}: must be >= 0, got {v}")
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}")


def _check_optimizer(t: TrainSection) -> None:
    if t.lr > MAX_LR:
        raise ConfigError(f"train.lr: {t.lr} is not a plausible learning rate (must be at most {MAX_LR:g})")
    if not 0 <= t.seed <= MAX_SEED:
        raise ConfigError(f"train.seed: must be in [0, {MAX_SEED}], got {t.seed}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    for k, v in {"train.b1": t.b1, "train.b2": t.b2}.items():
        if not 0 <= v < 1:
            raise ConfigError(f"{k}: must be in [0, 1), got {v}")
    if t.lr * t.weight_decay >= 1:
        raise ConfigError(f"train.weight_decay: {t.weight_decay} with train.lr={t.lr} decays every weight past zero "
                          f"in one step (lr * weight_decay must be below 1)")
    if t.eps <= 0:
        raise ConfigError(f"train.eps: must be positive, got {t.eps}")
    if t.clip_norm is not None and t.clip_norm <= 0:
        raise ConfigError(f"train.clip_norm: must be positive or null, got {t.clip_norm}")


def _check_data(cfg: Config) -> None:
    t, d = cfg.train, cfg.data
    for k, v in {"data.workers": d.workers, "data.prefetch": d.prefetch}.items():
        if not 0 <= v <= 256:
            raise ConfigError(f"{k}: must be in [0, 256], got {v}")
    if d.max_tokens is not None and d.max_tokens <= 0:
        raise ConfigError(f"data.max_tokens: must be positive or null (no limit), got {d.max_tokens}")
    if t.loss_chunk < 0 or (t.loss_chunk and d.seq_len % t.loss_chunk):
        raise ConfigError(f"train.loss_chunk: must be 0 or divide data.seq_len={d.seq_len}, got {t.loss_chunk}")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    if d.prepared is not None and d.task != "pretrain":
        raise ConfigError(f"data.prepared: prepared (packed) data is for task pretrain, not {d.task}")
    if not d.train_files and d.prepared is None:
        raise ConfigError("data.train_files: no training files given")


def _check_adapters(cfg: Config) -> None:
    if cfg.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be positive, got {cfg.lora.alpha}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    bad_targets = [x for x in cfg.lora.targets if x not in LORA_TARGETS]
    if bad_targets:
        raise ConfigError(f"lora.targets: unknown target(s) {bad_targets}, expected some of {list(LORA_TARGETS)}")


def _check_distill(cfg: Config) -> None:
    k = cfg.distill
    if k.teacher is None:
        return
    if not 0 <= k.alpha <= 1:
        raise ConfigError(f"distill.alpha: must be in [0, 1], got {k.alpha}")
    if not k.temperature > 0:
        raise ConfigError(f"distill.temperature: must be positive, got {k.temperature}")
    if k.top_k < 0 or (k.top_k and k.kl != "forward"):
        raise ConfigError(f"distill.top_k: {k.top_k} must be >= 0, and > 0 only with distill.kl: forward")
    if k.hidden_weight < 0:
        raise ConfigError(f"distill.hidden_weight: must be >= 0, got {k.hidden_weight}")
    if cfg.data.task in ("classification", "embedding", "cloze"):
        raise ConfigError("distill.teacher: distillation matches next-token distributions (data.task pretrain or "
                          f"sft), not data.task {cfg.data.task}")
    if cfg.train.mode == "ptuning" or cfg.train.loss_chunk or cfg.train.mtp_loss_weight:
        key = ("train.mode" if cfg.train.mode == "ptuning" else
               "train.loss_chunk" if cfg.train.loss_chunk else "train.mtp_loss_weight")
        raise ConfigError(f"{key}: not with distill.teacher yet (distillation runs full or LoRA training on whole "
                          f"logits)")


def _check_embedding(cfg: Config) -> None:
    e = cfg.embedding
    if not e.temperature > 0:
        raise ConfigError(f"embedding.temperature: must be positive, got {e.temperature}")
    if e.negatives < 0:
        raise ConfigError(f"embedding.negatives: must be >= 0, got {e.negatives}")
    if cfg.data.task != "embedding":
        return
    t = cfg.train
    _refuse({"train.mode": t.mode == "ptuning", "train.loss_chunk": t.loss_chunk,
             "train.mtp_loss_weight": t.mtp_loss_weight, "data.prepared": cfg.data.prepared},
            "data.task embedding (full or LoRA training on query / passage pairs read from train_files)")


def _refuse(settings: dict, what: str) -> None:
    """ConfigError naming the first of `settings` (key -> set or not) that is set: it does not go with `what`."""
    for key, bad in settings.items():
        if bad:
            raise ConfigError(f"{key}: not with {what}")


def _check_blank_infilling(cfg: Config) -> None:
    b = cfg.blank_infilling
    for key in ("token", "sentence", "document"):
        if getattr(b, key) < 0:
            raise ConfigError(f"blank_infilling.{key}: a weight of the mix, must be >= 0, got {getattr(b, key)}")
    if b.token + b.sentence + b.document <= 0:
        raise ConfigError("blank_infilling.token: the mix (token, sentence, document) has no positive weight")
    for key in ("mask_ratio", "document_min_ratio"):
        if not 0 < getattr(b, key) < 1:
            raise ConfigError(f"blank_infilling.{key}: must be in (0, 1), got {getattr(b, key)}")
    if not b.mean_span > 0:
        raise ConfigError(f"blank_infilling.mean_span: must be positive, got {b.mean_span}")
    if b.copies < 1:
        raise ConfigError(f"blank_infilling.copies: must be >= 1, got {b.copies}")
    if cfg.data.objective != "blank_infilling":
        return
    _refuse({"data.task": cfg.data.task != "pretrain", "data.prepared": cfg.data.prepared,
             "distill.teacher": cfg.distill.teacher, "train.mtp_loss_weight": cfg.train.mtp_loss_weight},
            "data.objective blank_infilling (pretraining text read from train_files, corrupted when the run starts)")
    if cfg.data.seq_len < 8:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is too short for blank infilling (at least 8)")


def _check_cloze(cfg: Config) -> None:
    if cfg.data.task != "cloze":
        return
    c = cfg.cloze
    if c.pattern.count("{text}") != 1 or c.pattern.count("[MASK]") != 1:
        raise ConfigError(f"cloze.pattern: {c.pattern!r} must hold {{text}} once and [MASK] once")
    if len(c.verbalizer) < 2 or not all(isinstance(w, str) and w.strip() for w in c.verbalizer):
        raise ConfigError(f"cloze.verbalizer: give a word per label (at least two), got {c.verbalizer!r}")
    _refuse({"data.prepared": cfg.data.prepared, "train.mtp_loss_weight": cfg.train.mtp_loss_weight,
             "train.loss_chunk": cfg.train.loss_chunk}, "data.task cloze (label words scored on {text, label} records)")


def _check_mesh(cfg: Config) -> None:
    m, d = cfg.mesh, cfg.data
    sizes = {"mesh.data": m.data, "mesh.fsdp": m.fsdp, "mesh.sequence": m.sequence, "mesh.tensor": m.tensor}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"{k}: must be a positive size or -1, got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("mesh.data: only one mesh axis may be -1")
    if m.sequence == -1 or m.tensor == -1:
        raise ConfigError(f"mesh.{'sequence' if m.sequence == -1 else 'tensor'}: -1 is only allowed for data or fsdp")
    if d.seq_len % m.sequence:
        raise ConfigError(f"data.seq_len: {d.seq_len} is not divisible by mesh.sequence={m.sequence}")
    if m.expert < 1:
        raise ConfigError(f"mesh.expert: must be a positive size, got {m.expert}")
    if m.data > 0 and m.fsdp > 0:
        _check_batch(cfg, m.data * m.fsdp)
        _check_batch(cfg, m.data * m.fsdp * m.expert, "mesh.data*mesh.fsdp*mesh.expert")


def validate_paths(cfg: Config) -> None:
    """File-system checks that need no devices: the tokenizer exists, run_dir can be a directory."""
    tok = cfg.data.tokenizer
    if tok is not None:
        if not str(tok).strip():
            raise ConfigError("data.tokenizer: empty path (null for the tokenizer shipped with glm_jax)")
        p = Path(tok)
        if not p.exists():
            raise ConfigError(f"data.tokenizer: file not found: {p}")
        if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"data.tokenizer: {p} has no {TOKENIZER_FILES_TEXT} (expected a tokenizer file or a "
                              f"checkpoint directory)")
        if not p.is_file() and not p.is_dir():
            raise ConfigError(f"data.tokenizer: {p} is not a file or a directory")
    teacher = cfg.distill.teacher
    if teacher is not None:
        p = Path(teacher)
        if not (p / "config.json").is_file() and not (p / "config.yaml").is_file():
            raise ConfigError(f"distill.teacher: {p} is not a checkpoint directory (no config.json) or a train.py run "
                              f"directory (no config.yaml)")
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir: empty path (the run directory would be the current directory)")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
    for parent in run_dir.absolute().parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"run_dir: {run_dir} cannot be created: {parent} is not a directory")
            break


def _check_batch(cfg: Config, batch_shards: int, axes: str = "mesh.data*mesh.fsdp") -> None:
    t = cfg.train
    micro = t.global_batch_size // t.grad_accum
    if micro % batch_shards:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} rows / {t.grad_accum} microbatches = "
                          f"{micro} is not divisible by {axes}={batch_shards}")


def resolve_mesh(cfg: Config, device_count: int) -> dict[str, int]:
    """Mesh axis sizes with -1 resolved; ConfigError if they need more devices than exist."""
    m = cfg.mesh
    sizes = {"data": m.data, "fsdp": m.fsdp, "sequence": m.sequence, "tensor": m.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1) * m.expert
    # the key named is the set axes above 1: the ones to change (an axis at 1 or -1 is not the culprit)
    set_axes = {f"mesh.{k}": v for k, v in {**sizes, "expert": m.expert}.items() if v > 1}
    culprits = ", ".join(f"{k}={v}" for k, v in set_axes.items())
    for k, v in sizes.items():
        if v == -1:
            if device_count % fixed:
                raise ConfigError(f"{', '.join(set_axes)}: {culprits} (product {fixed}) does not divide the "
                                  f"{device_count} devices that mesh.{k}=-1 would fill")
            sizes[k] = device_count // fixed
    total = math.prod(sizes.values()) * m.expert
    if total > device_count:
        raise ConfigError(f"{', '.join(set_axes)}: mesh data={sizes['data']} fsdp={sizes['fsdp']} sequence="
                          f"{sizes['sequence']} tensor={sizes['tensor']} expert={m.expert} needs {total} devices, "
                          f"only {device_count} available")
    _check_batch(cfg, sizes["data"] * sizes["fsdp"])
    _check_batch(cfg, sizes["data"] * sizes["fsdp"] * m.expert, "mesh.data*mesh.fsdp*mesh.expert")
    return {**sizes, "expert": m.expert} if m.expert != 1 else sizes  # make_mesh's default expert is 1


def check_model_fit(cfg: Config, model_cfg) -> None:
    """Checks that need the model config (GLMConfig)."""
    if not model_cfg.scan_layers:
        raise ConfigError("model.overrides.scan_layers: training uses the stacked layer layout; scan_layers=false "
                          "is an inference layout (load_hf(..., scan_layers=False))")
    experts = getattr(model_cfg, "n_routed_experts", 0)
    if cfg.mesh.expert > 1 and experts and experts % cfg.mesh.expert:
        raise ConfigError(f"mesh.expert: {cfg.mesh.expert} does not divide the model's {experts} routed experts")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    two_d = model_cfg.position_encoding_2d
    if cfg.data.objective == "blank_infilling" and not two_d:
        raise ConfigError("data.objective: blank_infilling needs a model with 2D positions (ChatGLM-6B: model.preset "
                          "chatglm-6b or chatglm-6b-tiny, or a ChatGLM-6B checkpoint)")
    if cfg.data.task == "cloze" and not two_d:
        raise ConfigError("data.task: cloze fills a [MASK] with a label word: it needs a model with 2D positions "
                          "(ChatGLM-6B: model.preset chatglm-6b or chatglm-6b-tiny, or a ChatGLM-6B checkpoint)")
    if two_d and cfg.data.task == "pretrain" and cfg.data.objective == "causal":
        # its context attends both ways: next-token targets would be visible to every position
        raise ConfigError("data.objective: causal pretraining of a model with 2D positions (ChatGLM-6B) would let "
                          "every token see the next one; use data.objective: blank_infilling")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
