"""Model compression beyond quantization: structured pruning (docs/compression.md)."""

from glm_jax.compress.prune import PrunePlan, apply_plan, choose_units, collect_importance

__all__ = ["PrunePlan", "apply_plan", "choose_units", "collect_importance"]
