"""The training run behind `python train.py --config configs/X.yaml [key=value ...]`.

Exit codes: 0 = finished, or stopped by SIGTERM/SIGINT after saving a checkpoint (re-run the same command to
resume); 2 = bad configuration or data (one line on stderr naming the key / file:line), a run directory owned
by another live process, or no checkpoint of the run restores; 3 = the loss, the gradient norm or the updated
state was NaN/Inf with train.on_nan=stop, or train.max_skips steps in a row were with on_nan=skip (the last
good checkpoint is kept, nothing newer is saved); 4 = --compile-only: the compiled step does not fit in the
device's memory; 5 = the run directory cannot be written (disk full, read-only, permissions).

A rerun of the same command resumes from the newest checkpoint that restores and verifies, and finishes an
interrupted end of run (final eval, final record, export). docs/training.md, "Faults", lists every fault.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from pathlib import Path

from glm_jax.train.config import Config, ConfigError, check_model_fit, load_config, resolve_mesh, to_yaml

log = logging.getLogger("glm_jax.train")

EXIT_OK, EXIT_CONFIG, EXIT_NAN, EXIT_NO_FIT, EXIT_IO = 0, 2, 3, 4, 5
# Errors that mean the run directory cannot be written, whatever layer (orbax, tensorstore) reports them.
IO_MARKERS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


# ---------------------------------------------------------------------------------------------- setup

def maybe_init_distributed(cfg: Config) -> bool:
    """jax.distributed.initialize() when the config or the environment asks for several processes.

    Env: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (explicit), a multi-worker Cloud TPU slice
    (TPU_WORKER_HOSTNAMES with several hosts) or SLURM with several tasks (auto-detected by jax).
    """
    import jax

    d, env = cfg.distributed, os.environ
    address = d.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    nproc = d.num_processes if d.num_processes is not None else (int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None)
    pid = d.process_id if d.process_id is not None else (int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None)
    enabled = d.enabled
    if enabled is None:
        enabled = bool(address) or (nproc or 1) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", "") \
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1
    if not enabled:
        return False
    jax.distributed.initialize(coordinator_address=address, num_processes=nproc, process_id=pid)
    return True


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
    from glm_jax import GLMConfig

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
    """("lm" | "classification", the model data.task trains)."""
    from glm_jax import GLMForCausalLM, GLMForSequenceClassification

    if cfg.data.task == "classification":
        return "classification", GLMForSequenceClassification(model_cfg)
    return "lm", GLMForCausalLM(model_cfg)


def step_builder(cfg: Config, model, task: str):
    """The configured optimizer and train/eval steps (train.mode, z-loss, on_nan, loss_chunk)."""
    from glm_jax.train.optimizer import make_optimizer
    from glm_jax.train.step import StepBuilder

    t = cfg.train
    # a MoE router's correction bias is set by the step (load balancing), never by the optimizer; the MTP
    # layers are kept for export but no loss trains them (weight decay alone would shrink them)
    frozen = (("e_score_correction_bias",) if model.cfg.n_routed_experts else ()) + \
        (("mtp",) if model.cfg.num_mtp_layers else ())
    tx, schedule = make_optimizer(t, frozen=frozen)
    lora = ({"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout}
            if t.mode == "lora" else None)
    return StepBuilder(model, tx, schedule, task, t.z_loss, t.on_nan, lora, ptuning=t.mode == "ptuning",
                       loss_chunk=t.loss_chunk, moe_bias_update_rate=t.moe_bias_update_rate,
                       moe_balance_loss=t.moe_balance_loss)


class _Stop:
    """SIGTERM / SIGINT: finish the current step, save, exit 0. A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then exiting", self.requested)

    def uninstall(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------- run

def run(cfg: Config, early_signals: list | None = None) -> int:
    """Trains according to `cfg`; returns the process exit code. Raises ConfigError / DataError on bad input.

    Signals are caught from the start (a SIGTERM during start-up or compilation exits cleanly at the first
    chance); process 0 holds the run directory's lock until it returns."""
    from glm_jax.train.checkpoint import CheckpointError
    from glm_jax.train.rundir import RunDirBusy, RunLock, check_export_path, check_resume_config

    def not_an_io_traceback(record: logging.LogRecord) -> bool:  # orbax's background threads log each failed
        exc = record.exc_info[1] if record.exc_info else None  # write with a traceback; one line below says it
        return not (exc is not None and (isinstance(exc, OSError) or any(m in str(exc) for m in IO_MARKERS)))

    absl_log = logging.getLogger("absl")
    absl_log.addFilter(not_an_io_traceback)
    stop = _Stop()
    stop.install()
    if early_signals:  # caught by train.py before this handler was installed
        stop.requested = early_signals[0]
    lock = None
    try:
        maybe_init_distributed(cfg)
        import jax

        if jax.process_index() == 0:
            if cfg.export.path:  # before anything is trained or written: the export must not replace a thing
                check_export_path(cfg)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            lock = RunLock(cfg.run_dir)
            lock.acquire()
        check_resume_config(cfg, cfg.run_dir)
        return _train(cfg, stop)
    except (RunDirBusy, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Exception as e:
        if not (isinstance(e, OSError) or any(m in str(e) for m in IO_MARKERS)):
            raise
        where = getattr(e, "filename", None) or cfg.run_dir
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:300]
        print(f"error: cannot write {where}: {why} (the last complete checkpoint is kept)", file=sys.stderr,
              flush=True)
        return EXIT_IO
    finally:
        stop.uninstall()
        absl_log.removeFilter(not_an_io_traceback)
        if lock is not None:
            lock.release()


def _train(cfg: Config, stop: "_Stop") -> int:
    """Set-up, the run directory's bookkeeping, then the step loop with the default hooks."""
    from glm_jax.sharding import use_mesh
    from glm_jax.train.metrics import MetricsWriter, truncate_metrics
    from glm_jax.train.rundir import has_export, read_complete, write_config
    from glm_jax.train.trainer import Trainer, add_default_hooks

    trainer = Trainer.from_config(cfg, stop)
    run, steps = trainer.run, cfg.train.steps
    if run.primary:  # the state fits this config: from now on config.yaml describes the checkpoints
        write_config(run.run_dir, to_yaml(cfg))
    if run.start >= steps:
        done = read_complete(run.run_dir)
        exported = not cfg.export.path or has_export(cfg.export.path)  # a lost or new export is written again
        if done is not None and done.get("step") == run.start and exported:
            run.say(f"already trained: checkpoint at step {run.start} >= train.steps={steps}; nothing to do")
            run.close()
            return EXIT_OK
        why = "the run's end did not complete" if exported or done is None else f"{cfg.export.path} holds no export"
        run.say(f"checkpoint at step {run.start} >= train.steps={steps}, but {why}: finishing it (final eval, "
                f"final record, export)")
    if run.primary:  # what was logged after the resumed step is logged again: each step exactly once
        dropped = truncate_metrics(run.run_dir / "metrics.jsonl", run.start)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} record(s) after step {run.start}, which is resumed from")
    if stop.requested:
        run.say(f"stopped by {stop.requested} before the first step; nothing new to save")
        run.close()
        return EXIT_OK
    run.writer = MetricsWriter(run.run_dir, active=run.primary)
    run.open_progress()
    add_default_hooks(trainer)
    try:
        with use_mesh(run.mesh):
            return trainer.train()
    finally:
        run.loader.close()  # Grain worker processes, if any


