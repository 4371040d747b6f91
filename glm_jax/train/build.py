"""Everything a training run is built from, in one place: the model config and task model, the optimizer and
compiled steps, the tokenizer and datasets, how batches are laid out over the mesh, which parameters train, and
the state to start from (fresh, `model.init_from`, or resumed). `set_up(cfg)` builds a `TrainRun` for
glm_jax/train/trainer.py; `build_model(cfg)` is the part `--compile-only` (glm_jax/train/plan.py) shares with it.

    cfg -> build_model (mesh, GLMConfig, model, parameter shardings, StepBuilder)
        -> load_datasets (tokenizer, train / eval arrays) -> BatchLayout, GrainLoader
        -> initial_state (random / init_from / checkpoint; LoRA factors, P-tuning prefix) -> TrainRun

docs/training-code.md shows what builds what.
"""

from __future__ import annotations

import json
import dataclasses
import functools
import logging
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn
from jax.sharding import Mesh
from tqdm import tqdm

from glm_jax import GLMConfig, GLMForCausalLM, GLMForSequenceClassification, load_hf, make_mesh, param_shardings, \
    param_specs
from glm_jax.convert.hf import abstract_params
from glm_jax.sharding import use_mesh
from glm_jax.tokenizers import CHATGLM6B_VOCABULARY, TOKENIZER_FILES, SentencePieceTokenizer, load_tokenizer
from glm_jax.train import blank_infilling as BI
from glm_jax.train import data as D
from glm_jax.train import lora as lora_lib
from glm_jax.train import pipeline as P
from glm_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from glm_jax.train.config import Config, ConfigError, check_model_fit, load_config, resolve_mesh, to_yaml
from glm_jax.train.optimizer import make_optimizer
from glm_jax.train.pipeline import GrainLoader
from glm_jax.train.rundir import export_params
from glm_jax.train.step import ACCURACY_TASKS, StepBuilder, batch_shardings, make_state, state_shardings

log = logging.getLogger("glm_jax.train")


def model_overrides(cfg: Config) -> dict:
    """GLMConfig fields the run sets on top of the preset / checkpoint config."""
    kw = dict(cfg.model.overrides)
    for f in ("dtype", "param_dtype", "remat_policy", "attention_impl"):
        if getattr(cfg.model, f) is not None:
            kw[f] = getattr(cfg.model, f)
    if cfg.train.mode == "ptuning":
        kw["pre_seq_len"] = cfg.ptuning.pre_seq_len
    return kw


def build_model_config(cfg: Config):
    m = cfg.model
    kw = model_overrides(cfg)
    try:
        if m.init_from:
            mc = GLMConfig.from_hf(m.init_from, **kw)
        else:
            mc = GLMConfig.from_preset(m.preset, **kw)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        key = "model.init_from" if m.init_from else ("model.overrides" if "GLMConfig:" in str(e) else "model.preset")
        raise ConfigError(f"{key}: {' '.join(str(e).split())}") from None
    return mc


def task_model(cfg: Config, model_cfg):
    """("lm" | "classification" | "embedding" | "cloze", the model data.task trains)."""
    if cfg.data.task == "classification":
        return "classification", GLMForSequenceClassification(model_cfg)
    return (cfg.data.task if cfg.data.task in ("embedding", "cloze") else "lm"), GLMForCausalLM(model_cfg)


