"""Training throughput: the real train step of train.py vs transformers' GlmForCausalLM + fused AdamW.

    python benchmarks/train_step.py                           # ChatGLM3-6B shape, 8 layers, bf16, 4 x 2048
    python benchmarks/train_step.py --layers 28 --remat save_dots --fsdp -1
    python benchmarks/train_step.py --seq 8192 --batch 1 --attention cudnn --loss-chunk 1024
    python benchmarks/train_step.py --tiny                    # CPU smoke test (glm-test shape, torch on CPU too)
    python benchmarks/train_step.py --compile-only --remat full   # no run: XLA's memory plan and FLOPs, any backend

Model: hidden 4096, ffn 13696, 32 heads x 128, 2 KV groups, vocab 65024 (GLMConfig "chatglm3-6b") with
--layers decoder blocks; random weights initialised directly on the device(s), bf16 compute. The step is
glm_jax.train.step.StepBuilder's jitted train step (AdamW + clipping + weight decay, donated state), the one
train.py runs, on a mesh over all devices (fsdp by default).

Reported per implementation: step time (median of --steps after 2 warm-up steps), tokens/s, model TFLOP/s,
MFU and peak device memory.
  FLOPs per token = 6 * N + 12 * L * S * heads * head_dim   (GLMConfig.flops_per_token)
    N = parameters excluding the input embedding (a gather), including the output projection; the attention
    term counts QK^T and PV of the full S x S square, forward + backward (PaLM / MaxText convention).
  MFU = tokens/s * FLOPs per token / (peak bf16 dense FLOP/s of the device x devices); peaks from
    glm_jax.train.metrics.PEAK_FLOPS (H100 SXM: 989 TFLOP/s).
transformers runs in the same process when torch is installed and CUDA is available (or with --tiny on CPU):
bf16 weights, sdpa attention, torch.optim.AdamW(fused=True) (foreach on CPU), the same shape, batch and
sequence length; the table prints the ratio.

--compile-only allocates nothing: it compiles the same step for abstract inputs on the default backend and prints
XLA's compile time, memory plan (arguments, outputs, temporaries; the peak estimate is their sum minus the donated
buffers XLA aliases) and the FLOPs of the compiled program over the model FLOPs of the formula above (above 1:
rematerialisation recomputes the forward). It answers "does this configuration fit, and what does a lever change"
before a device is booked; on CPU the memory plan is the CPU compiler's, not the GPU's. With --topology (and
libtpu installed: `pip install "jax[tpu]"`) it compiles for a Cloud TPU slice from any machine, the way MaxText's
train_compile.py does, so the plan is the TPU compiler's own and an out-of-memory shows up here:
    python benchmarks/train_step.py --compile-only --topology v5p-128 --layers 28 --batch 512 --seq 4096 \
        --remat save_dots_no_batch --attention splash      # configs/chatglm3-6b-pretrain-tpu.yaml's step
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch afterwards

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from glm_jax import GLMConfig, GLMForCausalLM, make_mesh, param_shardings  # noqa: E402
from glm_jax.config import ATTENTION_IMPLS, REMAT_POLICIES  # noqa: E402
from glm_jax.model import param_specs  # noqa: E402
from glm_jax.sharding import use_mesh  # noqa: E402
from glm_jax.train.config import TrainSection  # noqa: E402
from glm_jax.train.metrics import peak_flops  # noqa: E402
from glm_jax.train import plan as P  # noqa: E402
from glm_jax.train.build import random_params  # noqa: E402
from glm_jax.train.optimizer import make_optimizer  # noqa: E402
from glm_jax.train.step import StepBuilder, batch_shardings, make_state, state_shardings  # noqa: E402


def model_config(args) -> GLMConfig:
    if args.tiny:
        return GLMConfig.from_preset("glm-test", dtype="float32", param_dtype="float32", remat_policy=args.remat,
                                     attention_impl=args.attention, scan_unroll=args.unroll)
    return GLMConfig.from_preset(args.preset, num_layers=args.layers, dtype="bfloat16",
                                 param_dtype=args.param_dtype, remat_policy=args.remat,
                                 attention_impl=args.attention, max_seq_len=max(args.seq, 8192),
                                 scan_unroll=args.unroll, max_segments=args.max_segments)


def packed_segments(shape, docs: int) -> np.ndarray:
    """Segment ids of rows packed from `docs` documents of random lengths each (ids from 1), as train.py's rows."""
    rng = np.random.RandomState(1)
    rows = np.zeros((int(np.prod(shape[:-1])), shape[-1]), np.int32)
    for row in rows:
        cuts = np.sort(rng.choice(np.arange(1, shape[-1]), docs - 1, replace=False)) if docs > 1 else []
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, shape[-1]])):
            row[lo:hi] = i + 1
    return rows.reshape(shape)


