"""Metrics: JSON lines, optional TensorBoard events, MFU, and the loss-curve PNG.

MFU = tokens/s * model FLOPs per token (GLMConfig.flops_per_token: 6N + attention, fwd+bwd, no remat
recompute counted) / (devices * peak dense bf16 FLOP/s of one device). The peak table below covers TPU and
NVIDIA data-centre parts; on CPU and unknown devices there is no meaningful peak and mfu is reported as null.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' spec sheets.
PEAK_FLOPS = {
    "tpu v2": 45e12,
    "tpu v3": 123e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,
    "h100 pcie": 756e12,
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "a800": 312e12,
    "l4": 121e12,
    "l40s": 362e12,
    "a10g": 125e12,
}


def lookup_device(table: dict, device_kind: str):
    """table's value for a device kind string ("NVIDIA H100 80GB HBM3", "TPU v5 lite"): longest key contained."""
    kind = device_kind.lower()
    for key in sorted(table, key=len, reverse=True):
        if key in kind:
            return table[key]
    return None


def peak_flops(device_kind: str) -> float | None:
    return lookup_device(PEAK_FLOPS, device_kind)


def mfu(tokens_per_s: float, flops_per_token: float, device_kind: str, num_devices: int) -> float | None:
    peak = peak_flops(device_kind)
    if peak is None or not tokens_per_s:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is installed
    (3 s of start-up per run) and needs it only for torch tensors; we write floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # an import of it now raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends JSON lines to {run_dir}/metrics.jsonl (process 0 only) and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, active: bool = True):
        self.active = active
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import importlib.util

        SummaryWriter = None
        if importlib.util.find_spec("tensorboardX") is not None:
            SummaryWriter = _tensorboardx_writer()
        elif importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore
            except Exception:
                SummaryWriter = None
        if SummaryWriter is not None:
            try:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception as e:  # tensorboard missing behind torch's wrapper
                log.info("TensorBoard events disabled (%s)", e)
        else:
            log.info("TensorBoard events disabled: neither tensorboardX nor torch.utils.tensorboard is installed")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        # strict JSON: non-finite floats become null and are listed under "nonfinite"
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        clean = {k: (None if k in bad else v) for k, v in record.items()}
        if bad:
            clean["nonfinite"] = bad
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse_lines(text: str, path) -> list[dict]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            log.warning("%s:%d: not a complete JSON record, skipped", path, i)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a cut (unparsable) line is skipped with a warning."""
    p = Path(path)
    if not p.exists():
        return []
    return _parse_lines(p.read_text(errors="replace"), p)


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keeps the records of steps before `step` and the step `step` itself unless it is a final record: what
    a run resuming from the checkpoint of `step` has already logged. Cut lines go too. Returns lines dropped.
    The file is replaced atomically (a kill during this leaves the old or the new file, never half)."""
    p = Path(path)
    if not p.exists():
        return 0
    records = read_metrics(p)
    lines = [line for line in p.read_text(errors="replace").splitlines() if line.strip()]
    keep = [r for r in records if r.get("step", 0) < step or (r.get("step") == step and not r.get("final"))]
    if len(keep) == len(lines):
        return 0
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))
    tmp.replace(p)
    return len(lines) - len(keep)


def plot_loss(run_dir: str | Path) -> Path | None:
    """{run_dir}/loss.png (train and eval loss against step) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