def without_prefix(params):
    """The parameter tree (or a tree like it) without the P-tuning prefix: what P-tuning keeps frozen."""
    return {**params, "model": {k: v for k, v in params["model"].items() if k != "prefix"}}


def trainable_layout(cfg: Config, boxed, p_shard, mesh):
    """(abstract trained parameters, their shardings, abstract frozen parameters, their shardings) for
    train.mode: full trains everything (nothing frozen), lora trains replicated A/B factors over the frozen
    base, ptuning trains the prefix only."""
    import jax
    from flax import linen as nn

    from glm_jax.train import lora as lora_lib

    abstract = nn.unbox(boxed)
    if cfg.train.mode == "lora":
        shapes = lora_lib.lora_shapes(abstract, cfg.lora.targets, cfg.lora.rank)
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return shapes, jax.tree.map(lambda _: repl, shapes), abstract, p_shard
    if cfg.train.mode == "ptuning":
        return ({"prefix": abstract["model"]["prefix"]}, {"prefix": p_shard["model"]["prefix"]},
                without_prefix(abstract), without_prefix(p_shard))
    return abstract, p_shard, {}, {}


def plan(cfg: Config, topology: str | None = None) -> int:
    """`train.py --compile-only`: compiles the configured train step for abstract inputs on this machine's
    devices or, with `topology`, on a Cloud TPU slice described by libtpu, and prints XLA's memory plan per
    device. Reads no data and no checkpoint (model.init_from: its config.json only). Returns 0, or EXIT_NO_FIT
    when the plan exceeds the device's memory."""
    import jax
    import numpy as np

    from glm_jax import make_mesh, param_shardings, param_specs
    from glm_jax.sharding import use_mesh
    from glm_jax.train import data as D
    from glm_jax.train import plan as P
    from glm_jax.train.step import batch_shardings, make_state, state_shardings

    devices = P.topology_devices(topology) if topology else jax.devices()
    sizes = resolve_mesh(cfg, len(devices))
    model_cfg = build_model_config(cfg)
    check_model_fit(cfg, model_cfg)
    t, dc = cfg.train, cfg.data
    mesh = make_mesh(**sizes, devices=devices)
    task, model = task_model(cfg, model_cfg)
    boxed = param_specs(model)
    p_shard = param_shardings(boxed, mesh)
    builder = step_builder(cfg, model, task)
    tx = builder.tx
    trainable, train_shard, frozen, frozen_shard = trainable_layout(cfg, boxed, p_shard, mesh)
    abstract_state = jax.eval_shape(lambda p: make_state(p, tx, t.seed), trainable)
    s_shard = state_shardings(abstract_state, train_shard, tx, mesh)
    micro = t.global_batch_size // t.grad_accum
    spec = D.example_spec(dc.task, dc.seq_len)
    shapes = {k: (t.grad_accum, micro) + sh for k, (sh, _) in spec.items()}
    b_shard = batch_shardings(mesh, {k: np.zeros(s, np.int8) for k, s in shapes.items()}, microbatched=True)
    batch = {k: jax.ShapeDtypeStruct(shapes[k], np.dtype(spec[k][1]), sharding=b_shard[k]) for k in shapes}
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    hyper = {"lr": jax.ShapeDtypeStruct((), np.float32, sharding=repl),
             "skip_nonfinite": jax.ShapeDtypeStruct((), np.bool_, sharding=repl)}
    kind = mesh.devices.flat[0].device_kind
    print(f"model: {model_cfg.name or type(model).__name__}, {model_cfg.num_params() / 1e9:.2f}B parameters, "
          f"{model_cfg.num_layers} layers, remat {model_cfg.remat_policy}, attention {model_cfg.attention_impl}; "
          f"mode {t.mode}; batch {t.global_batch_size} x {dc.seq_len} in {t.grad_accum} microbatch(es); "
          f"mesh {dict(mesh.shape)} over {mesh.devices.size} x {kind}", flush=True)
    with use_mesh(mesh):
        try:
            result = P.compile_plan(builder.jit_train(s_shard, frozen_shard, b_shard), P.abstract(
                abstract_state, s_shard), P.abstract(frozen, frozen_shard), batch, hyper)
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a plan over HBM instead of returning it
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            return EXIT_NO_FIT
    flops = model_cfg.flops_per_token(dc.seq_len) * t.global_batch_size * dc.seq_len / mesh.devices.size
    print(P.format_plan(result, kind, mesh.devices.size, flops, model_cfg.scan_unroll >= model_cfg.num_layers))
    ok = P.fits(result, kind)
    if ok is False:
        print(f"error: the step needs {result['peak_gib']:.1f} GiB per device, more than the "
              f"{P.device_memory(kind) / P.GiB:.1f} GiB of a {kind}", file=sys.stderr, flush=True)
        return EXIT_NO_FIT
    return EXIT_OK