def step_builder(cfg: Config, model, task: str):
    """The configured optimizer and train/eval steps (train.mode, z-loss, on_nan, loss_chunk)."""
    t = cfg.train
    if t.mtp_loss_weight and not (task == "lm" and model.cfg.num_mtp_layers):
        raise ConfigError(f"train.mtp_loss_weight: {t.mtp_loss_weight} needs a language model with MTP layers "
                          f"(model.overrides.num_mtp_layers, or a checkpoint with num_nextn_predict_layers); this "
                          f"one has {model.cfg.num_mtp_layers}")
    # a MoE router's correction bias is set by the step (load balancing), never by the optimizer; the MTP
    # layers, when no loss trains them, are kept for export unchanged (weight decay alone would shrink them)
    frozen = (("e_score_correction_bias",) if model.cfg.n_routed_experts else ()) + \
        (("mtp",) if model.cfg.num_mtp_layers and not t.mtp_loss_weight else ())
    tx, schedule = make_optimizer(t, frozen=frozen)
    lora = ({"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout}
            if t.mode == "lora" else None)
    d = cfg.distill
    teacher = None if d.teacher is None else teacher_model(cfg, model.cfg)
    distill = None if teacher is None else {
        "temperature": d.temperature, "alpha": d.alpha, "kl": d.kl, "top_k": d.top_k, "hidden_weight": d.hidden_weight,
        "hidden_channels": hidden_channels(cfg, teacher.cfg, model.cfg) if d.hidden_weight else None}
    return StepBuilder(model, tx, schedule, task, t.z_loss, t.on_nan, lora, ptuning=t.mode == "ptuning",
                       loss_chunk=t.loss_chunk, moe_bias_update_rate=t.moe_bias_update_rate,
                       moe_balance_loss=t.moe_balance_loss, mtp_loss_weight=t.mtp_loss_weight, teacher=teacher,
                       distill=distill, embedding=dataclasses.asdict(cfg.embedding) if task == "embedding" else None)


def teacher_model(cfg: Config, student_cfg: GLMConfig):
    """The distillation teacher's model (distill.teacher: a checkpoint or train.py run directory), in
    distill.teacher_dtype; ConfigError unless its vocabulary is the student's."""
    path = Path(cfg.distill.teacher)
    dtype = cfg.distill.teacher_dtype
    try:
        if (path / "config.json").is_file():
            tc = GLMConfig.from_hf(path, dtype=dtype, param_dtype=dtype)
        else:
            tc = build_model_config(load_config(path / "config.yaml", check_paths=False)).replace(
                dtype=dtype, param_dtype=dtype, remat_policy="none")
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"distill.teacher: {path}: {e.args[0] if e.args else e}") from None
    if tc.vocab_size != student_cfg.vocab_size:
        raise ConfigError(f"distill.teacher: its vocabulary ({tc.vocab_size}) is not the student's "
                          f"({student_cfg.vocab_size}); distillation compares their next-token distributions")
    if cfg.distill.top_k > tc.vocab_size:
        raise ConfigError(f"distill.top_k: {cfg.distill.top_k} is more than the vocabulary ({tc.vocab_size})")
    return GLMForCausalLM(tc.replace(num_mtp_layers=0) if tc.num_mtp_layers else tc)


def hidden_channels(cfg: Config, teacher_cfg: GLMConfig, student_cfg: GLMConfig) -> tuple[int, ...] | None:
    """The teacher's hidden channels the student's match for distill.hidden_weight: all (None) at equal widths,
    else those a width pruning kept (model.init_from's prune_report.json, glm_jax/compress)."""
    if teacher_cfg.hidden_size == student_cfg.hidden_size:
        return None
    report = Path(cfg.model.init_from or "") / "prune_report.json"
    width = json.loads(report.read_text())["plan"].get("width") if report.is_file() else None
    if width is None or len(width) != student_cfg.hidden_size or max(width) >= teacher_cfg.hidden_size:
        raise ConfigError(f"distill.hidden_weight: the teacher's hidden size ({teacher_cfg.hidden_size}) is not the "
                          f"student's ({student_cfg.hidden_size}) and model.init_from has no prune_report.json "
                          f"naming the teacher channels it kept")
    return tuple(width)


