"""The glm4_moe MoE layer: glm_jax's expert paths vs transformers' Glm4MoeMoE, same weights, same shape, same run.

    python benchmarks/moe.py                              # small CPU shape (below), every path, fwd and fwd+bwd
    python benchmarks/moe.py --shape glm-4.5-air          # GLM-4.5-Air's expert layer (GLMConfig preset), bf16
    python benchmarks/moe.py --tokens 2048 8 --experts 64 --top-k 4 --hidden 512 --intermediate 256
    python benchmarks/moe.py --tiny --json out.json       # smoke test of the script (tests/test_benchmarks.py)

One layer = router + routed experts + shared expert (glm_jax.model.layers.moe.MoE on [1, tokens, hidden]).
Rows, per token count (best of --iters after two warm-up calls, each call blocked until done; the JSON has the
median too: on a shared CPU the best is the stable figure):
  glm_jax ragged       tokens sorted by expert, one jax.lax.ragged_dot per projection (GLMConfig.moe_impl)
  glm_jax gather       each (token, expert) pair multiplies its expert's gathered weights (decode path; skipped
                       when the gathered weight copies exceed --max-gather-gib)
  glm_jax dense        every expert on every token (the test reference: E / top_k times the routed work)
  transformers eager   Glm4MoeMoE with the per-expert Python loop (config._experts_implementation "eager")
  transformers grouped_mm / batched_mm   the same module with transformers' other expert kernels
"fwd" is the layer's forward; "fwd+bwd" is value-and-grad of sum(out * dout) w.r.t. the input and all weights
(torch: out.backward(dout)). tokens/s = tokens / time; TFLOP/s counts the useful work only (router, top_k
routed experts and the shared experts per token, x3 for fwd+bwd). err = ||out - ref|| / ||ref|| (Frobenius)
against transformers eager in float32 on the same (rounded) weights.

The dense-work check. A dot over ALL experts for every token does at least 2 * T * E * H * I FLOPs (T tokens,
E experts, hidden H, moe_intermediate I: the down projection of the dense path), while every routed dot does at
most 4 * T * k * H * I (k = top_k; the fused gate/up projection), so with E > 2k a single dot at or above the
dense bound is an expansion over all experts. The check reads (a) the optimized HLO of the compiled layer on the
run device (dot instructions, cuBLAS / oneDNN matmul custom calls, dots inside fusions; FLOPs from their shapes
and contracting dimensions), fwd and fwd+bwd, and (b) the StableHLO JAX emits before XLA for the run platform
and, from a CPU run, for cuda and tpu (no device needed), counting the ragged_dot ops it contains. JAX 0.10 lowers
ragged_dot on CPU by expanding every group over all experts (jax/_src/lax/lax.py, _ragged_dot_general_impl) and
emits chlo.ragged_dot only for GPU and TPU, so on CPU the ragged path's HLO shows the dense dot; (b) shows what
the accelerators' compilers receive. The dense path must show the dense dot everywhere: the check can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

# Leave GPU memory to PyTorch, which runs in the same process between JAX's rows.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax import GLMConfig  # noqa: E402
from glm_jax.model.layers.moe import MoE  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# row name -> (GLMConfig.moe_impl, JAX config flags set while it compiles). ragged-triton (asked for by name only):
# JAX's Pallas Triton lowering of ragged_dot on GPU instead of chlo.ragged_dot for XLA; jax 0.10.2's wheel lacks
# the module the flag imports (jax._src.lax.pallas_lowerings), so there the row reports that error.
JAX_IMPLS = {"ragged": ("ragged", {}), "gather": ("gather", {}), "dense": ("dense", {}),
             "ragged-triton": ("ragged", {"jax_ragged_dot_use_gpu_pallas_triton_lowering": True})}


def air_shape() -> dict:
    """GLM-4.5-Air's expert layer, read from the preset (glm_jax/config.py, sources cited there)."""
    c = GLMConfig.from_preset("glm-4.5-air")
    return dict(hidden=c.hidden_size, intermediate=c.moe_intermediate_size, experts=c.n_routed_experts,
                top_k=c.num_experts_per_tok, shared=c.n_shared_experts, n_group=c.n_group, topk_group=c.topk_group,
                scaling=c.routed_scaling_factor, tokens=[4096, 8], dtype="bfloat16")


