"""A training run, start to end: `run(cfg)` is what `python train.py --config configs/X.yaml [key=value ...]`
does. It only orchestrates: signals, the processes, the run directory's lock and bookkeeping (glm_jax/train/
rundir.py), then the step loop (glm_jax/train/trainer.py) over what glm_jax/train/build.py builds.

A rerun of the same command resumes from the newest checkpoint that restores and verifies, and finishes an
interrupted end of run (final eval, final record, export). Exit codes: glm_jax/train/exit_codes.py; every
fault: docs/training.md, "Faults".
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import jax

from glm_jax.sharding import use_mesh
from glm_jax.train.build import set_up
from glm_jax.train.checkpoint import CheckpointError
from glm_jax.train.config import Config, to_yaml
from glm_jax.train.exit_codes import ExitCode
from glm_jax.train.metrics import MetricsWriter, truncate_metrics
from glm_jax.train.rundir import (RunDirBusy, RunLock, check_export_path, check_resume_config, has_export,
                                  read_complete, write_config)
from glm_jax.train.trainer import Trainer, add_default_hooks

log = logging.getLogger("glm_jax.train")

# Errors that mean the run directory cannot be written, whatever layer (orbax, tensorstore) reports them.
IO_MARKERS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")


def maybe_init_distributed(cfg: Config) -> bool:
    """jax.distributed.initialize() when the config or the environment asks for several processes.

    Env: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (explicit), a multi-worker Cloud TPU slice
    (TPU_WORKER_HOSTNAMES with several hosts) or SLURM with several tasks (auto-detected by jax).
    """
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


def run(cfg: Config, early_signals: list | None = None) -> ExitCode:
    """Trains according to `cfg`; returns the process exit code. Raises ConfigError / DataError on bad input.

    Signals are caught from the start (a SIGTERM during start-up or compilation exits cleanly at the first
    chance); process 0 holds the run directory's lock until it returns."""
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
        return ExitCode.CONFIG
    except Exception as e:
        if not (isinstance(e, OSError) or any(m in str(e) for m in IO_MARKERS)):
            raise
        where = getattr(e, "filename", None) or cfg.run_dir
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:300]
        print(f"error: cannot write {where}: {why} (the last complete checkpoint is kept)", file=sys.stderr,
              flush=True)
        return ExitCode.IO
    finally:
        stop.uninstall()
        absl_log.removeFilter(not_an_io_traceback)
        if lock is not None:
            lock.release()


def _train(cfg: Config, stop: _Stop) -> ExitCode:
    """Set-up, the run directory's bookkeeping, then the step loop with the default hooks."""
    trainer = Trainer(cfg=cfg, run=set_up(cfg), stop=stop)
    run, steps = trainer.run, cfg.train.steps
    if run.primary:  # the state fits this config: from now on config.yaml describes the checkpoints
        write_config(run.run_dir, to_yaml(cfg))
    if run.start >= steps and _complete(cfg, run):
        run.close()
        return ExitCode.OK
    if run.primary:  # what was logged after the resumed step is logged again: each step exactly once
        dropped = truncate_metrics(run.run_dir / "metrics.jsonl", run.start)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} record(s) after step {run.start}, which is resumed from")
    if stop.requested:
        run.say(f"stopped by {stop.requested} before the first step; nothing new to save")
        run.close()
        return ExitCode.OK
    run.writer = MetricsWriter(run.run_dir, active=run.primary)
    run.open_progress()
    add_default_hooks(trainer)
    try:
        with use_mesh(run.mesh):
            return trainer.train()
    finally:
        run.loader.close()  # Grain worker processes, if any


def _complete(cfg: Config, run) -> bool:
    """Whether a run whose checkpoint is at train.steps has nothing left to do: its end (final eval, final
    record, export) completed at that step and the export is where export.path says (a lost or new export is
    written again). Says which."""
    steps = cfg.train.steps
    done = read_complete(run.run_dir)
    exported = not cfg.export.path or has_export(cfg.export.path)
    if done is not None and done.get("step") == run.start and exported:
        run.say(f"already trained: checkpoint at step {run.start} >= train.steps={steps}; nothing to do")
        return True
    why = "the run's end did not complete" if exported or done is None else f"{cfg.export.path} holds no export"
    run.say(f"checkpoint at step {run.start} >= train.steps={steps}, but {why}: finishing it (final eval, final "
            f"record, export)")
    return False