def load_teacher(cfg: Config, teacher, mesh):
    """(teacher parameters in distill.teacher_dtype placed over the mesh by the logical rules, their shardings)."""
    shardings = param_shardings(param_specs(teacher), mesh)
    path, dtype = Path(cfg.distill.teacher), jnp.dtype(cfg.distill.teacher_dtype)
    if (path / "config.json").is_file():
        # read straight into the teacher's dtype and placement
        _, params = load_hf(path, shardings=shardings, dtype=dtype.name, param_dtype=dtype.name, num_mtp_layers=0)
        return params, shardings
    _, params = load_run(path)  # a train.py run: its own dtypes, on one device; its MTP layers do not teach
    params = {k: ({n: v for n, v in params[k].items() if n != "mtp"} if k == "model" else params[k]) for k in shardings}
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=shardings)(params)
    return params, shardings


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What a run and `--compile-only` both build from the config before any data or parameter exists."""
    mesh: Mesh
    model_cfg: GLMConfig
    task: str  # "lm" | "classification" | "embedding" | "cloze"
    model: nn.Module
    boxed: dict  # the parameters' abstract tree with their logical axis names (param_specs)
    p_shard: dict  # the parameters' shardings over the mesh
    builder: StepBuilder  # optimizer, train and eval steps


def build_model(cfg: Config, devices=None) -> ModelParts:
    """Mesh (over `devices`, default all), model config (preset or init_from's config.json, plus overrides),
    the task's model, its parameter shardings and the step builder. ConfigError when they do not fit."""
    devices = jax.devices() if devices is None else devices
    sizes = resolve_mesh(cfg, len(devices))
    model_cfg = build_model_config(cfg)
    check_model_fit(cfg, model_cfg)
    mesh = make_mesh(**sizes, devices=devices)
    task, model = task_model(cfg, model_cfg)
    boxed = param_specs(model)
    return ModelParts(mesh=mesh, model_cfg=model_cfg, task=task, model=model, boxed=boxed,
                      p_shard=param_shardings(boxed, mesh), builder=step_builder(cfg, model, task))


def load_train_tokenizer(cfg: Config, model_cfg=None):
    """The tokenizer of a run (any GLM family, `glm_jax.load_tokenizer`): `data.tokenizer` (a tokenizer.model /
    tokenizer.json file or a checkpoint directory), else the tokenizer shipped in `model.init_from`'s directory,
    else the small SentencePiece model shipped with glm_jax (for a model with 2D positions, the ChatGLM-6B-style
    one). ConfigError when it cannot load or its vocabulary does not fit the model's (`model_cfg`: its
    vocab_size, and a 2D-position model's [MASK] / [gMASK] / <sop> ids) (docs/tokenizer.md, "SFT data formats")."""
    source = cfg.data.tokenizer
    init = Path(cfg.model.init_from) if cfg.model.init_from else None
    if source is None and init is not None and any((init / f).is_file() for f in TOKENIZER_FILES):
        source = init
    if source is None and model_cfg is not None and model_cfg.position_encoding_2d:
        source = CHATGLM6B_VOCABULARY
    try:
        tok = SentencePieceTokenizer() if source is None else load_tokenizer(source)
    except (OSError, RuntimeError, ValueError) as e:
        key = "data.tokenizer" if cfg.data.tokenizer is not None else "model.init_from"
        raise ConfigError(f"{key}: {source}: cannot load the tokenizer ({' '.join(str(e).split())[:200]})") from None
    if model_cfg is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"model.overrides.vocab_size: the model's vocab_size={model_cfg.vocab_size} is smaller "
                          f"than the tokenizer's {tok.vocab_size}")
    if model_cfg is not None and model_cfg.position_encoding_2d:
        check_2d_ids(model_cfg, tok)
    return tok


def check_2d_ids(model_cfg, tok) -> None:
    """A 2D-position model finds its context end and mask position by token id: they must be the tokenizer's."""
    have = tok.special_tokens
    for field, token in (("mask_token_id", "[MASK]"), ("gmask_token_id", "[gMASK]"), ("bos_token_id", "<sop>")):
        if have.get(token) != getattr(model_cfg, field):
            raise ConfigError(f"model.overrides.{field}: the model's {getattr(model_cfg, field)} is not the "
                              f"tokenizer's {token} ({have.get(token, 'absent')})")