SHAPES = {
    # E / k = 8 like the real models' 16-20 (routed work << dense work), small enough for 2 CPU cores
    "small": dict(hidden=256, intermediate=128, experts=16, top_k=2, shared=1, n_group=1, topk_group=1, scaling=1.0,
                  tokens=[1024, 4], dtype="float32"),
    "tiny": dict(hidden=32, intermediate=16, experts=8, top_k=2, shared=1, n_group=2, topk_group=1, scaling=1.5,
                 tokens=[32], dtype="float32"),
}


# ----------------------------------------------------------------------------------------------- weights


def make_weights(s: dict, seed: int = 0) -> dict:
    """Random weights in transformers' layout (Glm4MoeMoE state dict names), float32."""
    rng = np.random.default_rng(seed)  # float32 draws: the GLM-4.5-Air experts are 2.2G values
    h, i, e, f = s["hidden"], s["intermediate"], s["experts"], s["intermediate"] * s["shared"]
    n = lambda *shape, fan: rng.standard_normal(shape, np.float32) * np.float32(fan ** -0.5)  # noqa: E731
    return {"gate.weight": n(e, h, fan=h), "gate.e_score_correction_bias": n(e, fan=1e4),
            "experts.gate_up_proj": n(e, 2 * i, h, fan=h), "experts.down_proj": n(e, h, i, fan=i),
            "shared_experts.gate_proj.weight": n(f, h, fan=h), "shared_experts.up_proj.weight": n(f, h, fan=h),
            "shared_experts.down_proj.weight": n(h, f, fan=f)}


def round_to(w: dict, dtype) -> dict:
    """Every weight rounded to the benchmark dtype (kept float32), so both stacks hold the same values."""
    return {k: v if k.endswith("bias") else v.astype(dtype).astype(np.float32) for k, v in w.items()}


def jax_params(w: dict, s: dict, dtype) -> dict:
    """transformers' tensors -> MoE's parameter tree (layouts in glm_jax/model/layers/moe.py's docstring)."""
    e, i, h = s["experts"], s["intermediate"], s["hidden"]
    gate_up = w["experts.gate_up_proj"].reshape(e, 2, i, h).transpose(0, 3, 1, 2)  # [E, H, 2, I], gate first
    shared_wi = np.stack([w["shared_experts.gate_proj.weight"].T, w["shared_experts.up_proj.weight"].T], axis=1)
    c = lambda x: np.ascontiguousarray(x).astype(dtype)  # noqa: E731  (host arrays: device_put places them)
    return {"router": {"kernel": c(w["gate.weight"].T), "e_score_correction_bias": w["gate.e_score_correction_bias"]},
            "experts": {"wi": c(gate_up), "wo": c(w["experts.down_proj"].transpose(0, 2, 1))},
            "shared_experts": {"wi": {"kernel": c(shared_wi)},
                               "wo": {"kernel": c(w["shared_experts.down_proj.weight"].T)}}}


def moe_module(s: dict, impl: str, dtype) -> MoE:
    return MoE(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_experts=s["experts"],
               top_k=s["top_k"], n_shared_experts=s["shared"], n_group=s["n_group"], topk_group=s["topk_group"],
               norm_topk_prob=True, routed_scaling_factor=s["scaling"], impl=impl, dtype=dtype, param_dtype=dtype)


def useful_flops(s: dict, tokens: int) -> float:
    """Forward FLOPs that a token's routing asks for: router, k routed + shared SwiGLU experts."""
    h, i = s["hidden"], s["intermediate"]
    return tokens * (2 * h * s["experts"] + 6 * h * i * (s["top_k"] + s["shared"]))


# ----------------------------------------------------------------------------------------------- timing


def timed(fn, iters: int, sync=jax.block_until_ready) -> tuple[float, float]:
    """(best, median) seconds of `fn()` after two warm-up calls; `sync` blocks on its result."""
    sync(fn())
    sync(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def rel_err(a, ref) -> float | None:
    if ref is None:
        return None
    a, ref = np.asarray(a, np.float32).ravel(), np.asarray(ref, np.float32).ravel()
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------------------------- dense-work check

_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.+?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HLO_ARRAY = re.compile(r"\b[a-z][a-z0-9]*\[([0-9,]*)\]")
_SHLO_DOT = re.compile(r"contracting_dims = \[([0-9, ]*)\] x .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> "
                       r"(tensor<[^>]*>)")


def _dims(text: str) -> list[int] | None:
    m = _HLO_ARRAY.search(text)
    return [int(d) for d in m.group(1).split(",") if d] if m else None


def _operands(rest: str) -> str:
    """The text inside an instruction's operand parentheses (rest = what follows `opcode(`)."""
    depth = 1
    for n, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:n]
    return rest


