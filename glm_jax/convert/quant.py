"""THUDM's weight-only quantization scheme (ChatGLM `quantization_bit` 4 / 8).

Per output row, symmetric: scale = max|W_row| / (2^(bits-1) - 1), q = round(W / scale) as int8.
int4 packs two values per byte, high nibble first: byte = (q[2i] << 4) | (q[2i+1] & 0xF).
Stored as `<name>.weight` int8 [out, in * bits / 8] and `<name>.weight_scale` [out].
"""

from __future__ import annotations

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
