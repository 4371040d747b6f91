"""The training loop of train.py: a step loop that reads like the algorithm, and hooks for what happens every N
steps, over a run built by glm_jax/train/build.py.

    trainer = Trainer(cfg=cfg, run=set_up(cfg), stop=stop)  # build.set_up: data, mesh, model, state
    trainer.add_hook(my_fn, every=100)           # my_fn(info): info.step, info.state, info.record (read, checked)
    trainer.on_record(print)                     # every step's metrics, in order, as they are read
    exit_code = trainer.train()

A step's metrics are read from the device one step late, so the host never leaves the device idle. A step at
which a hook is due is read at once, before the hook runs, so nothing is evaluated or saved of a state that
is not known to be finite. The default hooks (`add_default_hooks`): evaluation, the best-eval checkpoint,
checkpoints, the metrics file and the progress bar. Faults and exit codes: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from glm_jax.train.build import TrainRun
from glm_jax.train.config import Config
from glm_jax.train.exit_codes import ExitCode
from glm_jax.train.metrics import mfu, plot_loss
from glm_jax.train.rundir import mark_complete
from glm_jax.train.step import ACCURACY_TASKS

log = logging.getLogger("glm_jax.train")


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- the metrics

class MetricsReader:
    """Turns a step's device metrics into its JSON record: throughput from the host clock, and the NaN verdict."""

    def __init__(self, *, task: str, on_nan: str, tokens_per_step: int, flops_per_token: float):
        self.task, self.on_nan = task, on_nan
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.device_kind = jax.devices()[0].device_kind
        self.last, self.steps, self.secs = None, 0, 0.0

    def read(self, step: int, m) -> tuple[dict, str | None]:
        """(record, None) or (record, what is not finite)."""
        m = jax.device_get(m)
        now = time.perf_counter()
        dt = None if self.last is None else now - self.last
        self.last = now
        if dt is not None:
            self.steps, self.secs = self.steps + 1, self.secs + dt
        tps = self.tokens_per_step / dt if dt else None
        record = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                  "tokens": int(m["tokens"]), "tokens_per_s": tps,
                  "mfu": mfu(tps, self.flops_per_token, self.device_kind, jax.device_count()) if tps else None}
        if self.task in ACCURACY_TASKS:  # embedding: in-batch retrieval accuracy
            record["accuracy"] = float(m["accuracy"])
        if "mtp_loss" in m:
            record["mtp_loss"], record["mtp_accuracy"] = float(m["mtp_loss"]), float(m["mtp_accuracy"])
        if "kl" in m:  # distillation: the KL to the teacher and the data loss ("loss" too)
            record["kl"], record["data_loss"] = float(m["kl"]), float(m["data_loss"])
            if "hidden_mse" in m:
                record["hidden_mse"] = float(m["hidden_mse"])
        if self.on_nan == "skip":
            record["skipped"] = int(m["skipped"])
        if "moe_load_cv" in m:
            record.update(moe_record(m))
        if bool(m["finite"]):
            return record, None
        if bool(m["update_finite"]) or not math.isfinite(record["loss"] + record["grad_norm"]):
            return record, f"loss={record['loss']} grad_norm={record['grad_norm']} is not finite"
        return record, "the updated parameters / optimizer state are not finite"

    def throughput(self) -> dict:
        if not self.steps:
            return {}
        tps = self.tokens_per_step * self.steps / self.secs
        return {"tokens_per_s": tps, "mfu": mfu(tps, self.flops_per_token, self.device_kind, jax.device_count())}


def moe_record(m: dict) -> dict:
    """A MoE step's expert load (tokens per expert; lists per MoE layer, in layer order): moe/load_cv is the
    mean over the layers of std / mean tokens per expert (0 = balanced). docs/training.md, "MoE models"."""
    cv = [float(x) for x in np.asarray(m["moe_load_cv"])]
    out = {"moe/load_cv": float(np.mean(cv)), "moe/load_cv_layers": [round(x, 4) for x in cv],
           "moe/load_min": [int(x) for x in np.asarray(m["moe_load_min"])],
           "moe/load_max": [int(x) for x in np.asarray(m["moe_load_max"])]}
    if "moe_balance" in m:
        out["moe/balance_loss"] = float(m["moe_balance"])
    return out


# ---------------------------------------------------------------------------------------------- the trainer

@dataclasses.dataclass
class StepInfo:
    step: int
    state: dict
    consumed: dict  # the data position that goes with `state`
    record: dict  # the step's metrics, read and checked; hooks may add to it (eval_loss, ...)


@dataclasses.dataclass
class _Hook:
    fn: Callable[[StepInfo], Any]
    every: int
    at_end: bool

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and step % self.every == 0 and (step < last or self.at_end)


