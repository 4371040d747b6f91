"""load_hf / save_hf: THUDM (`chatglm`) and transformers (`glm`, `glm4`, `glm4_moe`, `glm4_moe_lite`, `glm_moe_dsa`)
checkpoints in and out."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
from tqdm import tqdm

from glm_jax.config import GLMConfig, read_json_object
from glm_jax.convert.formats import (ENTRIES, FUSED_EXPERTS, GLM5_NEXT_PREFIX, HEADS, IGNORED_TORCH_NAMES, MTP_SHARED,
                                    Entry, fused_experts_entry, is_quantized, glm5_next_entries, head_major_rows)
from glm_jax.convert.quant import QUANTIZED_KERNELS, dequantize_kernel, dequantize_rows, quantize_kernel, quantize_rows
from glm_jax.convert.tensors import CheckpointReader, write_safetensors
from glm_jax.model import GLMForCausalLM, GLMForSequenceClassification, param_specs, stack_layers, unstack_layers
from glm_jax.sharding import LOGICAL_RULES, param_shardings

log = logging.getLogger(__name__)

PREFIX = ("model", "prefix")
FORMAT_OF_MODEL_TYPE = {"chatglm": "thudm", "glm": "transformers", "glm4": "transformers", "glm4_moe": "transformers",
                        "glm4_moe_lite": "transformers", "glm_moe_dsa": "transformers", "glm5_next": "transformers",
                        "glm5_next_text": "transformers"}
# A stacked parameter larger than this is assembled on its device(s) one layer at a time (the host holds one
# layer's slice, never the stack: a MoE layer's experts are most of the model).
STREAM_MIN_BYTES = 256 * 2**20


def detect_format(ckpt_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """('thudm' | 'transformers', raw config dict) from a checkpoint directory's config.json."""
    file = Path(ckpt_dir) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing (a checkpoint directory needs its config.json)")
    raw = read_json_object(file)
    fmt = FORMAT_OF_MODEL_TYPE.get(raw.get("model_type"))
    if fmt is None:
        raise ValueError(f"{file}: unknown model_type {raw.get('model_type')!r} (expected one of "
                         f"{', '.join(FORMAT_OF_MODEL_TYPE)})")
    return fmt, raw


def abstract_params(cfg: GLMConfig):
    """Boxed ShapeDtypeStructs of every parameter any head may have (model + lm_head + score)."""
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


def _stream_put(shape, dtype, target, layers):
    """A [L, ...] device array with sharding `target` (None: the default device), filled one layer at a time
    from `layers` (an iterator of (index, host array [...])): the host holds one layer's slice at a time."""
    if target is None:
        target = SingleDeviceSharding(jax.devices()[0])
    if isinstance(target, NamedSharding):
        one = NamedSharding(target.mesh, P(*tuple(target.spec)[1:]))
    elif isinstance(target, SingleDeviceSharding):
        one = target
    else:
        return None
    buf = jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=target)()
    put = _layer_updater(target, one)
    for j, arr in layers:
        buf = put(buf, jax.device_put(arr, one), np.int32(j))
    return buf


_UPDATERS: dict = {}


def _layer_updater(target, one):
    key = (target, one)
    if key not in _UPDATERS:
        _UPDATERS[key] = jax.jit(lambda buf, x, j: jax.lax.dynamic_update_index_in_dim(buf, x, j, 0),
                                 in_shardings=(target, one, None), out_shardings=target, donate_argnums=0)
    return _UPDATERS[key]


def progress_bar(enabled: bool | None, **kw) -> tqdm:
    """A tqdm bar on stderr; enabled None shows it only on a terminal (tqdm's disable=None)."""
    return tqdm(disable=None if enabled is None else not enabled, unit_scale=kw.get("unit") == "B", **kw)


