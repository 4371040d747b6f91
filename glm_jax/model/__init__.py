from glm_jax.model.glm import (DecoderBlock, GLMForCausalLM, GLMForSequenceClassification, GLMModel, init_cache,
                               init_params, param_specs, positions_from_segments)

__all__ = ["DecoderBlock", "GLMForCausalLM", "GLMForSequenceClassification", "GLMModel", "init_cache",
           "init_params", "param_specs", "positions_from_segments"]
