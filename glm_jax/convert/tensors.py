"""Tensor-by-tensor reading and sharded writing of Hugging Face style checkpoint directories.

Reading never materialises the whole checkpoint: safetensors files are memory-mapped by the safetensors
library and read one tensor at a time; `.bin` files go through `torch.load(mmap=True)` (torch is only needed
for those). Writing produces `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
`model.safetensors.index.json` above the shard size.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointReader:
    """Lazily reads named tensors from a checkpoint directory as numpy arrays (bf16 via ml_dtypes)."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self._handles: dict[str, object] = {}
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: checkpoint directory does not exist")
        self.weight_map: dict[str, str] = {}
        index = next((self.dir / f for f in INDEX_FILES if (self.dir / f).exists()), None)
        if index is None:
            index = next(iter(sorted(self.dir.glob("*.safetensors.index.json")) + sorted(self.dir.glob("*.bin.index.json"))), None)
        if index is not None:
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:  # bad JSON or UTF-8, no weight_map mapping
                raise ValueError(f"{index}: not a valid checkpoint index ({type(e).__name__}: {e})") from None
            for name, file in self.weight_map.items():
                if not (self.dir / file).exists():
                    raise FileNotFoundError(f"{index}: shard {file} (holding tensor {name!r}) is missing")
        else:
            files = [self.dir / f for f in SINGLE_FILES if (self.dir / f).exists()]
            files = files[:1] or sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("*.bin"))
            if not files:
                raise FileNotFoundError(f"{self.dir}: no *.safetensors or *.bin weights and no index json")
            for f in files:
                for name in self._open(f.name).keys():
                    self.weight_map[name] = f.name

    def _open(self, file: str):
        """A handle with .keys() / .get_tensor(name) for one file (kept open: safetensors handles are mmaps)."""
        handles = self._handles
        if file not in handles:
            path = self.dir / file
            if file.endswith(".safetensors"):
                try:
                    handles[file] = safe_open(str(path), framework="numpy")
                except Exception as e:
                    raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
            else:
                if len(handles) >= 1:  # a .bin state dict is a Python dict of mmapped tensors: keep one open
                    handles.clear()
                handles[file] = _TorchFile(path)
        return handles[file]

    def keys(self):
        return self.weight_map.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        return str(self.dir / self.weight_map[name]) if name in self.weight_map else str(self.dir)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        return self._open(self.weight_map[name]).get_tensor(name)


class _TorchFile:
    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
        if not zipfile.is_zipfile(path):  # torch.save's format; truncated or foreign files fail here
            raise ValueError(f"{path}: unreadable PyTorch checkpoint (not the zip archive torch.save writes: "
                             f"truncated, or another format)")
        try:
            self._sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None

    def keys(self):
        return self._sd.keys()

    def get_tensor(self, name: str) -> np.ndarray:
        import torch

        t = self._sd[name].detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, max_shard_size="5GB",
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Writes (name, array) pairs into size-capped safetensors shards; returns the file names.

    Tensors stream in: at most one shard is held in memory at a time.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, str]] = []
    current: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            tmp = out / f".shard-{len(shards):05d}.tmp"
            save_file(current, str(tmp), metadata=metadata)
            shards.append({name: tmp.name for name in current})
            current, size = {}, 0

    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if current and size + arr.nbytes > limit:
            flush()
        current[name] = arr
        size += arr.nbytes
    flush()

    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for shard, final in zip(shards, names):
        tmp = out / next(iter(shard.values()))
        os.replace(tmp, out / final)
        weight_map.update({name: final for name in shard})
    if n > 1:
        total = sum(os.path.getsize(out / f) for f in names)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names