def load_hf(ckpt_dir: str | Path, *, mesh: Mesh | None = None, shardings=None, rules=LOGICAL_RULES,
            progress: bool | None = None, **config_overrides) -> tuple[GLMConfig, dict]:
    """Loads a THUDM or transformers GLM checkpoint directory -> (GLMConfig, params).

    The format is detected from config.json; weights may be .safetensors or .bin, sharded or not, and THUDM
    int8/int4 checkpoints are dequantized. Tensors are read one at a time and each parameter goes straight to
    its device placement: `shardings` (a tree like params) or, given a `mesh`, the shardings that the logical
    axis `rules` give; a stacked parameter above STREAM_MIN_BYTES is assembled there layer by layer.
    `config_overrides` (e.g. param_dtype="float32", dtype="bfloat16") adjust the config;
    `quantization_bit=8` or `4` keeps the block linears as int8/int4 (quantized per tensor on the host, so the
    float model never sits on the device; a THUDM quantized checkpoint keeps its own integers exactly).
    `scan_layers=False` returns the per-block layout (model/layers_0, ...) for fast decoding.
    `progress`: a progress bar over the parameter bytes on stderr (None: only when stderr is a terminal).

    glm4_moe (GLM-4.5 / 4.6): routed experts per expert (mlp.experts.N.*, the published layout) or fused
    (mlp.experts.gate_up_proj / down_proj); the checkpoint's MTP layers load into model/mtp, or not at all with
    num_mtp_layers=0 (also when the checkpoint has none, as transformers' own saves: cfg.num_mtp_layers says
    what the tree holds).
    """
    fmt, raw = detect_format(ckpt_dir)
    cfg = GLMConfig.from_hf(ckpt_dir, **config_overrides)
    if not cfg.scan_layers:  # read into the stacked layout the tensor maps describe, then split per block
        if shardings is not None:
            raise ValueError("load_hf(scan_layers=False): pass mesh= rather than shardings= (the shardings of the "
                             "stacked layout are derived, then split per block)")
        cfg, params = load_hf(ckpt_dir, mesh=mesh, rules=rules, progress=progress,
                              **{**config_overrides, "scan_layers": True})
        return cfg.replace(scan_layers=False), unstack_layers(params, free_stacked=True)
    reader = CheckpointReader(ckpt_dir)
    if cfg.num_mtp_layers and f"model.layers.{cfg.num_layers}.eh_proj.weight" not in reader:
        log.info("%s: config.json has %d MTP layer(s) but the checkpoint none: num_mtp_layers=0", ckpt_dir,
                 cfg.num_mtp_layers)
        cfg = cfg.replace(num_mtp_layers=0)
    boxed = abstract_params(cfg)
    if shardings is None and mesh is not None:
        shardings = param_shardings(boxed, mesh, rules)
    bits = int(raw.get("quantization_bit") or 0) if fmt == "thudm" else 0
    entries = ENTRIES[fmt](cfg)
    if cfg.is_glm5_next and f"{GLM5_NEXT_PREFIX}embed_tokens.weight" not in reader:  # a flat text-only checkpoint
        entries = glm5_next_entries(cfg, prefix="model.")
    loader = _ParamLoader(cfg, reader, entries, bits, embeddings=bool(bits and raw.get("quantization_embeddings")))
    shapes, params = nn.unbox(boxed), {}
    groups = loader.groups()
    nbytes = {path: get_path(shapes, path).size * get_path(shapes, path).dtype.itemsize for path in groups}
    with progress_bar(progress, total=sum(nbytes.values()), desc=f"loading {Path(ckpt_dir).name}", unit="B") as bar:
        for path, group in groups.items():
            for p, value in loader.load(path, group, get_path(shapes, path).shape, shardings):
                _set(params, p, value)
            bar.update(nbytes[path])
    if not any(h[0] in params for h in HEADS):
        raise KeyError(f"{ckpt_dir}: no output head found (expected tensor "
                       f"{next(e.torch_name for e in loader.entries if e.path == ('lm_head', 'kernel'))!r})")
    loader.report_unused(ckpt_dir)
    return cfg, params


