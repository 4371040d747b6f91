"""The exit codes of train.py / glm-train (docs/training.md, "Exit codes of train.py")."""

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # done, or stopped by SIGTERM / SIGINT (after saving when checkpoints are enabled)
    CONFIG = 2  # bad config or data (one line naming the key or file:line), a run directory owned by another
    #             live process, no checkpoint that restores, an output that would replace what it did not write
    NAN = 3  # non-finite loss / gradient / updated state (on_nan: stop), or train.max_skips in a row (on_nan: skip)
    NO_FIT = 4  # --compile-only: the compiled step does not fit in device memory
    IO = 5  # the run directory cannot be written (disk full, read-only, permissions)
