"""Ahead-of-time plans: compile a train step for abstract inputs and read XLA's memory plan and FLOPs.

Nothing is allocated and nothing runs, so the target devices need not be here: with libtpu installed
(`pip install "jax[tpu]"`) a CPU machine compiles for a whole Cloud TPU slice through libtpu's topology
description (what MaxText's train_compile.py does), and the plan is the TPU compiler's own. This answers "does
this configuration fit, and what does a lever change" before hardware is booked:

    python train.py --config configs/chatglm3-6b-pretrain-tpu.yaml --compile-only --topology v5p-128

Peak estimate = arguments + outputs + temporaries - donated (aliased) buffers, per device.
XLA's cost analysis counts a while-loop body once, so compiled FLOPs are only complete when the layer scan is
unrolled (GLMConfig.scan_unroll = num_layers).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from flax import linen as nn

from glm_jax import param_shardings, param_specs
from glm_jax.sharding import use_mesh
from glm_jax.train import data as D
from glm_jax.train.build import ModelParts, build_model, trainable_layout
from glm_jax.train.config import Config, ConfigError
from glm_jax.train.exit_codes import ExitCode
from glm_jax.train.metrics import lookup_device
from glm_jax.train.step import batch_shardings, make_state, state_shardings

GiB = 2**30

# Cloud TPU slices: name -> (topology, chip config, chips per host); `gcloud compute tpus accelerator-types list`.
TPU_TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)), "v4-16": ("v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)), "v4-64": ("v4:2x4x4", "megacore", (2, 2, 1)),
    "v4-128": ("v4:4x4x4", "megacore", (2, 2, 1)), "v4-256": ("v4:4x4x8", "megacore", (2, 2, 1)),
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1)), "v5p-16": ("v5:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1)), "v5p-64": ("v5:2x4x4", "megacore", (2, 2, 1)),
    "v5p-128": ("v5:4x4x4", "megacore", (2, 2, 1)), "v5p-256": ("v5:4x4x8", "megacore", (2, 2, 1)),
    "v5p-512": ("v5:4x8x8", "megacore", (2, 2, 1)), "v5p-1024": ("v5:8x8x8", "megacore", (2, 2, 1)),
    # v5e (v5litepod) and v6e (Trillium): one device per chip, 2-D torus; -N = N chips
    **{f"{gen}-{x * y}": (f"{gen}:{x}x{y}", "default", (2, 2, 1))
       for gen in ("v5e", "v6e") for x, y in ((2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))},
}

# Memory per device (bytes) by device kind, longest match first: HBM per TPU chip / GPU, from the spec sheets.
DEVICE_MEMORY = {
    "tpu v4": 32 * GiB, "tpu v5 lite": 16 * GiB, "tpu v5e": 16 * GiB, "tpu v5p": 95e9, "tpu v5": 95e9,
    "tpu v6 lite": 32 * GiB, "tpu v6e": 32 * GiB, "h100": 80 * GiB, "h200": 141e9, "a100": 80 * GiB,
}


def device_memory(device_kind: str) -> float | None:
    return lookup_device(DEVICE_MEMORY, device_kind)


def topology_devices(name: str):
    """The devices of a Cloud TPU slice that is not here (compile-only), from libtpu's topology description."""
    if name not in TPU_TOPOLOGIES:
        raise ConfigError(f"--topology {name}: unknown TPU slice; known: {', '.join(TPU_TOPOLOGIES)}")
    try:
        from jax.experimental.topologies import get_topology_desc

        topo, chip, host = TPU_TOPOLOGIES[name]
        return get_topology_desc(platform="tpu", topology_name=topo, chip_config_name=chip,
                                 chips_per_host_bounds=host, num_slices=1).devices
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise ConfigError(f"--topology {name}: cannot describe the slice ({type(e).__name__}: {msg}); compiling "
                            f"for a TPU slice needs libtpu: pip install \"jax[tpu]\"") from None


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying `shardings` for a tree of arrays / ShapeDtypeStructs."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_plan(jitted, *args) -> dict:
    """Compiles `jitted` for abstract `args` (ShapeDtypeStructs with shardings). Sizes in GiB per device."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    plan = {"compile_s": time.perf_counter() - t}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older jax
    plan["hlo_flops"] = float(cost.get("flops", 0.0)) if cost else None
    mem = compiled.memory_analysis()
    if mem is not None:
        plan.update(args_gib=mem.argument_size_in_bytes / GiB, out_gib=mem.output_size_in_bytes / GiB,
                    temp_gib=mem.temp_size_in_bytes / GiB, alias_gib=mem.alias_size_in_bytes / GiB)
        plan["peak_gib"] = plan["args_gib"] + plan["out_gib"] + plan["temp_gib"] - plan["alias_gib"]
    return plan


def format_plan(plan: dict, device_kind: str, num_devices: int, model_flops_per_device: float | None = None,
                unrolled: bool = False) -> str:
    """A markdown table row block for `plan` (what train.py --compile-only and the benchmark print)."""
    f = lambda k: f"{plan[k]:.4g}" if plan.get(k) is not None else "n/a"  # noqa: E731
    cap = device_memory(device_kind)
    ratio = (plan["hlo_flops"] / model_flops_per_device
             if unrolled and plan.get("hlo_flops") and model_flops_per_device else None)
    lines = [f"compiled for {num_devices} x {device_kind} (nothing run)",
             "| compile (s) | args (GiB) | outputs (GiB) | temps (GiB) | donated (GiB) | peak est. (GiB) "
             "| device memory (GiB) | HLO / model FLOPs |",
             "|---|---|---|---|---|---|---|---|",
             f"| {plan['compile_s']:.1f} | {f('args_gib')} | {f('out_gib')} | {f('temp_gib')} | {f('alias_gib')} "
             f"| {f('peak_gib')} | {f'{cap / GiB:.1f}' if cap else 'n/a'} | {f'{ratio:.2f}' if ratio else 'n/a'} |"]
    if not unrolled:
        lines.append("(compiled FLOPs need the layer scan unrolled: XLA counts a loop body once)")
    return "\n".join(lines)


def fits(plan: dict, device_kind: str) -> bool | None:
    cap = device_memory(device_kind)
    if cap is None or plan.get("peak_gib") is None:
        return None
    return plan["peak_gib"] * GiB <= cap


# ---------------------------------------------------------------------------------------------- --compile-only

def compile_only(cfg: Config, topology: str | None = None) -> ExitCode:
    """`train.py --compile-only`: compiles the configured train step for abstract inputs on this machine's
    devices or, with `topology`, on a Cloud TPU slice described by libtpu, and prints XLA's memory plan per
    device. Reads no data and no checkpoint (model.init_from: its config.json only). Returns OK, or NO_FIT
    when the plan exceeds the device's memory."""
    parts = build_model(cfg, topology_devices(topology) if topology else None)
    t, dc, model_cfg, mesh = cfg.train, cfg.data, parts.model_cfg, parts.mesh
    kind = mesh.devices.flat[0].device_kind
    print(f"model: {model_cfg.name or type(parts.model).__name__}, {model_cfg.num_params() / 1e9:.2f}B parameters, "
          f"{model_cfg.num_layers} layers, remat {model_cfg.remat_policy}, attention {model_cfg.attention_impl}; "
          f"mode {t.mode}; batch {t.global_batch_size} x {dc.seq_len} in {t.grad_accum} microbatch(es); "
          f"mesh {dict(mesh.shape)} over {mesh.devices.size} x {kind}", flush=True)
    state, s_shard, frozen, frozen_shard, batch, hyper = abstract_step_inputs(cfg, parts)
    with use_mesh(mesh):
        try:
            step = parts.builder.jit_train(s_shard, frozen_shard, {k: v.sharding for k, v in batch.items()})
            result = compile_plan(step, state, frozen, batch, hyper)
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a plan over HBM instead of returning it
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            return ExitCode.NO_FIT
    flops = model_cfg.flops_per_token(dc.seq_len) * t.global_batch_size * dc.seq_len / mesh.devices.size
    print(format_plan(result, kind, mesh.devices.size, flops, model_cfg.scan_unroll >= model_cfg.num_layers))
    if fits(result, kind) is False:
        print(f"error: the step needs {result['peak_gib']:.1f} GiB per device, more than the "
              f"{device_memory(kind) / GiB:.1f} GiB of a {kind}", file=sys.stderr, flush=True)
        return ExitCode.NO_FIT
    return ExitCode.OK


