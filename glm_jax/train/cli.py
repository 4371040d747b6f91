"""Train a GLM: `python train.py` or `glm-train` `[--config configs/tiny.yaml] [key=value ...]`.

Without --config the default is configs/tiny.yaml (a small GLM on the shipped corpus, a few minutes on CPU).
Overrides are dotted keys with YAML values: `python train.py train.steps=30 mesh.fsdp=4 run_dir=runs/x`.
Re-running the same command resumes from the latest checkpoint in run_dir.

`--prepare-data DIR` tokenizes and packs the pretraining files once (train with data.prepared=DIR afterwards).
`--compile-only [--topology v5p-128]` compiles the configured train step without data or parameters and prints
XLA's memory plan per device (with --topology: for a Cloud TPU slice that is not here; needs libtpu).

Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving), 2 bad config/data (or the run directory is in
use by another live process, or none of its checkpoints restores), 3 NaN/Inf loss, gradient or updated state
(on_nan=stop, or train.max_skips in a row with on_nan=skip), 4 the compiled step does not fit in device memory
(--compile-only), 5 the run directory cannot be written (disk full, read-only, permissions).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from glm_jax.platforms import skip_absent_tpu
from glm_jax.train.config import ConfigError, load_config
from glm_jax.train.data import DataError
from glm_jax.train.exit_codes import ExitCode

# The repository's default config (an editable install or a checkout; elsewhere pass --config).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _catch_early_signals() -> list:
    """SIGTERM / SIGINT before training installs its own handler (imports, data, compilation): remembered, so
    the run stops cleanly at its first chance instead of dying with exit 143 and nothing said."""
    seen = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: seen.append(signal.Signals(signum).name))
    return seen


def main(argv: list[str] | None = None) -> int:
    early = _catch_early_signals()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=30")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the train step for abstract inputs and print XLA's memory plan; trains nothing")
    ap.add_argument("--topology", default=None,
                    help="with --compile-only: a Cloud TPU slice to compile for from this machine, e.g. v5p-128")
    ap.add_argument("--prepare-data", metavar="DIR", default=None,
                    help="tokenize and pack data.train_files / eval_files once into DIR (then train with "
                         "data.prepared=DIR); trains nothing")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_intermixed_args(argv)  # overrides may come before and after the flags
    if args.topology and not args.compile_only:
        ap.error("--topology needs --compile-only (the slice is not here to train on)")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.topology:  # compiling for a slice that is not here needs libtpu; otherwise no TPU, no noise
        skip_absent_tpu()

    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        # the commands' modules after the config: a config error is reported before jax, orbax and grain load
        from glm_jax.train import plan, prepare, run

        if args.prepare_data or args.compile_only:  # no checkpoint to save: signals act as usual
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
            if early:
                return 128 + getattr(signal, early[0]).value
            if args.prepare_data:
                return prepare.prepare_data(cfg, args.prepare_data)
            return plan.compile_only(cfg, args.topology)
        return run.run(cfg, early)
    except (ConfigError, DataError) as e:
        kind = {ConfigError: "config", DataError: "data"}[type(e)]
        print(f"{kind} error: {e}", file=sys.stderr, flush=True)
        return ExitCode.CONFIG


def entry() -> None:
    """`glm-train` / `python train.py`: main() as the process's exit status."""
    code = main()
    if code == ExitCode.IO:  # orbax's save threads are stuck on the failed write and would hang the interpreter's exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
