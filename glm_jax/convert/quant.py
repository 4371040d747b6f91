"""THUDM's weight-only quantization scheme (ChatGLM `quantization_bit` 4 / 8).

Per output row, symmetric: scale = max|W_row| / (2^(bits-1) - 1), q = round(W / scale) as int8.
int4 packs two values per byte, high nibble first: byte = (q[2i] << 4) | (q[2i+1] & 0xF).
Stored as `<name>.weight` int8 [out, in * bits / 8] and `<name>.weight_scale` [out].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def quantize_rows(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] float -> (packed int8 [out, in*bits/8], scale [out] in w's dtype)."""
    if bits not in (4, 8):
        raise ValueError(f"quantization_bit must be 4 or 8, got {bits}")
    w32 = np.asarray(w, np.float32)
    scale = np.abs(w32).max(axis=-1) / (2 ** (bits - 1) - 1)
    scale = scale.astype(w.dtype)  # THUDM keeps the scale in the weight dtype; quantize with that rounded value
    safe = np.where(scale.astype(np.float32) == 0, 1.0, scale.astype(np.float32))
    q = np.round(w32 / safe[:, None]).astype(np.int8)
    if bits == 4:
        if q.shape[-1] % 2:
            raise ValueError(f"int4 packing needs an even input dimension, got {q.shape[-1]}")
        q = ((q[:, 0::2].astype(np.uint8) << 4) | (q[:, 1::2].astype(np.uint8) & 0xF)).view(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray, bits: int, dtype=np.float32) -> np.ndarray:
    """Inverse of quantize_rows: packed int8 + per-row scale -> float [out, in]."""
    if bits not in (4, 8):
        raise ValueError(f"quantization_bit must be 4 or 8, got {bits}")
    q = np.asarray(q).view(np.int8)
    if bits == 4:
        high = q >> 4  # arithmetic shift on int8 sign-extends
        low = (q << 4).astype(np.int8) >> 4
        q = np.stack([high, low], axis=-1).reshape(q.shape[0], -1)
    return (q.astype(np.float32) * np.asarray(scale, np.float32)[:, None]).astype(dtype)


# Our block linears' kernels: path inside model/layers -> number of input axes (after the leading layer axis).
QUANTIZED_KERNELS = {("attention", "query"): 1, ("attention", "key"): 1, ("attention", "value"): 1,
                     ("attention", "out"): 2, ("mlp", "wi"): 1, ("mlp", "wo"): 1}


def quantize_kernel(kernel, n_in: int, bits: int, lead: int = 1):
    """Our [layers, in..., out...] kernel -> (int8/int4 kernel, scale [layers, out...]), THUDM's per-output scheme.

    Works on numpy arrays (host, while loading) and jax arrays (on device, keeping their sharding).
    """
    xp = np if isinstance(kernel, np.ndarray) else jnp
    axes = tuple(range(lead, lead + n_in))
    k32 = kernel.astype(np.float32)
    scale = xp.max(xp.abs(k32), axis=axes) / (2 ** (bits - 1) - 1)
    safe = xp.where(scale == 0, 1.0, scale)
    q = xp.round(k32 / xp.expand_dims(safe, axes)).astype(np.int8 if bits == 8 else jnp.int4)
    return q, scale.astype(kernel.dtype)


def dequantize_kernel(kernel, scale, n_in: int, lead: int = 1):
    """Inverse of quantize_kernel (float32)."""
    return kernel.astype(np.float32) * np.expand_dims(np.asarray(scale, np.float32), tuple(range(lead, lead + n_in)))


def quantize_params(cfg, params, bits: int):
    """A float model -> (cfg with quantization_bit=bits, params with int8/int4 block kernels + scales)."""
    if cfg.quantization_bit:
        raise ValueError(f"the model is already quantized to {cfg.quantization_bit} bits")
    if cfg.is_moe:
        raise ValueError("weight-only quantization is not implemented for MoE models")
    model = dict(params["model"])
    # the stacked blocks (leading layer axis), or one subtree per block (GLMConfig.scan_layers=False)
    for key, lead in [("layers", 1)] if "layers" in model else [(k, 0) for k in model if k.startswith("layers_")]:
        layers = dict(model[key])
        for (group, name), n_in in QUANTIZED_KERNELS.items():
            sub = dict(layers[group])
            leaf = dict(sub[name])
            leaf["kernel"], leaf["scale"] = quantize_kernel(leaf["kernel"], n_in, bits, lead)
            sub[name] = leaf
            layers[group] = sub
        model[key] = layers
    return cfg.replace(quantization_bit=bits), {**params, "model": model}