def prepare_data(cfg: Config, out_dir: str | Path) -> int:
    """`train.py --prepare-data DIR`: tokenizes and packs data.train_files (and data.eval_files) once into DIR
    for `data.prepared: DIR`. DIR is written beside itself and swapped in complete (atomic_dir), so a bad input
    file leaves an earlier DIR as it was; only a new, empty or prepared directory is replaced. Returns 0."""
    from glm_jax.train import pipeline as P
    from glm_jax.train.atomic_dir import Protected, check_destination, write_atomically
    from glm_jax.train.data import PREPARED_META
    from glm_jax.train.setup import load_train_tokenizer

    dc = cfg.data
    if dc.task != "pretrain":
        raise ConfigError(f"data.task: --prepare-data packs pretraining text, not {dc.task} data")
    if not dc.train_files:
        raise ConfigError("data.train_files: nothing to prepare")
    sources = {split: P.expand_sources(files) for split, files in (("train", dc.train_files),
                                                                    ("eval", dc.eval_files)) if files}
    inputs = [Protected(f"a {split} file", Path(p)) for split, paths in sources.items() for p in paths]
    if dc.tokenizer:
        inputs.append(Protected("the tokenizer (data.tokenizer)", Path(dc.tokenizer)))
    check_destination(out_dir, "--prepare-data", protected=inputs, ours=lambda d: None if (
        d / PREPARED_META).is_file() else f"holds no {PREPARED_META} (it is not a prepared data directory)")
    tok = load_train_tokenizer(cfg)  # the run's tokenizer, any family: the rows must be its ids
    write_atomically(lambda tmp: _pack_splits(cfg, tok, sources, tmp, shown=Path(out_dir)), out_dir)
    print(f"train with: data.prepared={out_dir}", flush=True)
    return EXIT_OK


