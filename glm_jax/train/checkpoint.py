"""orbax checkpoints of the train state and the data loader position.

Layout: {run_dir}/checkpoints/<step>/{state,loader}, written asynchronously every checkpoint.every steps,
the last checkpoint.keep kept; with checkpoint.keep_best, {run_dir}/checkpoints_best holds the checkpoint
with the lowest eval loss. orbax writes each step into a temporary directory and renames it when complete,
so a crash never leaves a half-written "latest" checkpoint. Every process calls save/restore (orbax
coordinates multi-host writes itself).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(directory: Path, keep: int, async_save: bool, best: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        best_fn=(lambda m: m["eval_loss"]) if best else None, best_mode="min",
        keep_checkpoints_without_metrics=not best)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "loader"))


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, async_save: bool = True, keep_best: bool = False,
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
        saved = self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             loader=ocp.args.JsonSave(loader_state)), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.dir)
        return saved

    def save_best(self, step: int, state, loader_state: dict, eval_loss: float) -> None:
        if self.best is None:
            return
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     loader=ocp.args.JsonSave(loader_state)),
                       metrics={"eval_loss": float(eval_loss)}, force=True)

    def restore(self, abstract_state, step: int | None = None):
        """(state, loader_state) of `step` (default: latest). `abstract_state` carries target shardings."""
        step = self.mngr.latest_step() if step is None else step
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              loader=ocp.args.JsonRestore()))
        return out["state"], out["loader"]

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
