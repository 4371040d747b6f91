#!/usr/bin/env python
"""Train a GLM: `python train.py [--config configs/tiny.yaml] [key=value ...]` (the same as `glm-train`).
Options, exit codes and the default config: glm_jax/train/cli.py, or `python train.py --help`."""

from glm_jax.train.cli import entry

if __name__ == "__main__":
    entry()
