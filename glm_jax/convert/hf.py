"""load_hf / save_hf: THUDM (`chatglm`) and transformers (`glm`, `glm4`) checkpoints in and out."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from glm_jax.config import GLMConfig, read_json_object
from glm_jax.convert.formats import ENTRIES, HEADS, IGNORED_TORCH_NAMES, QUANTIZABLE, Entry
from glm_jax.convert.quant import QUANTIZED_KERNELS, dequantize_kernel, dequantize_rows, quantize_kernel, quantize_rows
from glm_jax.convert.tensors import CheckpointReader, write_safetensors
from glm_jax.sharding import LOGICAL_RULES, param_shardings

log = logging.getLogger(__name__)

PREFIX = ("model", "prefix")
FORMAT_OF_MODEL_TYPE = {"chatglm": "thudm", "glm": "transformers", "glm4": "transformers"}


def detect_format(ckpt_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """('thudm' | 'transformers', raw config dict) from a checkpoint directory's config.json."""
    file = Path(ckpt_dir) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing (a checkpoint directory needs its config.json)")
    raw = read_json_object(file)
    fmt = FORMAT_OF_MODEL_TYPE.get(raw.get("model_type"))
    if fmt is None:
        raise ValueError(f"{file}: unknown model_type {raw.get('model_type')!r} (expected chatglm, glm or glm4)")
    return fmt, raw


def abstract_params(cfg: GLMConfig):
    """Boxed ShapeDtypeStructs of every parameter any head may have (model + lm_head + score)."""
    from glm_jax.model import GLMForCausalLM, GLMForSequenceClassification, param_specs

    return {**param_specs(GLMForCausalLM(cfg)), "score": param_specs(GLMForSequenceClassification(cfg))["score"]}


def get_path(tree, path):
    """tree[path[0]][path[1]]...: a leaf of a nested parameter dict by its key path."""
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def load_hf(ckpt_dir: str | Path, *, mesh: Mesh | None = None, shardings=None, rules=LOGICAL_RULES,
            **config_overrides) -> tuple[GLMConfig, dict]:
    """Loads a THUDM or transformers GLM checkpoint directory -> (GLMConfig, params).

    The format is detected from config.json; weights may be .safetensors or .bin, sharded or not, and THUDM
    int8/int4 checkpoints are dequantized. Tensors are read one at a time and each parameter goes straight to
    its device placement: `shardings` (a tree like params) or, given a `mesh`, the shardings that the logical
    axis `rules` give. `config_overrides` (e.g. param_dtype="float32", dtype="bfloat16") adjust the config;
    `quantization_bit=8` or `4` keeps the block linears as int8/int4 (quantized per tensor on the host, so the
    float model never sits on the device; a THUDM quantized checkpoint keeps its own integers exactly).
    `scan_layers=False` returns the per-block layout (model/layers_0, ...) for fast decoding.
    """
    fmt, raw = detect_format(ckpt_dir)
    cfg = GLMConfig.from_hf(ckpt_dir, **config_overrides)
    if not cfg.scan_layers:  # read into the stacked layout the tensor maps describe, then split per block
        if shardings is not None:
            raise ValueError("load_hf(scan_layers=False): pass mesh= rather than shardings= (the shardings of the "
                             "stacked layout are derived, then split per block)")
        _, params = load_hf(ckpt_dir, mesh=mesh, rules=rules, **{**config_overrides, "scan_layers": True})
        from glm_jax.model import unstack_layers

        return cfg, unstack_layers(params)
    reader = CheckpointReader(ckpt_dir)
    bits = int(raw.get("quantization_bit") or 0) if fmt == "thudm" else 0
    boxed = abstract_params(cfg)
    shapes = nn.unbox(boxed)
    if shardings is None and mesh is not None:
        shardings = param_shardings(boxed, mesh, rules)
    dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    entries = ENTRIES[fmt](cfg)
    fused_rows = {e.torch_name: max(x.rows[1] for x in entries if x.torch_name == e.torch_name)
                  for e in entries if e.rows}
    used: set[str] = set()

    def read(entry: Entry, name: str, shape) -> np.ndarray:
        if bits and name.endswith(".weight") and any(q in name for q in QUANTIZABLE):
            w = dequantize_rows(reader.get(name), reader.get(name + "_scale"), bits)
            used.add(name + "_scale")
        else:
            w = reader.get(name)
        used.add(name)
        if entry.rows and w.shape[0] != fused_rows[entry.torch_name]:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has {w.shape[0]} rows, expected "
                             f"{fused_rows[entry.torch_name]} (fused q/k/v)")
        expected = entry.torch_shape(shape)
        got = w[entry.rows[0]:entry.rows[1]].shape if entry.rows else w.shape
        if tuple(got) != expected:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(w.shape)}, expected "
                             f"{expected} for {cfg.name or 'this config'}")
        return entry.to_ours(w, shape).astype(dtype)

    params: dict = {}
    for entry in entries:
        if (entry.path[:1] in HEADS or entry.path == PREFIX) and entry.torch_name not in reader:
            continue  # optional: a checkpoint has lm_head, score or both; a P-tuning prefix only once trained
        shape = get_path(shapes, entry.path).shape
        if entry.per_layer:
            buf = np.empty(shape, dtype)
            for i in range(cfg.num_layers):
                buf[i] = read(entry, entry.torch_name.format(i=i), shape[1:])
        else:
            buf = read(entry, entry.torch_name, shape)
        arrays = {entry.path: buf}
        n_in = QUANTIZED_KERNELS.get(entry.path[2:4]) if entry.path[1:2] == ("layers",) else None
        if cfg.quantization_bit and n_in and entry.path[-1] == "kernel":
            q, scale = quantize_kernel(buf, n_in, cfg.quantization_bit)
            arrays = {entry.path: q, entry.path[:-1] + ("scale",): scale}
        for path, arr in arrays.items():
            target = get_path(shardings, path) if shardings is not None else None
            _set(params, path, jax.device_put(arr, target) if target is not None else jax.numpy.asarray(arr))
        del buf, arrays
    if not any(h[0] in params for h in HEADS):
        raise KeyError(f"{ckpt_dir}: no output head found (expected tensor "
                       f"{next(e.torch_name for e in entries if e.path == ('lm_head', 'kernel'))!r})")
    unused = sorted(set(reader.keys()) - used - set(IGNORED_TORCH_NAMES))
    if unused:
        log.warning("%s: %d tensors not loaded, e.g. %s", ckpt_dir, len(unused), ", ".join(unused[:5]))
    return cfg, params