def abstract_step_inputs(cfg: Config, parts: ModelParts):
    """(state, its shardings, frozen parameters, their shardings, batch, hyper-parameters) of the train step as
    abstract values carrying their shardings: what the compiler needs, without data or parameters."""
    t, dc, mesh, tx = cfg.train, cfg.data, parts.mesh, parts.builder.tx
    trainable, train_shard, frozen, frozen_shard = trainable_layout(cfg, parts.boxed, parts.p_shard, mesh)
    if parts.builder.teacher is not None:  # the distillation teacher: frozen, in the same step (build.load_teacher)
        teacher_specs = param_specs(parts.builder.teacher)
        frozen = {**frozen, "teacher": nn.unbox(teacher_specs)}
        frozen_shard = {**frozen_shard, "teacher": param_shardings(teacher_specs, mesh)}
    abstract_state = jax.eval_shape(lambda p: make_state(p, tx, t.seed), trainable)
    s_shard = state_shardings(abstract_state, train_shard, tx, mesh)
    micro = t.global_batch_size // t.grad_accum
    spec = D.example_spec(dc.task, dc.seq_len, cfg.embedding.negatives, dc.objective, len(cfg.cloze.verbalizer))
    shapes = {k: (t.grad_accum, micro) + sh for k, (sh, _) in spec.items()}
    b_shard = batch_shardings(mesh, {k: np.zeros(s, np.int8) for k, s in shapes.items()}, microbatched=True)
    batch = {k: jax.ShapeDtypeStruct(shapes[k], np.dtype(spec[k][1]), sharding=b_shard[k]) for k in shapes}
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    hyper = {"lr": jax.ShapeDtypeStruct((), np.float32, sharding=repl),
             "skip_nonfinite": jax.ShapeDtypeStruct((), np.bool_, sharding=repl)}
    return (abstract(abstract_state, s_shard), s_shard, abstract(frozen, frozen_shard), frozen_shard, batch,
            hyper)