def load_datasets(cfg: Config, model_cfg, tok) -> tuple[dict, dict | None, int]:
    """(train arrays, eval arrays or None, bad records skipped) of data.task, tokenized by `tok` (the run's
    `load_train_tokenizer`), read before anything compiles."""
    dc = cfg.data
    bad = D.BadRecords(skip=dc.skip_bad_records)
    corrupt = corruptor(cfg, tok) if dc.objective == "blank_infilling" else None
    words = label_words(cfg, tok) if dc.task == "cloze" else None

    def build(files, split: int):  # text / JSONL / Parquet files or saved HF datasets, read through Grain
        files = P.expand_sources(files)
        if corrupt is not None:  # the corruption's seed: (train.seed, 0) for train, (train.seed, 1) for eval
            return P.build_blank_infilling(files, tok, corrupt, [cfg.train.seed, split], dc.text_split, bad,
                                           dc.text_key, dc.max_tokens)
        if dc.task == "pretrain":
            return P.build_pretrain(files, tok, dc.seq_len, dc.text_split, bad, dc.text_key, dc.max_tokens)
        if dc.task == "sft":
            return P.build_sft(files, tok, dc.seq_len, bad)[0]
        if dc.task == "embedding":
            return P.build_embedding(files, tok, dc.seq_len, cfg.embedding.negatives, bad)
        if dc.task == "cloze":
            return P.build_cloze(files, tok, dc.seq_len, cfg.cloze.pattern, words, bad)
        return P.build_classification(files, tok, dc.seq_len, model_cfg.num_labels, bad)

    if dc.prepared:
        train = D.open_prepared(dc.prepared, "train", dc.seq_len, model_cfg.vocab_size)
        evals = D.open_prepared(dc.prepared, "eval", dc.seq_len, model_cfg.vocab_size)
        if train is None:
            raise D.DataError(f"{Path(dc.prepared) / D.PREPARED_META}: no train split")
    else:
        train = build(dc.train_files, 0)
        evals = build(dc.eval_files, 1) if dc.eval_files else None
    if evals is None and dc.eval_fraction > 0:
        train, evals = D.split_holdout(train, dc.eval_fraction)
    if D.num_examples(train) == 0:
        raise D.DataError(f"{dc.train_files[0]}:0: no training examples")
    return train, evals, bad.count


def corruptor(cfg: Config, tok) -> BI.Corruptor:
    """The blank-infilling corruption of the blank_infilling section, with the tokenizer's special ids and
    sentence ends."""
    b = cfg.blank_infilling
    try:
        special = BI.SpecialIds.of(tok)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    return BI.Corruptor(special, cfg.data.seq_len, BI.sentence_end_ids(tok),
                        {"token": b.token, "sentence": b.sentence, "document": b.document}, b.mask_ratio,
                        b.mean_span, b.document_min_ratio, b.copies)


def label_words(cfg: Config, tok) -> list[list[int]]:
    """The token ids of cloze.verbalizer's words; ConfigError naming a word that does not tokenize apart."""
    try:
        return BI.verbalizer_ids(tok, cfg.cloze.verbalizer)
    except ValueError as e:
        raise ConfigError(f"cloze.verbalizer: {e}") from None


def process_slices(sharding, shape) -> tuple[slice, ...]:
    """The bounding box, per dimension, of this process's shards of a global array of `shape`."""
    idx = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
    out = []
    for d in range(len(shape)):
        starts = [(i[d].start or 0) if i[d] is not None else 0 for i in idx]
        stops = [(i[d].stop if i[d].stop is not None else shape[d]) if i[d] is not None else shape[d] for i in idx]
        out.append(slice(min(starts), max(stops)))
    return tuple(out)


