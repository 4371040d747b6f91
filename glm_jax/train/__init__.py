"""Training: config (YAML + overrides), data, optimizer, the jitted step, orbax checkpoints and the loop."""

from glm_jax.train.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