def timed_steps(step_fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step_fn()
        out.append(time.perf_counter() - t)
    return out


def peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


def run_jax(cfg: GLMConfig, args) -> dict:
    devices = P.topology_devices(args.topology) if args.topology else None
    mesh = make_mesh(data=args.data, fsdp=args.fsdp, tensor=args.tensor, sequence=args.sequence, devices=devices)
    model = GLMForCausalLM(cfg)
    boxed = param_specs(model)  # outside the mesh context: an eager op there would run on the mesh's devices
    p_shard = param_shardings(boxed, mesh)
    tx, schedule = make_optimizer(TrainSection(steps=1000, lr=1e-5, warmup_steps=0))
    builder = StepBuilder(model, tx, schedule, "lm", loss_chunk=args.loss_chunk)
    micro = args.batch // args.grad_accum
    shapes = (args.grad_accum, micro, args.seq)
    rng = np.random.RandomState(0)
    host = {"input_ids": rng.randint(3, cfg.vocab_size, shapes).astype(np.int32),
            "targets": rng.randint(3, cfg.vocab_size, shapes).astype(np.int32),
            "segment_ids": packed_segments(shapes, args.docs), "loss_mask": np.ones(shapes, np.int32)}
    if args.no_segments:  # what train.py never does: its packed rows always carry segment ids
        del host["segment_ids"]
    b_shard = batch_shardings(mesh, host, microbatched=True)
    if args.compile_only:  # everything eager stays outside the mesh context: its devices may not be here
        abstract = jax.eval_shape(lambda p: make_state(p, tx, 0), nn.unbox(boxed))
        s_shard = state_shardings(abstract, p_shard, tx, mesh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_shard[k]) for k, v in host.items()}
        hyper = {"lr": jax.ShapeDtypeStruct((), jnp.float32), "skip_nonfinite": jax.ShapeDtypeStruct((), jnp.bool_)}
        with use_mesh(mesh):
            row = P.compile_plan(builder.jit_train(s_shard, {}, b_shard), P.abstract(abstract, s_shard), {}, batch,
                                 hyper)
        return {"impl": "glm_jax", "devices": mesh.devices.size, "device_kind": mesh.devices.flat[0].device_kind,
                **row}
    with use_mesh(mesh):
        params = random_params(model, p_shard, seed=0)
        abstract = jax.eval_shape(lambda p: make_state(p, tx, 0), params)
        s_shard = state_shardings(abstract, p_shard, tx, mesh)
        state = jax.jit(lambda p: make_state(p, tx, 0), out_shardings=s_shard)(params)
        del params
        step = builder.jit_train(s_shard, {}, b_shard)
        batch = {k: jax.device_put(v, b_shard[k]) for k, v in host.items()}
        hyper = {"lr": jnp.float32(1e-5), "skip_nonfinite": jnp.bool_(False)}
        holder = {"state": state}

        def one():
            holder["state"], metrics = step(holder["state"], {}, batch, hyper)
            float(metrics["loss"])  # blocks until the step is done

        t = time.perf_counter()
        one()
        compile_s = time.perf_counter() - t
        one()
        times = timed_steps(one, args.steps)
    del holder, batch
    return {"impl": "glm_jax", "step_s": statistics.median(times), "compile_s": compile_s,
            "peak_mem_gib": peak_memory_gib(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind}


def run_torch(cfg: GLMConfig, args) -> dict | None:
    try:
        import torch
        import transformers
    except ImportError:
        print("torch / transformers not installed: skipping the PyTorch reference")
        return None
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: skipping the PyTorch reference (use --tiny to run it on CPU)")
        return None
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if not args.tiny else torch.float32
    hf_cfg = transformers.GlmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias, pad_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.GlmForCausalLM(hf_cfg).to(dtype)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=cuda, foreach=not cuda)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), device=device)

    def one():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    one()
    warm = time.perf_counter() - t
    one()
    times = timed_steps(one, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    del model, opt
    gc.collect()
    return {"impl": f"transformers {transformers.__version__} + torch {torch.__version__}",
            "step_s": statistics.median(times), "compile_s": warm, "peak_mem_gib": peak, "devices": 1,
            "device_kind": kind}


def print_compile_report(r: dict, cfg: GLMConfig, flops_tok: float, tokens: int, args) -> int:
    model_flops = flops_tok * tokens / r["devices"]  # per device, like XLA's count of the partitioned program
    print("\n" + P.format_plan(r, r["device_kind"], r["devices"], model_flops,
                                cfg.scan_unroll >= cfg.num_layers))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "compile": r,
                                         "model_flops_per_device": model_flops}, indent=2))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="chatglm3-6b", help="model shape (GLMConfig preset); depth from --layers")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    ap.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS)
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="master weights (float32 = bf16 compute with fp32 master weights)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="chunked cross-entropy (positions per chunk)")
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--fsdp", type=int, default=-1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--sequence", type=int, default=1, help="sequence (context) parallelism")
    ap.add_argument("--topology", choices=sorted(P.TPU_TOPOLOGIES),
                    help="with --compile-only: compile for this Cloud TPU slice (needs libtpu, no TPU)")
    ap.add_argument("--no-segments", action="store_true",
                    help="batches without segment ids: plain causal attention (cuDNN's fast path) instead of the "
                         "packed-document mask train.py's rows need")
    ap.add_argument("--docs", type=int, default=8, help="documents per packed row (segment ids 1..docs)")
    ap.add_argument("--max-segments", type=int, default=0,
                    help="GLMConfig.max_segments: cuDNN's packed layout for up to this many documents per row "
                         "(0: the [B, 1, S, S] mask)")
    ap.add_argument("--unroll", type=int, default=1, help="GLMConfig.scan_unroll: decoder blocks per scan iteration")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile for abstract inputs and print XLA's memory plan and FLOPs; runs nothing")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="glm-test shape on CPU, fp32 (a smoke test, not a benchmark)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.topology and not args.compile_only:
        ap.error("--topology needs --compile-only (the slice is not here to run on)")
    if args.tiny:
        args.batch, args.seq, args.steps = min(args.batch, 2), min(args.seq, 64), min(args.steps, 2)

    cfg = model_config(args)
    flops_tok = cfg.flops_per_token(args.seq)
    tokens = args.batch * args.seq
    print(f"shape: {cfg.num_layers} layers, hidden {cfg.hidden_size}, ffn {cfg.ffn_hidden_size}, "
          f"{cfg.num_heads}x{cfg.head_dim} heads, {cfg.num_kv_heads} KV groups, vocab {cfg.vocab_size}; "
          f"batch {args.batch} x {args.seq}; {cfg.num_params() / 1e9:.2f}B params; "
          f"{flops_tok / 1e9:.2f} GFLOPs/token; remat {args.remat}, attention {args.attention}, "
          f"master weights {cfg.param_dtype}, loss_chunk {args.loss_chunk}, "
          f"{'no segment ids (causal)' if args.no_segments else f'packed rows of {args.docs} documents, max_segments {args.max_segments}'}", flush=True)
    rows = [run_jax(cfg, args)]
    if args.compile_only:
        return print_compile_report(rows[0], cfg, flops_tok, tokens, args)
    gc.collect()
    if not args.no_torch:
        row = run_torch(cfg, args)
        if row:
            rows.append(row)
    for r in rows:
        r["tokens_per_s"] = tokens / r["step_s"]
        r["tflops"] = r["tokens_per_s"] * flops_tok / 1e12
        peak = peak_flops(r["device_kind"])
        r["mfu"] = r["tflops"] * 1e12 / (peak * r["devices"]) if peak else None

    print("\n| implementation | step (s) | tokens/s | model TFLOP/s | MFU | peak mem (GiB) | vs PyTorch |")
    print("|---|---|---|---|---|---|---|")
    ref = rows[1]["tokens_per_s"] if len(rows) > 1 else None
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "n/a"
        print(f"| {r['impl']} ({r['devices']} x {r['device_kind']}) | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} "
              f"| {r['tflops']:.1f} | {mfu} | {mem} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