def hlo_dots(text: str) -> tuple[list[tuple[float, str]], int]:
    """(FLOPs, instruction) of every matmul in optimized HLO text, and the number of ragged-dot instructions."""
    shapes, found, ragged = {}, [], 0
    for line in text.splitlines():
        m = _HLO_INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = _dims(shape)
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        ragged += op == "ragged-dot" or bool(target and re.search("ragged|grouped", target.group(1)))
        if not (op in ("dot", "ragged-dot") or op == "custom-call" and target
                and re.search("gemm|matmul", target.group(1))):
            continue
        ops = _operands(rest)
        inline = [[int(d) for d in g.split(",") if d] for g in _HLO_ARRAY.findall(ops)]
        names = re.findall(r"%([^\s,)]+)", ops)
        lhs = inline[0] if len(inline) >= len(names) and inline else shapes.get(names[0]) if names else None
        c = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}|"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
        out = _dims(shape)
        if lhs is None or c is None or out is None:
            continue
        contract = [int(d.strip('"')) for d in (c.group(1) or c.group(2) or "").split(",") if d.strip('"')]
        flops = 2.0 * np.prod(out, dtype=np.float64) * np.prod([lhs[d] for d in contract], dtype=np.float64)
        found.append((flops, f"{op} {shape.split('{')[0].lstrip('(')} <- lhs {lhs}, contracting {contract}"))
    return found, ragged


def stablehlo_dots(text: str) -> tuple[list[tuple[float, str]], int]:
    """(FLOPs, op) of every stablehlo.dot_general in StableHLO text, and the number of ragged_dot ops."""
    found = []
    for line in text.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        m = _SHLO_DOT.search(line)
        if not m:
            continue
        dims = lambda t: [int(d) for d in t[len("tensor<"):-1].split("x")[:-1]]  # noqa: E731
        lhs, out = dims(m.group(2)), dims(m.group(4))
        contract = [int(d) for d in m.group(1).split(",") if d.strip()]
        flops = 2.0 * np.prod(out, dtype=np.float64) * np.prod([lhs[d] for d in contract], dtype=np.float64)
        found.append((flops, f"dot_general {m.group(2)} x {m.group(3)} -> {m.group(4)}"))
    return found, len(re.findall(r"ragged_dot\"?\(", text))


def dense_verdict(dots: list[tuple[float, str]], ragged: int, s: dict, tokens: int) -> dict:
    """Dots at or above the all-experts bound 2*T*E*H*I (module docstring): their count and the largest one."""
    bound = 2.0 * tokens * s["experts"] * s["hidden"] * s["intermediate"]
    dense = sorted((d for d in dots if d[0] >= bound), reverse=True)
    top = max(dots, default=(0.0, ""))
    return {"dense_dots": len(dense), "dots": len(dots), "ragged_ops": ragged, "largest_vs_bound": top[0] / bound,
            "largest": (dense[0] if dense else top)[1], "valid": s["experts"] > 2 * s["top_k"]}


def verdict_cell(v: dict | None) -> str:
    if v is None:
        return "-"
    if not v["valid"]:
        return "n/a (needs experts > 2 top_k)"
    ragged = f", {v['ragged_ops']} ragged_dot" if v["ragged_ops"] else ""
    if v["dense_dots"]:
        return f"DENSE: {v['dense_dots']} of {v['dots']} dots, largest {v['largest_vs_bound']:.1f}x bound{ragged}"
    return f"none ({v['dots']} dots, largest {v['largest_vs_bound']:.2f}x bound{ragged})"


# ----------------------------------------------------------------------------------------------- glm_jax


def layer_fns(module) -> dict:
    """The layer's jitted forward and value-and-grad of sum(out * dout) w.r.t. (params, x)."""
    def fwd(params, x):
        return module.apply({"params": params}, x)

    def loss(params, x, dout):
        return jnp.sum(fwd(params, x).astype(jnp.float32) * dout)

    return {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))}


