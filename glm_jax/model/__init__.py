from glm_jax.model.layers.kv_cache import PagedIndex
from glm_jax.model.glm import (DecoderBlock, GLMForCausalLM, GLMForSequenceClassification, GLMModel, MTPHead, cache_specs,
                               decoding_layout, init_cache, init_paged_cache, init_paged_mtp_cache, init_params, output_head, paged_cache_specs, param_specs, positions_from_segments, stack_layers,
                               unstack_layers)

__all__ = ["PagedIndex", "DecoderBlock", "GLMForCausalLM", "GLMForSequenceClassification", "GLMModel", "MTPHead", "cache_specs", "decoding_layout", "init_cache",
           "init_paged_cache", "init_paged_mtp_cache", "output_head", "paged_cache_specs", "init_params", "param_specs", "positions_from_segments", "stack_layers", "unstack_layers"]
