from glm_jax.model.glm import (DecoderBlock, GLMForCausalLM, GLMForSequenceClassification, GLMModel, init_cache,
                               init_params, positions_from_segments)

__all__ = ["DecoderBlock", "GLMForCausalLM", "GLMForSequenceClassification", "GLMModel", "init_cache",
           "init_params", "positions_from_segments"]
