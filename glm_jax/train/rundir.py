"""The run directory's own bookkeeping: who owns it, whether a new config may resume its checkpoints, whether
its end (final eval, final record, export) is done, and atomic exports.

    {run_dir}/run.lock       {"pid", "host", "proc_start", "time"} of the process training in it (process 0)
    {run_dir}/config.yaml    the resolved config of the checkpoints, written once the new config is known to fit
    {run_dir}/complete.json  {"step", "export"}: written last, after the export; without it a rerun finishes the end
    {export.path}/glm_jax_export.json  {"run_dir", "step", "format"}: marks a directory as this run's export, the
                             only kind of existing directory an export replaces (besides an empty one)

See docs/training.md, "Faults".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from glm_jax import save_hf
from glm_jax.tokenizers import ChatGLM6BTokenizer
from glm_jax.train.atomic_dir import Protected, check_destination, pid_alive, proc_start, write_atomically
from glm_jax.train.config import Config, ConfigError, load_config

log = logging.getLogger("glm_jax.train")

LOCK_NAME, COMPLETE_NAME, EXPORT_MARKER = "run.lock", "complete.json", "glm_jax_export.json"
# What a run writes in its directory (train/checkpoint.py, train/metrics.py): never an export's place.
RUN_ENTRIES = ("checkpoints", "checkpoints_best", "checkpoints_corrupt", "metrics.jsonl", "tensorboard", "loss.png",
               "config.yaml", LOCK_NAME, COMPLETE_NAME)
# Keys a resumed run must share with its checkpoints: they define the state's shapes or the data stream the
# loader position refers to. Everything else (steps, lr, eval and checkpoint cadence, export) may change.
RESUME_KEYS = ("model.", "train.mode", "train.seed", "train.global_batch_size", "data.task", "data.seq_len",
               "data.tokenizer", "data.prepared", "data.train_files", "lora.", "ptuning.")


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory; str(e) is one line naming it."""


class RunLock:
    """An exclusive lock file in the run directory, held while training. A lock whose process is gone (same
    host, pid not running or reused) is stale and taken over with a warning; a lock of another host is
    respected, since its process cannot be checked from here."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": proc_start(os.getpid()),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirBusy(f"{self.path}: could not take the lock (another process keeps taking it)")

    def _break_if_stale(self) -> None:
        try:
            text = self.path.read_text()
            owner = json.loads(text)
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):  # empty or cut: a writer in progress, or a dead one
            if time.time() - self.path.stat().st_mtime < 5:
                time.sleep(0.5)
                return
            owner, pid, host = {}, -1, socket.gethostname()
        if host == socket.gethostname() and not (pid > 0 and pid_alive(pid, owner.get("proc_start"))):
            log.warning("%s: removing the stale lock of pid %s (not running)", self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        raise RunDirBusy(f"{self.path.parent}: in use by pid {pid} on {host} since {owner.get('time')} "
                         f"({self.path}; delete it only if that run is dead)")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a.b.c": leaf}; empty mappings vanish, so `model.overrides: {}` equals no overrides."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def has_checkpoints(run_dir: str | Path) -> bool:
    d = Path(run_dir) / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check_resume_config(cfg: Config, run_dir: str | Path) -> None:
    """Raises ConfigError naming the first key that differs from the config of the run's checkpoints."""
    old_path = Path(run_dir) / "config.yaml"
    if not has_checkpoints(run_dir) or not old_path.exists():
        return
    try:
        old = _flat(load_config(old_path, check_paths=False).to_dict())
    except ConfigError as e:
        raise ConfigError(f"{old_path}: the config of this run's checkpoints does not load ({e})") from None
    new = _flat(cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUME_KEYS) and old.get(key) != new.get(key):
            raise ConfigError(f"{key}: {new.get(key)!r} differs from {old.get(key)!r} of the checkpoints in "
                              f"{run_dir} ({old_path}); use another run_dir, or the old value to resume")


def write_config(run_dir: str | Path, text: str) -> None:
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_complete(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / COMPLETE_NAME).read_text())
    except (OSError, ValueError):
        return None


def mark_complete(run_dir: str | Path, step: int, export: str | None) -> None:
    path = Path(run_dir) / COMPLETE_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "export": export}))
    tmp.replace(path)


def clear_complete(run_dir: str | Path) -> None:
    (Path(run_dir) / COMPLETE_NAME).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the export

def check_export_path(cfg: Config) -> None:
    """ConfigError unless export.path may be (re)written: not the run directory, anything holding it or its
    checkpoints and logs, nor the model.init_from checkpoint; new, empty, or an earlier export of this run."""
    run_dir = Path(cfg.run_dir)
    protected = [Protected("the run directory (run_dir)", run_dir)]
    protected += [Protected(f"the run's {name}", run_dir / name, whole=True) for name in RUN_ENTRIES]
    if cfg.model.init_from:
        protected.append(Protected("the model.init_from checkpoint", Path(cfg.model.init_from)))
    check_destination(cfg.export.path, "export.path", ours=lambda out: _not_an_export_of(run_dir, out),
                      protected=protected)


def _not_an_export_of(run_dir: Path, out: Path) -> str | None:
    """None if `out` is an export of the run in `run_dir` (its marker says so, or, for an export written before
    markers, the run's complete.json records it), else why not."""
    try:
        owner = json.loads((out / EXPORT_MARKER).read_text()).get("run_dir")
    except (OSError, ValueError, AttributeError):
        done = read_complete(run_dir) or {}
        if done.get("export") and Path(done["export"]).resolve() == out.resolve():
            return None
        return f"holds no {EXPORT_MARKER} (it is not the export of a glm_jax run)"
    if owner != str(run_dir.resolve()):
        return f"is the export of another run ({owner})"
    return None


def write_export(write, cfg: Config, step: int) -> Path:
    """export.path <- write(tmp) plus the marker, swapped in whole (an interrupted export leaves the previous
    one intact); export.path is checked again, since the file system may have changed while training."""
    check_export_path(cfg)
    marker = {"run_dir": str(Path(cfg.run_dir).resolve()), "step": step, "format": cfg.export.format}

    def write_marked(tmp: Path) -> None:
        write(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")

    return write_atomically(write_marked, cfg.export.path)


def has_export(path: str | Path | None) -> bool:
    """Whether an export is at `path` (a marker, or the config.json of one written before markers)."""
    return path is not None and any((Path(path) / f).is_file() for f in (EXPORT_MARKER, "config.json"))


def export_params(cfg, model_cfg, params, primary, step: int, tokenizer=None):
    """export.path <- params in export.format with this run's marker, written beside it and swapped in whole
    (rundir.write_export: an export never replaces what it did not write). A ChatGLM-6B `tokenizer` goes with
    the weights, as in THUDM's checkpoints (ice_text.model and its tokenizer_config.json)."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)

    def write(tmp: Path) -> None:
        save_hf(model_cfg, params, tmp, format=cfg.export.format)
        if isinstance(tokenizer, ChatGLM6BTokenizer):
            shutil.copyfile(tokenizer.model_file, tmp / "ice_text.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": tokenizer.num_image_tokens})
                                                       + "\n")

    if primary:
        out = write_export(write, cfg, step)
        print(f"exported {cfg.export.format} checkpoint to {out}", flush=True)
