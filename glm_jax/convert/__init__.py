"""Checkpoint formats: THUDM chatglm and transformers glm/glm4, in (load_hf) and out (save_hf)."""

from glm_jax.convert.hf import detect_format, load_hf, save_hf
from glm_jax.convert.quant import dequantize_rows, quantize_rows
from glm_jax.convert.tensors import CheckpointReader, write_safetensors

__all__ = ["detect_format", "load_hf", "save_hf", "dequantize_rows", "quantize_rows", "CheckpointReader",
           "write_safetensors"]