def stablehlo_checks(fn, fargs, s: dict, tokens: int, platforms) -> dict:
    """The dense-work verdict on the StableHLO JAX emits for each platform (lowered only: no device needed)."""
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), fargs)
    out = {}
    for p in platforms:
        try:
            text = fn.trace(*specs).lower(lowering_platforms=(p,)).as_text()
            out[p] = dense_verdict(*stablehlo_dots(text), s, tokens)
        except Exception as e:  # a platform this jax cannot lower for: say so, keep going
            out[p] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return out


@contextlib.contextmanager
def jax_flags(flags: dict):
    old = {k: getattr(jax.config, k) for k in flags}
    try:
        for k, v in flags.items():
            jax.config.update(k, v)
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)


def bench_jax_impl(s: dict, impl: str, params, x, dout, iters: int, ref, platforms) -> tuple[dict, dict]:
    """One row (fwd and fwd+bwd timings, errors) and the dense-work checks of one expert path."""
    tokens = x.shape[1]
    moe_impl, flags = JAX_IMPLS[impl]
    fns = layer_fns(moe_module(s, moe_impl, x.dtype))
    row, check = {"impl": f"glm_jax {impl}", "tokens": tokens}, {"impl": f"glm_jax {impl}", "tokens": tokens}
    for mode, fargs in (("fwd", (params, x)), ("fwd+bwd", (params, x, dout))):
        t = time.perf_counter()
        with jax_flags(flags):
            compiled = fns[mode].lower(*fargs).compile()
            row[f"{mode} compile_s"] = time.perf_counter() - t
            check[f"hlo {mode}"] = dense_verdict(*hlo_dots(compiled.as_text()), s, tokens)
            check[f"stablehlo {mode}"] = stablehlo_checks(fns[mode], fargs, s, tokens, platforms)
        result = compiled(*fargs)
        best, median = timed(lambda: compiled(*fargs), iters)
        row[f"{mode} ms"], row[f"{mode} median ms"] = best * 1e3, median * 1e3
        if mode == "fwd":
            row["err out"] = rel_err(result, ref and ref["out"])
        else:
            row["err dx"] = rel_err(result[1][1], ref and ref["dx"])
    return row, check


# ----------------------------------------------------------------------------------------------- transformers


def torch_module(s: dict, w: dict, impl: str, dtype: str, device: str):
    """transformers' Glm4MoeMoE with weights `w` and expert kernel `impl`."""
    import torch
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = Glm4MoeConfig(hidden_size=s["hidden"], moe_intermediate_size=s["intermediate"],
                        n_routed_experts=s["experts"], num_experts_per_tok=s["top_k"], n_shared_experts=s["shared"],
                        n_group=s["n_group"], topk_group=s["topk_group"], norm_topk_prob=True,
                        routed_scaling_factor=s["scaling"], hidden_act="silu")
    cfg._experts_implementation = impl
    module = Glm4MoeMoE(cfg)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    module = module.to(device=device, dtype=getattr(torch, dtype))
    bias = torch.from_numpy(w["gate.e_score_correction_bias"]).to(device)
    module.gate.e_score_correction_bias.data = bias  # fp32 whatever the dtype, as ours
    return module