class Trainer:
    """The step loop and its hooks over a built run (`Trainer(cfg=cfg, run=build.set_up(cfg), stop=...)`);
    `stop.requested` (a signal's name, or None) is checked after every step."""

    def __init__(self, *, cfg: Config, run: TrainRun, stop):
        self.cfg, self.run, self.stop = cfg, run, stop
        self.hooks: list[_Hook] = []
        self.record_fns: list[Callable[[dict], Any]] = []
        t = cfg.train
        self.reader = MetricsReader(task=run.task, on_nan=t.on_nan, tokens_per_step=run.tokens_per_step,
                                    flops_per_token=run.flops_per_token)
        self.skips_in_row = 0

    def add_hook(self, fn: Callable[[StepInfo], Any], *, every: int, at_end: bool = True) -> None:
        """fn(info) after every `every`-th step (and after the last one unless at_end=False), in the order
        added, once the step's metrics are read and checked."""
        self.hooks.append(_Hook(fn, every, at_end))

    def on_record(self, fn: Callable[[dict], Any]) -> None:
        """fn(record) for every step's record, in step order, after that step's hooks."""
        self.record_fns.append(fn)

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Steps from the restored step to train.steps, then the end of the run. Returns the exit code."""
        run, steps = self.run, self.cfg.train.steps
        step, state, pending = run.start, run.state, None
        run.state = None  # donated to the first step
        batch = run.next_batch() if step < steps else None
        try:
            while step < steps:
                state, metrics = run.train_step(state, run.frozen, batch, run.hyper(step))
                consumed = run.loader.state()
                step += 1
                if step < steps:  # the next batch is read and sent while the device runs this step
                    batch = run.next_batch()
                if pending is not None:
                    self._emit(self._read(*pending))
                pending = (step, metrics)
                due = [h for h in self.hooks if h.due(step, steps)]
                if due or self.stop.requested or step == steps:
                    info = StepInfo(step, state, consumed, self._read(*pending))
                    pending = None
                    for hook in due:
                        hook.fn(info)
                    self._emit(info.record)
                    if self.stop.requested:
                        return self._preempted(info)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            run.close()
            return ExitCode.NAN
        return self.finish(step, state)

    def _read(self, step: int, metrics) -> dict:
        """The step's record; a non-finite step stops the run or counts towards train.max_skips."""
        record, bad = self.reader.read(step, metrics)
        self.skips_in_row = 0 if bad is None else self.skips_in_row + 1
        if bad is None:
            return record
        t = self.cfg.train
        if t.on_nan == "stop" or self.skips_in_row >= t.max_skips:
            self._emit(record)
            why = bad if t.on_nan == "stop" else (f"{self.skips_in_row} non-finite steps in a row "
                                                  f"(train.max_skips={t.max_skips}); last: {bad}")
            raise NonFiniteLoss(f"step {step}: {why}; stopping without saving (last good checkpoint: "
                                f"{self.run.ckpt.latest_step()})")
        log.warning("step %d: %s, update skipped (%d so far)", step, bad, record["skipped"])
        return record

    def _emit(self, record: dict) -> None:
        for fn in self.record_fns:
            fn(record)

    def _preempted(self, info: StepInfo) -> int:
        run, enabled = self.run, self.cfg.checkpoint.enabled
        if enabled:
            run.ckpt.save(info.step, info.state, info.consumed, force=True)
        run.ckpt.wait()
        run.close_progress()
        saved = (f"checkpoint saved to {run.ckpt.dir}; re-run the same command to resume" if enabled
                 else "nothing saved (checkpoint.enabled=false): a rerun starts over")
        run.say(f"stopped by {self.stop.requested} at step {info.step}; {saved}")
        return ExitCode.OK

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, step: int, state) -> int:
        """Final eval and record, export, loss plot, then complete.json: a kill before that redoes this."""
        run = self.run
        run.close_progress()
        final = {"step": step, "final": True}
        if run.eval_sets:
            final.update(run.evaluate(state))
            run.ckpt.save_best(step, state, run.loader.state(), final["eval_loss"])
        final.update(self.reader.throughput())
        run.writer.write(final)
        run.ckpt.close()
        run.say("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in final.items() if k != "final"))
        if self.cfg.export.path:
            run.export(step, state)
        run.writer.close()
        if run.primary:
            png = plot_loss(run.run_dir)
            if png:
                print(f"loss curve: {png}")
            print(f"metrics: {run.run_dir / 'metrics.jsonl'}")
            mark_complete(run.run_dir, step, self.cfg.export.path)
        return ExitCode.OK


def add_default_hooks(trainer: Trainer) -> None:
    """Evaluation (+ the best-eval checkpoint), checkpoints, the metrics file and the progress bar."""
    cfg, run = trainer.cfg, trainer.run
    t, c = cfg.train, cfg.checkpoint

    def evaluate(info: StepInfo) -> None:
        info.record.update(run.evaluate(info.state))
        run.ckpt.save_best(info.step, info.state, info.consumed, info.record["eval_loss"])

    if run.eval_sets and t.eval_every:
        trainer.add_hook(evaluate, every=t.eval_every, at_end=False)  # the end of the run evaluates anyway
    if c.enabled:
        trainer.add_hook(lambda info: run.ckpt.save(info.step, info.state, info.consumed), every=c.every)
        trainer.add_hook(lambda info: run.ckpt.save(info.step, info.state, info.consumed), every=t.steps)

    def write(record: dict) -> None:
        if record["step"] % t.log_every == 0 or "eval_loss" in record or record["step"] == t.steps:
            run.writer.write(record)

    trainer.on_record(write)
    trainer.on_record(run.progress)
