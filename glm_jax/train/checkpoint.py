"""orbax checkpoints of the train state and the data loader position, with checksums and fallback.

Layout: {run_dir}/checkpoints/<step>/{state,loader,integrity}, written asynchronously every checkpoint.every
steps, the last checkpoint.keep kept; with checkpoint.keep_best, {run_dir}/checkpoints_best holds the checkpoint
with the lowest eval loss. orbax writes each step into a temporary directory and renames it when complete,
so a crash never leaves a half-written "latest" checkpoint. Every process calls save/restore (orbax
coordinates multi-host writes itself).

`integrity` holds a checksum per state tensor: the wrapping uint32 sum of its bits, computed on the device when
the checkpoint is taken and again after a restore. Integer addition is associative, so the sum is the same
whatever the mesh or the reduction order; any flipped bit changes it. A checkpoint that fails to restore
(missing or truncated files, missing metadata, a checksum mismatch) is moved to {run_dir}/checkpoints_corrupt/
with one logged line naming it, and the previous one is tried (docs/training.md, "Faults").
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _manager(directory: Path, keep: int, async_save: bool, best: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        best_fn=(lambda m: m["eval_loss"]) if best else None, best_mode="min",
        keep_checkpoints_without_metrics=not best)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "loader", "integrity"))


class CheckpointError(RuntimeError):
    """No checkpoint of the run could be restored; str(e) is one line naming the latest one and why."""


@jax.jit
def state_checksums(state) -> dict:
    """{tensor path: wrapping uint32 sum of its bits}: order-independent, so any mesh gives the same value."""
    def one(x):
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

    return {tensor_name(path): one(x) for path, x in jax.tree_util.tree_leaves_with_path(state)}


def tensor_name(path) -> str:
    """"opt_state/1/mu/model/embed/embedding": the same for the optax state and orbax's plain-dict view of it."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_same_tensors(saved: dict, abstract_state) -> None:
    """CheckpointError naming the first tensor that only one side has: the checkpoint holds another state (a
    different model, train.mode, LoRA targets or optimizer) than this run builds."""
    wanted = {tensor_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract_state)}
    extra, missing = sorted(set(saved) - wanted), sorted(wanted - set(saved))
    if extra or missing:
        which = f"this run has {missing[0]}, the checkpoint does not" if missing else \
            f"the checkpoint has {extra[0]}, this run does not"
        raise CheckpointError(f"does not match this run's state ({which}; {len(extra) + len(missing)} tensor "
                              f"name(s) differ: another model, train.mode, lora.targets or optimizer)")


def checksums_json(state) -> dict:
    return {"format": 1, "state": {k: int(v) for k, v in jax.device_get(state_checksums(state)).items()}}