def _pack_splits(cfg: Config, tok, sources: dict, out: Path, shown: Path) -> None:
    """Each split's packed rows into `out`, then meta.json (its presence marks a complete directory)."""
    import json

    from glm_jax.train import data as D
    from glm_jax.train import pipeline as P

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


def random_params(model, shardings, seed: int, keep=None):
    """Random parameters of `model` (key `seed`), placed by `shardings`; with `keep` (a list of key paths) only
    those subtrees, so that XLA computes nothing else. The values do not depend on the shardings."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

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
    import jax

    from glm_jax import load_hf
    from glm_jax.convert.hf import abstract_params
    from glm_jax.sharding import param_shardings

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


def load_run(run_dir: str | Path, step: int | None = None):
    """(GLMConfig, params) of a training run's checkpoint, ready for inference on one device: the trained
    parameters of a full run, or the base (model.init_from, else the run's seed initialisation) with the LoRA
    factors merged in or the P-tuning prefix put in place."""
    import jax
    import orbax.checkpoint as ocp

    from glm_jax import make_mesh, param_shardings, param_specs
    from glm_jax.train import lora as lora_lib

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
    trained = jax.tree.map(jax.numpy.asarray, trained)
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


def export_params(cfg, model_cfg, params, primary, step: int):
    """export.path <- params in export.format with this run's marker, written beside it and swapped in whole
    (rundir.write_export: an export never replaces what it did not write)."""
    import jax
    from jax.experimental import multihost_utils

    from glm_jax import save_hf
    from glm_jax.train.rundir import write_export

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if primary:
        out = write_export(lambda tmp: save_hf(model_cfg, params, tmp, format=cfg.export.format), cfg, step)
        print(f"exported {cfg.export.format} checkpoint to {out}", flush=True)
