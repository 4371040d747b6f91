"""Directories a command writes whole (the export of a run, `--prepare-data`'s packed rows): refused where
replacing them would remove something the command did not write, written beside their destination and swapped
in, so that a failure or a kill at any moment leaves the previous directory as it was.

    {parent}/.{name}.tmp-{pid}   the new directory while it is written (deleted by the next write if the pid died)
    {parent}/.{name}.old-{pid}   the previous one during a swap where the file system cannot exchange two paths

See docs/training.md, "Faults".
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

from glm_jax.train.config import ConfigError


class Protected(NamedTuple):
    """A path an output must not replace: `what` names it in the error ("the run directory (run_dir)");
    `whole` also refuses an output inside it (a directory whose contents another program manages)."""
    what: str
    path: Path
    whole: bool = False


def check_destination(out: str | Path, key: str, *, ours: Callable[[Path], str | None],
                      protected: list[Protected] = ()) -> None:
    """Raises ConfigError (one line naming `key`) unless `out` may be replaced by a new directory: it must not
    be, hold or (for `whole` entries) lie inside a protected path, and an existing `out` must be an empty
    directory or one that `ours(out)` recognises (it returns None for ours, else why not)."""
    out = Path(out)
    real = out.resolve()
    for p in protected:
        target = p.path.resolve()
        if real == target:
            raise ConfigError(f"{key}: {out} is {p.what}; writing there would replace it (choose another path)")
        if real in target.parents:
            raise ConfigError(f"{key}: {out} holds {p.what} ({p.path}); writing there would replace it (choose "
                              f"another path)")
        if p.whole and target in real.parents:
            raise ConfigError(f"{key}: {out} is inside {p.what} ({p.path}), which is not ours to write into "
                              f"(choose another path)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{key}: {out} exists and is not a directory; refusing to replace it (choose another "
                          f"path or remove it yourself)")
    if out.is_dir() and any(out.iterdir()):
        why = ours(out)
        if why is not None:
            raise ConfigError(f"{key}: {out} is a non-empty directory and {why}; refusing to replace it (choose "
                              f"another path or remove it yourself)")


def write_atomically(write: Callable[[Path], object], out: str | Path) -> Path:
    """Calls write(tmp) for a fresh sibling directory `tmp` and swaps it in as `out` once write returns; if
    write raises, tmp is deleted and `out` is untouched. The caller checked `out` (check_destination)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    tmp = _sibling(out, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        tmp.rename(out)
    elif _exchange(tmp, out):  # one atomic step: tmp now holds the previous directory
        shutil.rmtree(tmp)
    else:  # two renames; a kill between them is undone by _recover on the next write
        old = _sibling(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    return out


def _sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid() if pid is None else pid}")


def _recover(out: Path) -> None:
    """Cleans up after writes to `out` whose process is gone: deletes their half-written directories and puts
    a previous directory caught between the two renames of a swap back in place."""
    for kind in ("old", "tmp"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                path.rename(out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` runs (and, given its recorded start time, is still the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = proc_start(pid)
    return started is None or now is None or now == started


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where the C library
    or the file system cannot (another OS, glibc < 2.28, some network file systems)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