class _ParamLoader:
    """Reads our parameters from a checkpoint's torch tensors (load_hf), one parameter (`path`) at a time, and
    remembers which tensors it used."""

    def __init__(self, cfg: GLMConfig, reader: CheckpointReader, entries: list[Entry], bits: int,
                 embeddings: bool = False):
        self.cfg, self.reader, self.entries, self.bits = cfg, reader, entries, bits
        self.embeddings = embeddings  # the embedding and head quantized too (ChatGLM-6B int4-qe)
        self.dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
        self.fused_rows = {e.torch_name: max(x.rows[1] for x in entries if x.torch_name == e.torch_name)
                           for e in entries if e.rows}
        self.used: set[str] = set()
        if cfg.num_mtp_layers:  # the MTP layers' copies of the embedding / head: shared, not loaded (MTP_SHARED)
            shared = {f"model.layers.{cfg.num_layers + j}.{n}" for j in range(cfg.num_mtp_layers) for n in MTP_SHARED}
            self.used |= shared & set(reader.keys())

    def groups(self) -> dict[tuple, list[Entry]]:
        """Our parameter path -> the entries (torch tensors, or row ranges of one) it is made of, in order."""
        groups: dict[tuple, list[Entry]] = defaultdict(list)
        for entry in self.entries:
            groups[entry.path].append(entry)
        return groups

    def read(self, entry: Entry, name: str, shape, out_dtype) -> np.ndarray:
        """Torch tensor `name` (dequantized if THUDM int8/int4), checked, in our layout for `shape`."""
        reader = self.reader
        if self.bits and is_quantized(name, self.embeddings):
            w = dequantize_rows(reader.get(name), reader.get(name + "_scale"), self.bits)
            self.used.add(name + "_scale")
        else:
            w = reader.get(name)
        self.used.add(name)
        if entry.rows and w.shape[0] != self.fused_rows[entry.torch_name]:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has {w.shape[0]} rows, expected "
                             f"{self.fused_rows[entry.torch_name]} (fused q/k/v)")
        expected = entry.torch_shape(shape)
        got = w[entry.rows[0]:entry.rows[1]].shape if entry.rows else w.shape
        if tuple(got) != expected:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(w.shape)}, expected "
                             f"{expected} for {self.cfg.name or 'this config'}")
        return entry.to_ours(w, shape).astype(out_dtype)

    def fill(self, out: np.ndarray, group: list[Entry], layer: int | None) -> None:
        """Our array `out` (one layer's slice of a stacked parameter, or a global one) from its torch tensors."""
        for entry in group:
            if layer is not None and entry.torch_layer(layer) in entry.absent:  # a "shared" DSA layer's indexer
                out[...] = 0
                continue
            for e, index, piece in entry.pieces(out.shape):
                name = entry.torch_name.format(i=None if layer is None else entry.torch_layer(layer), e=e)
                out[index] = self.read(entry, name, piece, out.dtype)

    def resolve(self, path: tuple, group: list[Entry]) -> list[Entry] | None:
        """The entries to read for `path`: None for an optional parameter the checkpoint lacks; the fused
        expert layout where the checkpoint has it instead of per-expert tensors."""
        first = group[0]
        probe = first.torch_name.format(i=first.offset, e=0)
        if (path[:1] in HEADS or path == PREFIX) and probe not in self.reader:
            return None  # optional: a checkpoint has lm_head, score or both; a P-tuning prefix only once trained
        if path[-3:] in FUSED_EXPERTS and probe not in self.reader:  # transformers 5's in-memory layout
            fused = fused_experts_entry(first)
            if fused.torch_name.format(i=fused.offset) in self.reader:
                return [fused]
        return group

    def load(self, path: tuple, group: list[Entry], shape, shardings) -> list[tuple[tuple, Any]]:
        """[(our path, device array)] for one parameter: streamed layer by layer onto its sharding when large,
        else assembled on the host (and quantized to int8/int4 when the config asks for it)."""
        group = self.resolve(path, group)
        if group is None:
            return []
        first = group[0]
        out_dtype = np.dtype(first.dtype) if first.dtype else self.dtype
        target = get_path(shardings, path) if shardings is not None else None
        quantize = QUANTIZED_KERNELS.get(path[2:4]) if path[1:2] == ("layers",) and path[-1] == "kernel" else None
        quantize = quantize if self.cfg.quantization_bit else None
        if first.per_layer and not quantize and math.prod(shape) * out_dtype.itemsize > STREAM_MIN_BYTES:
            streamed = _stream_put(shape, out_dtype, target, self._layers(group, shape, out_dtype))
            if streamed is not None:
                return [(path, streamed)]
        buf = np.empty(shape, out_dtype)
        if first.per_layer:
            for j in range(shape[0]):
                self.fill(buf[j], group, j)
        else:
            self.fill(buf, group, None)
        arrays = {path: buf}
        if quantize:
            q, scale = quantize_kernel(buf, quantize, self.cfg.quantization_bit)
            arrays = {path: q, path[:-1] + ("scale",): scale}
        out = []
        for p, arr in arrays.items():
            t = get_path(shardings, p) if shardings is not None else None
            out.append((p, jax.device_put(arr, t) if t is not None else jax.numpy.asarray(arr)))
        return out

    def _layers(self, group: list[Entry], shape, out_dtype):
        for j in range(shape[0]):
            one = np.empty(shape[1:], out_dtype)
            self.fill(one, group, j)
            yield j, one

    def report_unused(self, ckpt_dir) -> None:
        """Logs the checkpoint's tensors that nothing read (MTP layers left out on purpose only at info level)."""
        cfg = self.cfg
        unused = sorted(set(self.reader.keys()) - self.used - set(IGNORED_TORCH_NAMES))
        if cfg.is_moe and not cfg.num_mtp_layers:  # MTP layers left out on purpose (num_mtp_layers=0)
            def layer_of(name):  # model.layers.N.* or (glm5_next) model.language_model.layers.N.*
                parts = name.removeprefix("model.language_model.").removeprefix("model.").split(".")
                return int(parts[1]) if parts[0] == "layers" and parts[1].isdigit() else -1
            mtp = [n for n in unused if layer_of(n) >= cfg.num_layers]
            if mtp:
                log.info("%s: %d MTP layer tensors not loaded (num_mtp_layers=0)", ckpt_dir, len(mtp))
                unused = sorted(set(unused) - set(mtp))
        vision = [n for n in unused if n.startswith(("model.visual.", "visual."))]
        if vision:  # GLM-5.3-Flash's vision tower: glm_jax runs the language model only
            log.warning("%s: %d vision-tower tensors (model.visual.*) not loaded: glm_jax runs the text model only",
                        ckpt_dir, len(vision))
            unused = sorted(set(unused) - set(vision))
        if unused:
            log.warning("%s: %d tensors not loaded, e.g. %s", ckpt_dir, len(unused), ", ".join(unused[:5]))


