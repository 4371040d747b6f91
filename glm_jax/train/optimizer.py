"""AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask.

Gradient accumulation is not an optax wrapper here: the train step scans over microbatches and hands the
summed gradient of the whole global batch to the optimizer once (see step.py), so the update equals the
one of a single big batch. Master weights are the parameters themselves, kept in model.param_dtype (float32
for fp32 master weights), while the model computes in model.dtype (e.g. bfloat16).
"""

from __future__ import annotations

import jax
import optax

from glm_jax.train.config import TrainSection

NO_DECAY_NAMES = ("bias", "scale")  # RMSNorm scales and q/k/v biases (stacked over layers, so not 1-D)


def make_schedule(t: TrainSection) -> optax.Schedule:
    warmup = min(t.warmup_steps, t.steps)
    end = t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        decay = optax.constant_schedule(t.lr)
    elif t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(t.lr, max(t.steps - warmup, 1), alpha=t.min_lr_ratio)
    else:
        decay = optax.linear_schedule(t.lr, end, max(t.steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warmup), decay], [warmup])


def decay_mask(params):
    """True for leaves that get weight decay: everything but biases, norm scales and 1-D leaves."""
    def keep(path, x):
        name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
        return not (name in NO_DECAY_NAMES or x.ndim <= 1)

    return jax.tree_util.tree_map_with_path(keep, params)


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", "")))


def frozen_labels(names):
    """params -> "frozen" for the leaves at or under a tree node called one of `names`, else "train"."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if any(_key_name(k) in names for k in path) else "train", params)

    return labels


def make_optimizer(t: TrainSection, frozen: tuple[str, ...] = ()) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """(tx, schedule). tx is AdamW WITHOUT the final learning-rate scaling: the step multiplies its output by
    -lr, with lr = schedule(step) computed on the host and passed in as an argument. This is exactly
    optax.adamw(schedule, ...) (= scale_by_adam, add_decayed_weights, scale_by_learning_rate), but the
    compiled step does not depend on the schedule, so changing steps / lr / warmup reuses the compiled
    program (and its persistent-cache entry).

    frozen: names of parameters or subtrees whose update is zero whatever their gradient, weight decay included,
    and which get no optimizer state (optax.multi_transform): a MoE model's e_score_correction_bias, which the
    step sets by itself, and its MTP layers (model/mtp), which no loss trains yet (docs/training.md, "MoE
    models")."""
    schedule = make_schedule(t)
    parts = []
    if t.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(t.clip_norm))
    parts += [optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
              optax.add_decayed_weights(t.weight_decay, mask=decay_mask)]
    adamw = optax.chain(*parts)
    if not frozen:
        return adamw, schedule
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, frozen_labels(tuple(frozen)))
    return tx, schedule