class BatchLayout:
    """Global batch shapes and shardings over the mesh, and this process's part of them."""

    def __init__(self, mesh, example: dict, lead: tuple[int, ...], microbatched: bool):
        self.shapes = {k: lead + v.shape[1:] for k, v in example.items()}
        self.shardings = batch_shardings(mesh, {k: np.zeros(s, np.int8) for k, s in self.shapes.items()},
                                         microbatched=microbatched)
        self.slices = {k: process_slices(self.shardings[k], self.shapes[k]) for k in self.shapes}
        self.batch_dim = 1 if microbatched else 0

    @property
    def rows(self) -> tuple[int, int]:
        s = next(iter(self.slices.values()))[self.batch_dim]  # every array has the same rows
        return s.start, s.stop

    def to_global(self, local: dict) -> dict:
        """Global arrays from this process's rows (other dims cut to its shards, e.g. a sequence axis)."""
        out = {}
        for k, v in local.items():
            sl = list(self.slices[k])
            sl[self.batch_dim] = slice(None)  # the loader already produced only this process's rows
            out[k] = jax.make_array_from_process_local_data(self.shardings[k], np.ascontiguousarray(v[tuple(sl)]),
                                                            self.shapes[k])
        return out


def without_prefix(params):
    """The parameter tree (or a tree like it) without the P-tuning prefix: what P-tuning keeps frozen."""
    return {**params, "model": {k: v for k, v in params["model"].items() if k != "prefix"}}


def trainable_layout(cfg: Config, boxed, p_shard, mesh):
    """(abstract trained parameters, their shardings, abstract frozen parameters, their shardings) for
    train.mode: full trains everything (nothing frozen), lora trains replicated A/B factors over the frozen
    base, ptuning trains the prefix only."""

    abstract = nn.unbox(boxed)
    if cfg.train.mode == "lora":
        shapes = lora_lib.lora_shapes(abstract, cfg.lora.targets, cfg.lora.rank)
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return shapes, jax.tree.map(lambda _: repl, shapes), abstract, p_shard
    if cfg.train.mode == "ptuning":
        return ({"prefix": abstract["model"]["prefix"]}, {"prefix": p_shard["model"]["prefix"]},
                without_prefix(abstract), without_prefix(p_shard))
    return abstract, p_shard, {}, {}


def random_params(model, shardings, seed: int, keep=None):
    """Random parameters of `model` (key `seed`), placed by `shardings`; with `keep` (a list of key paths) only
    those subtrees, so that XLA computes nothing else. The values do not depend on the shardings."""
    def pick(tree):
        out = {}
        for path in keep:
            src, dst = tree, out
            for k in path[:-1]:
                src, dst = src[k], dst.setdefault(k, {})
            dst[path[-1]] = src[path[-1]]
        return out

    def f(key):
        p = nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
        return p if keep is None else pick(p)

    shard = shardings if keep is None else pick(shardings)
    return jax.jit(f, out_shardings=shard)(jax.random.key(seed))


def load_pretrained(cfg, model_cfg, p_shard, init_params):
    """Parameters from model.init_from (load_hf), heads the checkpoint lacks initialised randomly."""

    mesh = next(iter(jax.tree.leaves(p_shard))).mesh
    # model_cfg carries the run's overrides (dtypes, remat, pre_seq_len: a base checkpoint has no prefix yet)
    kw = {f: getattr(model_cfg, f) for f in model_overrides(cfg)}
    try:
        _, loaded = load_hf(cfg.model.init_from, shardings=param_shardings(abstract_params(model_cfg), mesh), **kw)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as e:  # a damaged or incomplete checkpoint
        raise ConfigError(f"model.init_from: {e.args[0] if e.args else e}") from None
    params = {k: loaded[k] for k in p_shard if k in loaded}
    missing = [(k,) for k in p_shard if k not in params]
    if "prefix" in p_shard.get("model", {}) and "prefix" not in params.get("model", {}):
        missing.append(("model", "prefix"))
    if missing:
        log.warning("%s has no %s: initialising randomly", cfg.model.init_from, ["/".join(m) for m in missing])
        fresh = init_params(keep=missing)
        for path in missing:
            if path == ("model", "prefix"):
                params["model"] = {**params["model"], "prefix": fresh["model"]["prefix"]}
            else:
                params[path[0]] = fresh[path[0]]
    return params