def save_hf(cfg: GLMConfig, params, out_dir: str | Path, format: str = "transformers", *,
            max_shard_size: int | str = "5GB", dtype: str | None = None, quantization_bit: int | None = None,
            quantize_embeddings: bool = False, progress: bool | None = None) -> Path:
    """Writes `params` as a checkpoint directory that the reference PyTorch code loads.

    format "transformers": transformers' glm / glm4 (GlmForCausalLM, GlmForSequenceClassification), or for a MoE
    config glm4_moe / glm4_moe_lite / glm_moe_dsa (Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM,
    GlmMoeDsaForCausalLM): routed experts per expert as the published checkpoints and transformers 5's
    save_pretrained store them, the fp32 router correction bias, and the MTP layers (model.layers.{num_layers +
    j}.*) when the tree has them.
    format "thudm": THUDM's chatglm layout (fused query_key_value), optionally int8/int4 quantized; ChatGLM-6B's
    with `quantize_embeddings` also its embedding and head (config quantization_embeddings, as chatglm-6b-int4-qe).
    Weights go to safetensors shards of at most `max_shard_size`, with an index when there are several.
    `progress`: a progress bar over the layers on stderr (None: only when stderr is a terminal).
    """
    if format not in ENTRIES:
        raise ValueError(f"unknown checkpoint format {format!r} (expected 'thudm' or 'transformers')")
    if quantization_bit and format != "thudm":
        raise ValueError("quantized checkpoints exist only in the THUDM format (format='thudm')")
    if quantize_embeddings and not (quantization_bit and cfg.position_encoding_2d):
        raise ValueError("quantize_embeddings: quantized embeddings exist only in ChatGLM-6B's THUDM layout, with "
                         "quantization_bit")
    params = _model_params(params)
    params, cfg = stack_layers(params), cfg.replace(scan_layers=True)  # the tensor maps describe the stack
    if cfg.num_mtp_layers and "mtp" not in params["model"]:
        cfg = cfg.replace(num_mtp_layers=0)
    out = Path(out_dir)
    config = _saved_config(cfg, params, format, dtype, quantization_bit)
    if quantize_embeddings:
        config["quantization_embeddings"] = True
    out_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    entries = [e for e in ENTRIES[format](cfg) if e.path[:1] not in HEADS or e.path[0] in params]
    writer = _TensorWriter(cfg, params, entries, out_dtype, quantization_bit, quantize_embeddings)
    created = not out.exists()
    try:
        with progress_bar(progress, total=cfg.num_layers + cfg.num_mtp_layers, desc=f"saving {out.name}",
                          unit="layer") as bar:
            write_safetensors(writer.tensors(bar), out, max_shard_size)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    except BaseException:
        if created:  # no half-written checkpoint left behind; an existing directory is not ours to remove
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _model_params(params) -> dict:
    """The parameter tree save_hf writes: `model.init()`'s output is accepted as it is (its {"params": ...}
    wrapper and the LogicallyPartitioned boxes of the logical axis names removed)."""
    params = nn.unbox(params)
    if isinstance(params, dict) and "model" not in params and isinstance(params.get("params"), dict):
        params = params["params"]  # the whole variables dict of model.init()
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"save_hf: params must be the model's parameter tree ({{'model': ..., 'lm_head': ...}}, "
                         f"what init_params / load_hf return), got {got}")
    return params