def torch_calls(module, x_np, dout_np, device: str) -> dict:
    """The module's forward (no_grad) and forward + backward (grads of x and every weight), each synchronised."""
    import torch

    dtype = next(module.parameters()).dtype
    x = torch.tensor(x_np, dtype=dtype, device=device).requires_grad_(True)
    dout = torch.tensor(dout_np, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fwd():
        with torch.no_grad():
            out = module(x)
        sync()
        return out

    def fwd_bwd():
        for p in [x, *module.parameters()]:
            p.grad = None
        module(x).backward(dout)
        sync()
        return x.grad

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def torch_reference(s: dict, w: dict, x_np, dout_np, device: str) -> dict:
    """transformers eager in float32: the output and d(sum(out * dout))/dx every row is compared with."""
    calls = torch_calls(torch_module(s, w, "eager", "float32", device), x_np, dout_np, device)
    return {"out": calls["fwd"]().float().cpu().numpy(), "dx": calls["fwd+bwd"]().float().cpu().numpy()}


def bench_torch_impl(s: dict, w: dict, impl: str, x_np, dout_np, dtype: str, device: str, iters: int, ref) -> dict:
    calls = torch_calls(torch_module(s, w, impl, dtype, device), x_np, dout_np, device)
    row = {"impl": f"transformers {impl}", "tokens": x_np.shape[1]}
    for mode, fn in calls.items():
        result = fn().float().cpu().numpy()
        best, median = timed(fn, iters, sync=lambda _: None)
        row[f"{mode} ms"], row[f"{mode} median ms"] = best * 1e3, median * 1e3
        row["err out" if mode == "fwd" else "err dx"] = rel_err(result, ref and ref["out" if mode == "fwd" else "dx"])
    return row


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["small", "glm-4.5-air", "tiny"], default="small",
                    help="small: a CPU shape; glm-4.5-air: the preset's expert layer; tiny: the smoke test")
    ap.add_argument("--tiny", action="store_true", help="= --shape tiny --iters 1 (tests/test_benchmarks.py)")
    for name in ("hidden", "intermediate", "experts", "top-k", "shared"):
        ap.add_argument(f"--{name}", type=int, help=f"override the shape's {name}")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (one row set each)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: the shape's (float32 small, bfloat16 air)")
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                    help="auto: the GPU when JAX has one (and torch CUDA then), else the CPU")
    ap.add_argument("--impls", nargs="+", choices=sorted(JAX_IMPLS),
                    help="glm_jax rows (default ragged gather dense)")
    ap.add_argument("--torch-impls", nargs="+", default=["eager", "grouped_mm"],
                    choices=["eager", "grouped_mm", "batched_mm"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--max-gather-gib", type=float, default=4.0,
                    help="skip the gather path when its per-token expert weight copies exceed this")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write header, rows and checks here")
    args = ap.parse_args(argv)
    if args.tiny:  # the fp32 eager reference runs anyway; one kernel row keeps the smoke test short
        args.shape, args.iters = "tiny", 1
        args.torch_impls = ["grouped_mm"] if args.torch_impls == ap.get_default("torch_impls") else args.torch_impls
    s = dict(air_shape() if args.shape == "glm-4.5-air" else SHAPES[args.shape])
    for name in ("hidden", "intermediate", "experts", "top_k", "shared"):
        if getattr(args, name) is not None:
            s[name] = getattr(args, name)
    s["tokens"] = args.tokens or s["tokens"]
    s["dtype"] = args.dtype or s["dtype"]
    if s["n_group"] > 1 and s["experts"] % s["n_group"]:
        s["n_group"] = s["topk_group"] = 1
    return args, s


def pick_devices(choice: str, no_torch: bool):
    """(JAX device, torch device or None): the GPU when asked for or (auto) when JAX has one."""
    platform = ("gpu" if jax.default_backend() == "gpu" else "cpu") if choice == "auto" else choice
    jdev = jax.devices(platform)[0]
    if no_torch:
        return jdev, None
    try:
        import torch
        import transformers  # noqa: F401  (Glm4MoeMoE comes from it)
    except ImportError:
        return jdev, None
    if platform == "gpu":
        return jdev, "cuda" if torch.cuda.is_available() else None
    return jdev, "cpu"


def header(jdev, tdev, s: dict) -> dict:
    h = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "jax_device": f"{jdev.platform} {jdev.device_kind}", "jax": jax.__version__, "cpus": os.cpu_count(),
         "load_avg_1min": round(os.getloadavg()[0], 2),
         "torch_device": tdev, "shape": s}
    if tdev:
        import torch
        import transformers
        h.update(torch=torch.__version__, transformers=transformers.__version__,
                 torch_device_name=torch.cuda.get_device_name() if tdev == "cuda" else "cpu",
                 torch_threads=torch.get_num_threads())
    return h


