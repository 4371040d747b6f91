"""Which jax platforms a command starts: with libtpu installed (`jax[tpu]`, e.g. by the test extra) but no TPU
attached, jax still tries to start it and libtpu prints about five lines of warnings before anything else, so
an error was no longer the only line a command printed."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips are Google PCI devices (jax/_src/hardware_utils.py)
# Set on TPU VMs and by users pointing libtpu at a slice (also by --compile-only --topology callers)
_TPU_ENV = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")
_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def skip_absent_tpu() -> None:
    """Starts jax on CPU alone where nothing says an accelerator is here: JAX_PLATFORMS and jax_platforms unset,
    no TPU environment variable, no TPU (Google PCI device, /dev/accel*, /dev/vfio) and no GPU device file.
    Call before jax starts its backends; anywhere else it changes nothing."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or any(os.environ.get(k) for k in _TPU_ENV):
        return
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES) or _google_pci_device():
        return
    jax.config.update("jax_platforms", "cpu")


def current_platform() -> str:
    """"gpu", "tpu" or "cpu": the platform of the current mesh's devices, else of the default backend. (A mesh
    over a TPU slice described by libtpu, compiled ahead of time from a CPU host, counts as TPU.)"""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _google_pci_device() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False