def _saved_config(cfg: GLMConfig, params, format: str, dtype: str | None, quantization_bit: int | None) -> dict:
    """config.json of a saved checkpoint: the config's dialect for `format`, the saved dtype, the quantization and
    the classification architecture when the tree has a score head."""
    config = cfg.to_hf_dict(format)
    if dtype:
        config["torch_dtype"] = dtype
    if quantization_bit:
        config["quantization_bit"] = int(quantization_bit)
    if "score" in params:
        if cfg.is_moe:
            raise ValueError("transformers has no sequence-classification model for glm4_moe")
        if format == "thudm":
            raise ValueError("sequence-classification heads are saved in the transformers format only")
        config["architectures"] = ["GlmForSequenceClassification"] + (config["architectures"] if "lm_head" in params else [])
    return config


class _TensorWriter:
    """Our parameter tree as (torch name, numpy tensor) pairs, in the order of the checkpoint: embedding, then layer
    by layer (MTP layers last), then final norm and heads, with one layer in host memory at a time."""

    def __init__(self, cfg: GLMConfig, params, entries: list[Entry], out_dtype, quantization_bit: int | None,
                 embeddings: bool = False):
        self.cfg, self.params, self.out_dtype, self.bits = cfg, params, out_dtype, quantization_bit
        self.embeddings = embeddings  # quantize the embedding and head too (ChatGLM-6B int4-qe)
        # (torch name template, torch layer offset) -> entries: several = row blocks of one fused tensor (THUDM qkv)
        self.by_name: dict[tuple[str, int], list[Entry]] = defaultdict(list)
        for e in entries:
            self.by_name[e.torch_name, e.offset].append(e)
        self.fetched: dict = {}

    def host(self, path, layer):
        """Our array, or one layer's slice of a stack, read from the device once per layer."""
        if (path, layer) not in self.fetched:
            x = get_path(self.params, path)
            self.fetched[path, layer] = np.asarray(jax.device_get(x[layer] if layer is not None else x))
        return self.fetched[path, layer]

    def tensor(self, key, layer: int | None, expert: int | None = None) -> np.ndarray:
        """The torch tensor of `key` (of one layer / expert): its entries' blocks, dequantized if need be."""
        parts = []
        for e in sorted(self.by_name[key], key=lambda e: e.rows or (0, 0)):
            x = self.host(e.path, layer)
            if e.path[-1] == "kernel" and "scale" in get_path(self.params, e.path[:-1]):  # a quantized block linear
                scale = np.asarray(jax.device_get(get_path(self.params, e.path[:-1] + ("scale",))[layer]))
                x = dequantize_kernel(x, scale, QUANTIZED_KERNELS[e.path[2:4]], lead=0)
            x = x[e.index(expert)]
            parts.append(e.to_torch(x.astype(np.dtype(e.dtype) if e.dtype else self.out_dtype)))
        whole = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        heads = self.by_name[key][0].heads
        return head_major_rows(whole, heads, inverse=True) if heads else whole

    def tensors(self, bar):
        """All (name, tensor) pairs; `bar` (a tqdm) advances by one per layer."""
        globals_ = [k for k in self.by_name if "{i}" not in k[0]]
        first = [k for k in globals_ if self.by_name[k][0].path[:2] == ("model", "embed")]
        for key in first:
            yield from self.emit(key[0], self.tensor(key, None))
        for i in range(self.cfg.num_layers + self.cfg.num_mtp_layers):
            yield from self.layer(i)
            for k in [k for k in self.fetched if k[1] is not None]:
                del self.fetched[k]
            bar.update(1)
        for key in (k for k in globals_ if k not in first):
            yield from self.emit(key[0], self.tensor(key, None))

    def emit(self, name: str, w: np.ndarray):
        """(name, tensor) pairs of one torch tensor: int8 / packed int4 and name_scale where THUDM quantizes it."""
        if self.bits and is_quantized(name, self.embeddings):
            q, scale = quantize_rows(w, self.bits)
            yield name, q
            yield name + "_scale", scale
        else:
            yield name, w

    def layer(self, i: int):
        """The tensors of torch layer i (an MTP layer when i >= num_layers), quantized if asked."""
        for key in (k for k in self.by_name if "{i}" in k[0]):
            entry = self.by_name[key][0]
            j, other = divmod(i - key[1], entry.stride)
            if other or not 0 <= j < get_path(self.params, entry.path).shape[0] or i in entry.absent:
                continue  # another stack's layer, or a tensor this layer lacks ("shared" DSA indexer)
            for e in range(get_path(self.params, entry.path).shape[1]) if entry.experts else [None]:
                yield from self.emit(key[0].format(i=i, e=e), self.tensor(key, j, e))
        if i >= self.cfg.num_layers:  # an MTP layer: copies of the model's embedding / head (MTP_SHARED)
            for suffix, (path, kind) in MTP_SHARED.items():
                if path[0] in self.params:
                    yield f"model.layers.{i}.{suffix}", Entry(path, suffix, kind).to_torch(
                        self.host(path, None).astype(self.out_dtype))