def run_tokens(s: dict, w: dict, params, tokens: int, args, jdev, tdev, platforms) -> tuple[list, list]:
    """Every row and check at one token count."""
    dtype = DTYPES[s["dtype"]]
    rng = np.random.default_rng(tokens)
    x_np, dout_np = (rng.standard_normal((1, tokens, s["hidden"]), np.float32).astype(dtype).astype(np.float32)
                     for _ in range(2))
    ref = torch_reference(s, w, x_np, dout_np, tdev) if tdev else None
    x, dout = jax.device_put(x_np.astype(dtype), jdev), jax.device_put(dout_np, jdev)
    rows, checks = [], []
    gather_gib = tokens * s["top_k"] * 3 * s["hidden"] * s["intermediate"] * jnp.dtype(dtype).itemsize / 2**30
    for impl in args.impls:
        if JAX_IMPLS[impl][0] == "gather" and gather_gib > args.max_gather_gib:
            rows.append({"impl": "glm_jax gather", "tokens": tokens,
                         "skipped": f"gathers {gather_gib:.3g} GiB of expert weights (> --max-gather-gib)"})
            continue
        try:
            row, check = bench_jax_impl(s, impl, params, x, dout, args.iters, ref, platforms)
            rows.append(row)
            checks.append(check)
        except Exception as e:  # e.g. out of memory: say which and why, keep going
            rows.append({"impl": f"glm_jax {impl}", "tokens": tokens, "error": f"{type(e).__name__}: {e}"[:300]})
        print(rows[-1], flush=True)
    for impl in args.torch_impls if tdev else []:
        try:
            rows.append(bench_torch_impl(s, w, impl, x_np, dout_np, s["dtype"], tdev, args.iters, ref))
        except Exception as e:
            rows.append({"impl": f"transformers {impl}", "tokens": tokens, "error": f"{type(e).__name__}: {e}"[:300]})
        print(rows[-1], flush=True)
    return rows, checks


def print_tables(rows: list, checks: list, s: dict, platforms) -> None:
    print("\n| impl | tokens | fwd ms | fwd tokens/s | fwd TFLOP/s | fwd+bwd ms | fwd+bwd tokens/s | fwd+bwd TFLOP/s "
          "| err out | err dx |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"| {r['impl']} | {r['tokens']} | {r.get('skipped') or 'failed: ' + r['error']} | | | | | | | |")
            continue
        t, f = r["tokens"], useful_flops(s, r["tokens"])
        err = lambda k: f"{r[k]:.1e}" if r.get(k) is not None else "-"  # noqa: E731
        print(f"| {r['impl']} | {t} | {r['fwd ms']:.2f} | {t / r['fwd ms'] * 1e3:,.0f} | "
              f"{f / r['fwd ms'] / 1e9:.3f} | {r['fwd+bwd ms']:.2f} | {t / r['fwd+bwd ms'] * 1e3:,.0f} | "
              f"{3 * f / r['fwd+bwd ms'] / 1e9:.3f} | "
              f"{err('err out')} | {err('err dx')} |")
    names = " | ".join(f"StableHLO {p} fwd / fwd+bwd" for p in platforms)
    print(f"\nDense dot over all experts (>= 2*T*E*H*I FLOPs in one dot):\n\n| impl | tokens | optimized HLO fwd | "
          f"optimized HLO fwd+bwd | {names} |")
    print("|---|---:|---|---|" + "---|" * len(platforms))
    for c in checks:
        cells = [" / ".join(verdict_cell(c[f"stablehlo {m}"][p]) if "error" not in c[f"stablehlo {m}"][p]
                            else c[f"stablehlo {m}"][p]["error"] for m in ("fwd", "fwd+bwd")) for p in platforms]
        print(f"| {c['impl']} | {c['tokens']} | {verdict_cell(c['hlo fwd'])} | {verdict_cell(c['hlo fwd+bwd'])} | "
              + " | ".join(cells) + " |")


def main(argv=None) -> int:
    args, s = parse_args(argv)
    jdev, tdev = pick_devices(args.device, args.no_torch)
    args.impls = args.impls or ["ragged", "gather", "dense"]
    # the StableHLO each accelerator's compiler receives, lowered here: from a CPU run cuda and tpu too
    platforms = [jdev.platform] + (["cuda", "tpu"] if jdev.platform == "cpu" else [])
    platforms = ["cuda" if p == "gpu" else p for p in platforms]
    head = header(jdev, tdev, s)
    print(" | ".join(f"{k} {v}" for k, v in head.items() if k != "shape"), flush=True)
    print(f"shape: hidden {s['hidden']}, moe_intermediate {s['intermediate']}, {s['experts']} experts, "
          f"top-{s['top_k']}, {s['shared']} shared, n_group {s['n_group']}, {s['dtype']}, tokens {s['tokens']}",
          flush=True)
    w = round_to(make_weights(s), DTYPES[s["dtype"]])
    params = jax.device_put(jax_params(w, s, DTYPES[s["dtype"]]), jdev)
    rows, checks = [], []
    for tokens in s["tokens"]:
        r, c = run_tokens(s, w, params, tokens, args, jdev, tdev, platforms)
        rows, checks = rows + r, checks + c
    print_tables(rows, checks, s, platforms)
    if args.json:
        args.json.write_text(json.dumps({"header": head, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "checks": checks}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