def initial_state(cfg: Config, parts: ModelParts, ckpt: Checkpointer, loader: GrainLoader):
    """(state, frozen, state shardings, frozen shardings): restored from the newest good checkpoint, else
    fresh (random or model.init_from, plus LoRA factors / the P-tuning prefix)."""
    t = cfg.train
    model_cfg, model, boxed, p_shard, mesh = parts.model_cfg, parts.model, parts.boxed, parts.p_shard, parts.mesh
    tx = parts.builder.tx
    init_params = functools.partial(random_params, model, p_shard, t.seed)
    resume = ckpt.latest_step() is not None
    base = None
    if not resume or t.mode != "full":
        base = load_pretrained(cfg, model_cfg, p_shard, init_params) if cfg.model.init_from else init_params()
    abstract_trainable, train_shard, _, frozen_shard = trainable_layout(cfg, boxed, p_shard, mesh)
    if t.mode == "lora":
        frozen = base
        init_trainable = lambda: jax.jit(  # noqa: E731
            lambda b: lora_lib.init_lora(jax.random.key(t.seed + 1), b, cfg.lora.targets, cfg.lora.rank),
            out_shardings=train_shard)(base)
    elif t.mode == "ptuning":
        frozen = None if base is None else without_prefix(base)
        init_trainable = lambda: {"prefix": base["model"]["prefix"]}  # noqa: E731
    else:
        frozen, init_trainable = {}, lambda: base  # noqa: E731
    if parts.builder.teacher is not None:  # frozen beside the student's frozen part, never in the checkpoint
        teacher, teacher_shard = load_teacher(cfg, parts.builder.teacher, mesh)
        frozen, frozen_shard = {**(frozen or {}), "teacher": teacher}, {**frozen_shard, "teacher": teacher_shard}
    abstract_state = jax.eval_shape(lambda p: make_state(p, tx, t.seed), abstract_trainable)
    s_shard = state_shardings(abstract_state, train_shard, tx, mesh)
    if resume:
        step, state, loader_state = ckpt.restore_latest_good(abstract_with_shardings(abstract_state, s_shard))
        loader.restore(loader_state)
        if jax.process_index() == 0:
            print(f"resumed from {ckpt.dir / str(step)} (step {step}, data position {loader.position})", flush=True)
    else:
        state = jax.jit(lambda p: make_state(p, tx, t.seed), out_shardings=s_shard)(init_trainable())
    n_train = sum(x.size for x in jax.tree.leaves(abstract_trainable))
    if jax.process_index() == 0 and t.mode == "lora":
        print(f"LoRA: rank {cfg.lora.rank}, targets {cfg.lora.targets}: {n_train / 1e6:.3f}M trainable parameters")
    if jax.process_index() == 0 and t.mode == "ptuning":
        print(f"P-tuning v2: {cfg.ptuning.pre_seq_len} prefix slots per layer: {n_train / 1e6:.3f}M trainable "
              f"parameters (base frozen)")
    return state, frozen, s_shard, frozen_shard