def save_hf(cfg: GLMConfig, params, out_dir: str | Path, format: str = "transformers", *,
            max_shard_size: int | str = "5GB", dtype: str | None = None, quantization_bit: int | None = None) -> Path:
    """Writes `params` as a checkpoint directory that the reference PyTorch code loads.

    format "transformers": transformers' glm / glm4 (GlmForCausalLM, GlmForSequenceClassification).
    format "thudm": THUDM's chatglm layout (fused query_key_value), optionally int8/int4 quantized.
    Weights go to safetensors shards of at most `max_shard_size`, with an index when there are several.
    """
    if format not in ENTRIES:
        raise ValueError(f"unknown checkpoint format {format!r} (expected 'thudm' or 'transformers')")
    from glm_jax.model import stack_layers

    params, cfg = stack_layers(params), cfg.replace(scan_layers=True)  # the tensor maps describe the stack
    if quantization_bit and format != "thudm":
        raise ValueError("quantized checkpoints exist only in the THUDM format (format='thudm')")
    out = Path(out_dir)
    config = cfg.to_hf_dict(format)
    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    if dtype:
        config["torch_dtype"] = dtype
    if quantization_bit:
        config["quantization_bit"] = int(quantization_bit)
    if "score" in params:
        config["architectures"] = ["GlmForSequenceClassification"] + (config["architectures"] if "lm_head" in params else [])
        if format == "thudm":
            raise ValueError("sequence-classification heads are saved in the transformers format only")

    entries = [e for e in ENTRIES[format](cfg) if e.path[:1] not in HEADS or e.path[0] in params]
    by_name: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_name[e.torch_name].append(e)

    def tensor(name_template: str, layer: int | None):
        parts = []
        for e in sorted(by_name[name_template], key=lambda e: e.rows or (0, 0)):
            x = get_path(params, e.path)
            x = np.asarray(jax.device_get(x[layer] if layer is not None else x))
            if e.path[-1] == "kernel" and "scale" in get_path(params, e.path[:-1]):  # a quantized block linear
                scale = np.asarray(jax.device_get(get_path(params, e.path[:-1] + ("scale",))[layer]))
                x = dequantize_kernel(x, scale, QUANTIZED_KERNELS[e.path[2:4]], lead=0)
            parts.append(e.to_torch(x.astype(out_dtype)))
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def tensors():  # embedding, then layer by layer, then final norm and heads: one layer in memory at a time
        globals_ = [t for t in by_name if "{i}" not in t]
        first = [t for t in globals_ if by_name[t][0].path[:2] == ("model", "embed")]
        for name in first:
            yield name, tensor(name, None)
        for i in range(cfg.num_layers):
            for t in (t for t in by_name if "{i}" in t):
                name, w = t.format(i=i), tensor(t, i)
                if quantization_bit and name.endswith(".weight") and any(q in name for q in QUANTIZABLE):
                    q, scale = quantize_rows(w, quantization_bit)
                    yield name, q
                    yield name + "_scale", scale
                else:
                    yield name, w
        for name in (t for t in globals_ if t not in first):
            yield name, tensor(name, None)

    write_safetensors(tensors(), out, max_shard_size)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