def _quiet_failed_reads() -> None:
    """A failed orbax restore leaves read coroutines behind whose errors Python prints as multi-page
    "Exception ignored" tracebacks when they are collected (and, at exit, "Event loop is closed"): the one line
    of restore_latest_good already says what happened, so these go to the debug log."""
    def noise(exc) -> bool:
        text = str(exc)
        return (text.startswith("Encountered error while reading") or text == "Event loop is closed"
                or "Error reading" in text and "OCDBT" in text)

    def unraisable(u, previous=sys.unraisablehook):
        if noise(u.exc_value):
            log.debug("after a failed restore: %s", _first_line(u.exc_value))
        else:
            previous(u)

    def thread_error(a, previous=threading.excepthook):
        if noise(a.exc_value):
            log.debug("after a failed restore: %s", _first_line(a.exc_value))
        else:
            previous(a)

    def log_filter(record: logging.LogRecord) -> bool:  # asyncio's "Task exception was never retrieved"
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and (noise(exc) or noise(exc.__cause__ or "")))

    def excepthook(kind, exc, tb, previous=sys.excepthook):  # tensorstore's callbacks into the closed loop
        if noise(exc):
            log.debug("after a failed restore: %s", _first_line(exc))
        else:
            previous(kind, exc, tb)

    if getattr(sys.unraisablehook, "__name__", "") != "unraisable":
        sys.unraisablehook, threading.excepthook, sys.excepthook = unraisable, thread_error, excepthook
        logging.getLogger("asyncio").addFilter(log_filter)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:240]}"


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True, keep_best: bool = False,
                 enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(run_dir) / "checkpoints"
        self.mngr = _manager(self.dir, keep, async_save) if enabled else None
        self.best = _manager(Path(run_dir) / "checkpoints_best", 1, async_save, best=True) if (enabled and keep_best) else None

    def latest_step(self) -> int | None:
        return self.mngr.latest_step() if self.mngr else None

    def save(self, step: int, state, loader_state: dict, force: bool = False) -> bool:
        if not self.mngr:
            return False
        if self.mngr.latest_step() == step:
            return False
        saved = self.mngr.save(step, args=self._save_args(state, loader_state), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.dir)
        return saved

    def save_best(self, step: int, state, loader_state: dict, eval_loss: float) -> None:
        if self.best is None:
            return
        self.best.save(step, args=self._save_args(state, loader_state), metrics={"eval_loss": float(eval_loss)},
                       force=True)

    @staticmethod
    def _save_args(state, loader_state: dict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state),
                                  integrity=ocp.args.JsonSave(checksums_json(state)))

    def restore(self, abstract_state, step: int | None = None):
        """(state, loader_state) of `step` (default: latest), its checksums verified. `abstract_state` carries
        target shardings."""
        step = self.mngr.latest_step() if step is None else step
        items = {"state": ocp.args.StandardRestore(abstract_state), "loader": ocp.args.JsonRestore()}
        has_sums = (self.dir / str(step) / "integrity").exists()
        if has_sums:  # its tensor names first: a different state is named as such, not as orbax's tree error
            sums = self.mngr.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
            check_same_tensors(sums["integrity"]["state"], abstract_state)
            items["integrity"] = ocp.args.JsonRestore()
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        if has_sums:
            expected = out["integrity"]["state"]
            got = checksums_json(out["state"])["state"]
            bad = [k for k in expected if got.get(k) != expected[k]] or sorted(set(got) - set(expected))
            if bad:
                raise CheckpointError(f"tensor {bad[0]} does not match its checksum")
        else:
            log.warning("checkpoint %s has no checksums (written by an older glm_jax): not verified",
                        self.dir / str(step))
        return out["state"], out["loader"]

    def restore_latest_good(self, abstract_state):
        """(step, state, loader_state) of the newest checkpoint that restores and verifies; the newer ones
        that do not are moved to checkpoints_corrupt/ with a line each. Raises CheckpointError when none
        restores (nothing is moved then: a config that no longer fits the run must not discard its work)."""
        failed = []
        _quiet_failed_reads()  # before the first attempt: tensorstore reports into a closed loop while it fails
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                state, loader = self.restore(abstract_state, step)
            except Exception as e:  # orbax / tensorstore raise many types for damaged files
                failed.append((step, _first_line(e)))
                log.warning("checkpoint %s does not restore: %s", self.dir / str(step), failed[-1][1])
                continue
            for bad_step, why in failed:
                self._set_aside(bad_step, why)
            return step, state, loader
        step, why = failed[0]
        why = why.removeprefix("CheckpointError: ") if why.startswith("CheckpointError: does not match") else \
            f"cannot restore ({why})"
        raise CheckpointError(f"{self.dir / str(step)}: {why}"
                              + (f"; nor can the {len(failed) - 1} older checkpoint(s)" if len(failed) > 1 else ""))

    def _set_aside(self, step: int, why: str) -> None:
        src = self.dir / str(step)
        dst = self.dir.parent / "checkpoints_corrupt" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            print(f"checkpoint {src} is damaged ({why}): moved to {dst}; resuming from the previous one",
                  flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"glm_jax set aside checkpoint {step}")
        self.mngr.reload()

    def wait(self) -> None:
        for m in (self.mngr, self.best):
            if m is not None:
                m.wait_until_finished()

    def close(self) -> None:
        for m in (self.mngr, self.best):
            if m is not None:
                m.wait_until_finished()
                m.close()


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