class TrainRun:
    """The pieces of one run. Built by `set_up`; read by the Trainer and its hooks."""

    def __init__(self, *, cfg: Config, model_cfg, task: str, model, builder, mesh, train_layout, eval_layout, loader,
                 eval_sets, ckpt, state, frozen, train_step, eval_step, tokenizer):
        self.cfg, self.model_cfg, self.task, self.model, self.builder = cfg, model_cfg, task, model, builder
        self.tokenizer = tokenizer
        self.mesh, self.train_layout, self.eval_layout = mesh, train_layout, eval_layout
        self.loader, self.eval_sets, self.ckpt = loader, eval_sets, ckpt
        self.state, self.frozen, self.train_step, self.eval_step = state, frozen, train_step, eval_step
        self.primary = jax.process_index() == 0
        self.run_dir = Path(cfg.run_dir)
        self.start = int(jax.device_get(state["step"]))
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = model_cfg.flops_per_token(cfg.data.seq_len)
        self.writer = None  # MetricsWriter, opened once the metrics file is truncated to the resumed step
        self.bar = None

    def say(self, msg: str) -> None:
        if self.primary:
            print(msg, flush=True)

    def next_batch(self) -> dict:
        return self.train_layout.to_global(next(self.loader))

    @functools.cached_property
    def learning_rates(self) -> np.ndarray:
        """The schedule at steps 0 .. train.steps, computed once: evaluating the optax schedule eagerly each step
        would queue its ops behind the step in flight and make the host wait for it before dispatching the next."""
        return np.asarray(jax.jit(jax.vmap(self.builder.schedule))(np.arange(self.cfg.train.steps + 1)), np.float32)

    def hyper(self, step: int) -> dict:
        """Host-side step inputs (no recompilation when they change)."""
        return {"lr": self.learning_rates[min(step, self.cfg.train.steps)],
                "skip_nonfinite": np.bool_(self.cfg.train.on_nan == "skip")}

    def evaluate(self, state) -> dict:
        sums = None
        for eb in self.eval_sets:
            out = jax.device_get(self.eval_step(state, self.frozen, self.eval_layout.to_global(eb)))
            sums = out if sums is None else {k: sums[k] + out[k] for k in out}
        loss = float(sums["loss_sum"] / max(sums["count"], 1.0))
        res = {"eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 50.0)))}
        if "kl_sum" in sums:  # distillation: the KL to the teacher on the eval data
            res["eval_kl"] = float(sums["kl_sum"] / max(sums["count"], 1.0))
        if "hidden_sum" in sums:
            res["eval_hidden_mse"] = float(sums["hidden_sum"] / max(sums["count"], 1.0))
        if self.task in ACCURACY_TASKS:
            res["eval_accuracy"] = float(sums["correct"] / max(sums["count"], 1.0))
        if "mtp_count" in sums:
            res["eval_mtp_loss"] = float(sums["mtp_loss_sum"] / max(sums["mtp_count"], 1.0))
            res["eval_mtp_accuracy"] = float(sums["mtp_hits"] / max(sums["mtp_count"], 1.0))
        return res

    def open_progress(self) -> None:
        if self.primary and self.start < self.cfg.train.steps:
            self.bar = tqdm(total=self.cfg.train.steps, initial=self.start, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout, mininterval=1.0)

    def progress(self, record: dict) -> None:
        if self.bar is None:
            return
        tps = record.get("tokens_per_s")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:.0f}" if tps else "-",
                             **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}),
                             **({"load_cv": f"{record['moe/load_cv']:.2f}"} if "moe/load_cv" in record else {}))

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def export(self, step: int, state) -> None:
        export_params(self.cfg, self.model_cfg, self.builder.effective_params(state["params"], self.frozen),
                      self.primary, step, self.tokenizer)

    def close(self) -> None:
        self.close_progress()
        self.ckpt.close()
        self.loader.close()


def print_banner(cfg: Config, model_cfg, task: str, model, mesh, train, evals, bad_count: int) -> None:
    n_params = model_cfg.num_params()
    if task == "classification":
        n_params += model_cfg.hidden_size * (model_cfg.num_labels - model_cfg.vocab_size)
    dc = cfg.data
    kinds = sorted({d.device_kind for d in jax.devices()})
    print(f"devices: {jax.device_count()} x {', '.join(kinds)} ({jax.process_count()} process(es), "
          f"backend {jax.default_backend()})")
    print(f"mesh: {dict(mesh.shape)}")
    print(f"model: {model_cfg.name or model.__class__.__name__} ({type(model).__name__}), "
          f"{n_params / 1e6:.2f}M parameters, {model_cfg.flops_per_token(dc.seq_len) / 1e6:.1f} MFLOPs/token "
          f"(train, seq_len {dc.seq_len})")
    print(f"data: task {dc.task}, {D.num_examples(train)} train examples"
          f"{f', {D.num_examples(evals)} eval' if evals is not None else ''}, "
          f"{cfg.train.global_batch_size * dc.seq_len} tokens/step, bad records skipped: {bad_count}", flush=True)


