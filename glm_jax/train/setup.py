"""Set-up of a training run: config -> data -> mesh -> model -> optimizer -> state (fresh or resumed).

`set_up(cfg)` returns a `TrainRun`: everything the step loop (glm_jax/train/trainer.py) touches, built once.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax
import numpy as np

from glm_jax.train.config import TOKENIZER_FILES, Config, ConfigError, check_model_fit, resolve_mesh, to_yaml




def load_train_tokenizer(cfg: Config, vocab_size: int | None = None):
    """The tokenizer of a run (any GLM family, `glm_jax.load_tokenizer`): `data.tokenizer` (a tokenizer.model /
    tokenizer.json file or a checkpoint directory), else the tokenizer shipped in `model.init_from`'s directory,
    else the small SentencePiece model shipped with glm_jax. ConfigError when it cannot load or its vocabulary
    does not fit the model's `vocab_size` (docs/tokenizer.md, "SFT data formats")."""
    from glm_jax.tokenizers import SentencePieceTokenizer, load_tokenizer

    source = cfg.data.tokenizer
    init = Path(cfg.model.init_from) if cfg.model.init_from else None
    if source is None and init is not None and any((init / f).is_file() for f in TOKENIZER_FILES):
        source = init
    try:
        tok = SentencePieceTokenizer() if source is None else load_tokenizer(source)
    except (OSError, RuntimeError, ValueError) as e:
        key = "data.tokenizer" if cfg.data.tokenizer is not None else "model.init_from"
        raise ConfigError(f"{key}: {source}: cannot load the tokenizer ({' '.join(str(e).split())[:200]})") from None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ConfigError(f"model.overrides.vocab_size: the model's vocab_size={vocab_size} is smaller "
                          f"than the tokenizer's {tok.vocab_size}")
    return tok


class TrainRun:
    """The pieces of one run. Built by `set_up`; read by the Trainer and its hooks."""

    def __init__(self, *, cfg: Config, model_cfg, task: str, model, builder, mesh, train_layout, eval_layout, loader,
                 eval_sets, ckpt, state, frozen, train_step, eval_step):
        self.cfg, self.model_cfg, self.task, self.model, self.builder = cfg, model_cfg, task, model, builder
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

    def hyper(self, step: int) -> dict:
        """Host-side step inputs (no recompilation when they change)."""
        return {"lr": np.float32(self.builder.schedule(step)), "skip_nonfinite": np.bool_(self.cfg.train.on_nan == "skip")}

    def evaluate(self, state) -> dict:
        sums = None
        for eb in self.eval_sets:
            out = jax.device_get(self.eval_step(state, self.frozen, self.eval_layout.to_global(eb)))
            sums = out if sums is None else {k: sums[k] + out[k] for k in out}
        loss = float(sums["loss_sum"] / max(sums["count"], 1.0))
        res = {"eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 50.0)))}
        if self.task == "classification":
            res["eval_accuracy"] = float(sums["correct"] / max(sums["count"], 1.0))
        return res

    def open_progress(self) -> None:
        if self.primary and self.start < self.cfg.train.steps:
            from tqdm import tqdm

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
        from glm_jax.train.loop import export_params

        export_params(self.cfg, self.model_cfg, self.builder.effective_params(state["params"], self.frozen),
                      self.primary, step)

    def close(self) -> None:
        self.close_progress()
        self.ckpt.close()
        self.loader.close()


def print_banner(cfg: Config, model_cfg, task: str, model, mesh, train, evals, bad_count: int) -> None:
    from glm_jax.train import data as D

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


def initial_state(cfg: Config, model_cfg, model, boxed, p_shard, mesh, tx, ckpt, loader):
    """(state, frozen, state shardings, frozen shardings): restored from the newest good checkpoint, else
    fresh (random or model.init_from, plus LoRA factors / the P-tuning prefix)."""
    from glm_jax.train import lora as lora_lib
    from glm_jax.train.checkpoint import abstract_with_shardings
    from glm_jax.train.loop import load_pretrained, random_params, trainable_layout, without_prefix
    from glm_jax.train.step import make_state, state_shardings

    t = cfg.train
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


def set_up(cfg: Config) -> TrainRun:
    """Reads the data, builds the mesh, model, optimizer and compiled steps, and the state to start from."""
    from glm_jax import make_mesh, param_shardings, param_specs
    from glm_jax.sharding import use_mesh
    from glm_jax.train import data as D
    from glm_jax.train.checkpoint import Checkpointer
    from glm_jax.train.loop import build_model_config, step_builder, task_model
    from glm_jax.train.pipeline import GrainLoader
    from glm_jax.train.trainer import BatchLayout, load_datasets

    sizes = resolve_mesh(cfg, jax.device_count())
    model_cfg = build_model_config(cfg)
    check_model_fit(cfg, model_cfg)
    t, c = cfg.train, cfg.checkpoint
    if jax.process_index() == 0:
        print("resolved config:\n" + to_yaml(cfg), flush=True)
    train, evals, bad_count = load_datasets(cfg, model_cfg)  # host side, before anything compiles

    mesh = make_mesh(**sizes)
    task, model = task_model(cfg, model_cfg)
    boxed = param_specs(model)
    p_shard = param_shardings(boxed, mesh)
    builder = step_builder(cfg, model, task)
    micro = t.global_batch_size // t.grad_accum
    example = {k: v[:1] for k, v in train.items()}
    train_layout = BatchLayout(mesh, example, (t.grad_accum, micro), microbatched=True)
    eval_layout = BatchLayout(mesh, example, (micro,), microbatched=False)
    loader = GrainLoader(train, t.global_batch_size, t.grad_accum, seed=t.seed, rows=train_layout.rows,
                         workers=cfg.data.workers, prefetch=cfg.data.prefetch)
    eval_sets = (D.eval_batches(evals, micro, t.eval_batches, eval_layout.rows)
                 if evals is not None and D.num_examples(evals) else [])
    if jax.process_index() == 0:
        print_banner(cfg, model_cfg, task, model, mesh, train, evals, bad_count)

    with use_mesh(mesh):
        ckpt = Checkpointer(cfg.run_dir, c.keep, c.async_save, c.keep_best, c.enabled)
        state, frozen, s_shard, frozen_shard = initial_state(cfg, model_cfg, model, boxed, p_shard, mesh,
                                                             builder.tx, ckpt, loader)
        train_step = builder.jit_train(s_shard, frozen_shard, train_layout.shardings)
        eval_step = builder.jit_eval(s_shard, frozen_shard, eval_layout.shardings) if eval_sets else None
    return TrainRun(cfg=cfg, model_cfg=model_cfg, task=task, model=model, builder=builder, mesh=mesh,
                    train_layout=train_layout, eval_layout=eval_layout, loader=loader, eval_sets=eval_sets,
                    ckpt=ckpt, state=state, frozen=frozen, train_step=train_step, eval_step=eval_step)
