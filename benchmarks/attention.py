"""Attention kernels on train.py's packed rows: forward + backward time and error of every GPU path, with
PyTorch's flash attention (sdpa, causal, unpacked) beside them.

    python benchmarks/attention.py                          # 4 x 2048, 32 heads x 128, 2 KV groups, 8 docs per row
    python benchmarks/attention.py --seq 8192 --batch 1 --docs 4
    python benchmarks/attention.py --tiny                   # CPU smoke test: xla only

Rows (each one jitted value-and-grad of sum(out * dout) w.r.t. q, k, v; median of --iters after warm-up):
  xla             einsum attention with the [B, S, S] mask, fp32 softmax (the reference of the tests)
  cudnn mask      cuDNN flash attention with the segment mask passed as a [B, 1, S, S] bias (before)
  cudnn packed M  cuDNN's packed (ragged) layout, M = the static bound on documents per row, no fallback
  cudnn packed M + fallback  what the model runs: the packed layout under lax.cond, mask path if a row has > M
  pallas triton   jax.experimental.pallas.ops.gpu.attention.mha with segment ids (KV heads repeated)
  cudnn causal    cuDNN's causal fast path without segments: a different (unpacked) computation, the speed bound
  torch sdpa      PyTorch scaled_dot_product_attention, causal, GQA, unpacked (the reference stack's kernel)
Error: max |out - ref| / max |ref| over real tokens, and the same for dq, dk, dv, against the xla row computed
in float32. TFLOP/s counts the useful work: causal pairs within each document, 4 * D FLOPs per pair and head
forward, 2.5x that backward.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax.model.layers import attention as A  # noqa: E402


def packed_segments(batch: int, seq: int, docs: int, seed: int = 0) -> np.ndarray:
    """Rows of `docs` documents of random lengths filling `seq` (ids from 1), as train.py's packer makes."""
    rng = np.random.RandomState(seed)
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False)) if docs > 1 else []
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, seq])):
            out[b, lo:hi] = i + 1
    return out


def useful_flops(segments: np.ndarray, heads: int, head_dim: int) -> float:
    pairs = 0
    for row in segments:
        _, counts = np.unique(row, return_counts=True)
        pairs += int(np.sum(counts * (counts + 1) // 2))
    return 3.5 * 4 * head_dim * heads * pairs


def timed(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def repeat_kv(k, heads):
    return jnp.repeat(k, heads // k.shape[2], axis=2)


def variants(seg, docs: int, on_gpu: bool):
    rows = {"xla": lambda q, k, v: A.xla_attention(q, k, v, A.make_mask(seg, seg, q.shape[1], k.shape[1]))}
    if not on_gpu:
        return rows
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    rows["cudnn mask"] = lambda q, k, v: A.cudnn_attention(q, k, v, seg, seg, max_segments=0)
    for m in sorted({docs, 2 * docs, 64}):
        rows[f"cudnn packed M={m}"] = functools.partial(lambda q, k, v, m: A._cudnn_packed(q, k, v, seg, m), m=m)
    rows[f"cudnn packed M={2 * docs}, KV repeated"] = lambda q, k, v: A._cudnn_packed(
        q, repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2]), seg, 2 * docs)
    rows[f"cudnn packed M={2 * docs} + fallback"] = lambda q, k, v: A.cudnn_attention(q, k, v, seg, seg,
                                                                                      max_segments=2 * docs)
    rows["pallas triton (segment ids)"] = lambda q, k, v: pallas_gpu.mha(
        q, repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2]), seg, sm_scale=float(1 / np.sqrt(q.shape[-1])),
        causal=True)
    rows["cudnn causal (no segments)"] = lambda q, k, v: A.cudnn_attention(q, k, v, None, None)
    return rows


def fwd_bwd(attn):
    def loss(q, k, v, dout):
        out = attn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * dout), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def torch_row(args, flops: float) -> dict | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    b, s, n, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, n, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, g, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(b, n, s, d, device="cuda", dtype=torch.bfloat16)

    def one():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(dout)
        torch.cuda.synchronize()

    for _ in range(3):
        one()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    causal = 3.5 * 4 * d * n * b * s * (s + 1) / 2
    return {"kernel": f"torch {torch.__version__} sdpa causal (no segments)", "ms": ms,
            "tflops": causal / ms / 1e9, "err_out": None, "err_grad": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--docs", type=int, default=8, help="documents per packed row")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.docs, args.iters = 2, 128, 4, 2, 32, 3, 2
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    b, s, n, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    seg_np = packed_segments(b, s, args.docs)
    seg = jnp.asarray(seg_np)
    rng = np.random.RandomState(1)
    q32 = jnp.asarray(rng.randn(b, s, n, d), jnp.float32)
    k32, v32 = (jnp.asarray(rng.randn(b, s, g, d), jnp.float32) for _ in range(2))
    dout = jnp.asarray(rng.randn(b, s, n, d), jnp.float32)
    q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
    flops = useful_flops(seg_np, n, d)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; batch {b} x {s}, {n} heads x {d}, "
          f"{g} KV groups, {args.docs} documents per row, {dtype.__name__}", flush=True)

    (_, ref), ref_grads = fwd_bwd(variants(seg, args.docs, False)["xla"])(
        *(x.astype(dtype).astype(jnp.float32) for x in (q, k, v)), dout)
    real = np.asarray(seg_np) > 0

    def rel(a, r, mask=None):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        if mask is not None:
            a, r = a[mask], r[mask]
        return float(np.max(np.abs(a - r)) / np.max(np.abs(r)))

    rows = []
    for name, attn in variants(seg, args.docs, on_gpu).items():
        try:
            fn = fwd_bwd(attn)
            (_, out), grads = fn(q, k, v, dout)
            err_out = rel(out, ref, real)
            err_grad = max(rel(a, r) for a, r in zip(grads, ref_grads))
            ms = timed(fn, (q, k, v, dout), args.iters) * 1e3
            rows.append({"kernel": name, "ms": ms, "tflops": flops / ms / 1e9, "err_out": err_out,
                         "err_grad": err_grad})
        except Exception as e:  # a kernel this device / version cannot run: say which and why, keep going
            rows.append({"kernel": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(rows[-1], flush=True)
    t = torch_row(args, flops) if on_gpu else None
    if t:
        rows.append(t)

    print("\n| kernel (fwd + bwd) | ms | useful TFLOP/s | err out | err grads |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kernel']} | failed: {r['error']} | | | |")
            continue
        e1 = f"{r['err_out']:.1e}" if r["err_out"] is not None else "-"
        e2 = f"{r['err_grad']:.1e}" if r["err_grad"] is not None else "-"
        print(f"| {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.0f} | {e1} | {e2} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