def set_up(cfg: Config) -> TrainRun:
    """Builds the model, reads the data, lays batches out over the mesh, and makes the state to start from and
    the compiled steps."""
    t, c = cfg.train, cfg.checkpoint
    parts = build_model(cfg)
    mesh, model_cfg, builder = parts.mesh, parts.model_cfg, parts.builder
    if jax.process_index() == 0:
        print("resolved config:\n" + to_yaml(cfg), flush=True)
    tokenizer = load_train_tokenizer(cfg, model_cfg)
    train, evals, bad_count = load_datasets(cfg, model_cfg, tokenizer)  # host side, before anything compiles
    micro = t.global_batch_size // t.grad_accum
    example = {k: v[:1] for k, v in train.items()}
    train_layout = BatchLayout(mesh, example, (t.grad_accum, micro), microbatched=True)
    eval_layout = BatchLayout(mesh, example, (micro,), microbatched=False)
    loader = GrainLoader(train, global_batch=t.global_batch_size, grad_accum=t.grad_accum, seed=t.seed, rows=train_layout.rows,
                         workers=cfg.data.workers, prefetch=cfg.data.prefetch)
    eval_sets = (D.eval_batches(evals, micro, t.eval_batches, eval_layout.rows)
                 if evals is not None and D.num_examples(evals) else [])
    if jax.process_index() == 0:
        print_banner(cfg, model_cfg, parts.task, parts.model, mesh, train, evals, bad_count)

    with use_mesh(mesh):
        ckpt = Checkpointer(cfg.run_dir, keep=c.keep, async_save=c.async_save, keep_best=c.keep_best,
                            enabled=c.enabled)
        state, frozen, s_shard, frozen_shard = initial_state(cfg, parts, ckpt, loader)
        train_step = builder.jit_train(s_shard, frozen_shard, train_layout.shardings)
        eval_step = builder.jit_eval(s_shard, frozen_shard, eval_layout.shardings) if eval_sets else None
    return TrainRun(cfg=cfg, model_cfg=model_cfg, task=parts.task, model=parts.model, builder=builder, mesh=mesh,
                    train_layout=train_layout, eval_layout=eval_layout, loader=loader, eval_sets=eval_sets,
                    ckpt=ckpt, state=state, frozen=frozen, train_step=train_step, eval_step=eval_step,
                    tokenizer=tokenizer)


def load_run(run_dir: str | Path, step: int | None = None):
    """(GLMConfig, params) of a training run's checkpoint, ready for inference on one device: the trained
    parameters of a full run, or the base (model.init_from, else the run's seed initialisation) with the LoRA
    factors merged in or the P-tuning prefix put in place."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: not a training run directory (no resolved config)")
    cfg = load_config(run_dir / "config.yaml", check_paths=False)
    model_cfg = build_model_config(cfg)
    ckpt_dir = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoints in this run")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{ckpt_dir / str(step)}: no such checkpoint (have {steps})")
    trained = ocp.StandardCheckpointer().restore((ckpt_dir / str(step) / "state").absolute())["params"]
    trained = jax.tree.map(jnp.asarray, trained)
    if cfg.train.mode == "full":
        return model_cfg, trained
    _, model = task_model(cfg, model_cfg)
    mesh = make_mesh(devices=jax.devices()[:1])
    p_shard = param_shardings(param_specs(model), mesh)
    init_params = functools.partial(random_params, model, p_shard, cfg.train.seed)
    base = load_pretrained(cfg, model_cfg, p_shard, init_params) if cfg.model.init_from else init_params()
    if cfg.train.mode == "lora":
        return model_cfg, lora_lib.merge(base, trained, cfg.lora.alpha, cfg.lora.rank)
    return model_cfg, {**base, "model": {**base["model"], "prefix": trained["prefix"]}}

