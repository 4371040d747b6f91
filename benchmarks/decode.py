"""Decode throughput: glm_jax.generate vs transformers' GlmForCausalLM.generate, same shape, same run.

    python benchmarks/decode.py                     # ChatGLM3-6B shape, bf16, batch 1 and 32, prompt 128, 256 new
    python benchmarks/decode.py --tiny              # CPU smoke test (glm-test shape, also runs torch on CPU)
    python benchmarks/decode.py --batch-sizes 1 --new-tokens 512 --json out.json
    python benchmarks/decode.py --quant 0 8 4       # bf16, then weight-only int8 and int4 (THUDM scheme) rows
    python benchmarks/decode.py --unroll 28         # the layer scan fully unrolled (GLMConfig.scan_unroll)
    python benchmarks/decode.py --per-block         # one weight buffer per block (GLMConfig.scan_layers=False)

Weights are random (generation is greedy with no stop ids, so every row decodes exactly --new-tokens tokens) and
are initialised directly on the device by a jitted init, never materialised on the host. For each batch size:

  total      wall time of one `generate` call (prefill + decode, one compiled program), tokens/s = batch*new/time
  prefill    the same compiled program stopped after the first token (max_new_tokens=1, same buckets)
  decode     (total - prefill) / (new - 1) per step
  weight BW  bytes of the weights read per decode step (all parameters except the embedding table, which is
             only gathered) / decode step time, against the measured device copy bandwidth (read + write bytes
             of a large on-device copy / time): a batch-1 decode step is bound by reading the weights once.

transformers runs when torch is installed and CUDA is available (or always on CPU with --tiny): bf16, sdpa,
`generate(do_sample=False, min_new_tokens=new)`, on the same shape, after the JAX part has released its memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

# Leave GPU memory to PyTorch, which runs in the same process after JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from glm_jax import GLMConfig, GLMForCausalLM, init_params, quantize_params  # noqa: E402
from glm_jax import generation as G  # noqa: E402


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def timed(fn, repeats: int) -> float:
    """Best wall time over `repeats` calls (each call must block until done)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Read + write bytes per second of an on-device copy of `nbytes` (bf16)."""
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16) + 1
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    f(x).block_until_ready()
    t = timed(lambda: f(x).block_until_ready(), repeats)
    del x
    return 2 * nbytes / t


def nbytes(x) -> float:
    bits = 4 if x.dtype == jnp.int4 else x.dtype.itemsize * 8  # int4 is packed two per byte on the device
    return x.size * bits / 8


def weight_bytes(params) -> tuple[int, int]:
    """(all parameter bytes, bytes read per decode step = all but the embedding table)."""
    total = int(sum(nbytes(x) for x in jax.tree.leaves(params)))
    return total, total - int(nbytes(params["model"]["embed"]["embedding"]))


def bench_jax(cfg: GLMConfig, batch_sizes, prompt: int, new: int, repeats: int, quant_bits=(0,)):
    """One row per (quantization, batch size); the float weights are quantized on the device for int8 / int4."""
    base = jax.block_until_ready(init_params(GLMForCausalLM(cfg), jax.random.key(0)))  # jitted: made on the device
    rows, step_bytes = [], {}
    for bits in quant_bits:
        qcfg, params = quantize_params(cfg, base, bits) if bits else (cfg, base)
        r, step_bytes[bits] = bench_params(qcfg, params, batch_sizes, prompt, new, repeats)
        rows += r
        del params
        G.clear_cache()
        jax.clear_caches()
        gc.collect()
    del base
    gc.collect()
    return rows, step_bytes


def bench_params(cfg: GLMConfig, params, batch_sizes, prompt: int, new: int, repeats: int):
    model = GLMForCausalLM(cfg)
    weights = f"int{cfg.quantization_bit}" if cfg.quantization_bit else cfg.param_dtype
    total_b, step_b = weight_bytes(params)
    print(f"[jax {weights}] params {fmt_bytes(total_b)}, read per decode step {fmt_bytes(step_b)}", flush=True)
    rows = []
    rng = np.random.RandomState(0)
    for b in batch_sizes:
        ids = rng.randint(3, cfg.vocab_size, (b, prompt)).astype(np.int32)
        kw = dict(stop_ids=(), temperature=0.0, new_bucket=G.bucket_length(new))
        t = time.perf_counter()
        out = G.generate(model, params, ids, max_new_tokens=new, **kw)
        compile_s = time.perf_counter() - t
        assert out.shape == (b, prompt + new)
        G.generate(model, params, ids, max_new_tokens=1, **kw)  # same program: warm for the prefill timing
        total = timed(lambda: G.generate(model, params, ids, max_new_tokens=new, **kw), repeats)
        prefill = timed(lambda: G.generate(model, params, ids, max_new_tokens=1, **kw), repeats)
        step = max(total - prefill, 1e-9) / max(new - 1, 1)
        rows.append(dict(impl="glm_jax", weights=weights, batch=b, total_s=total, prefill_s=prefill, step_ms=step * 1e3,
                         tokens_per_s=b * new / total, decode_tokens_per_s=b / step, weight_gbps=step_b / step / 1e9,
                         first_call_s=compile_s, weight_bytes_per_step=step_b))
        print(f"[jax {weights}] batch {b}: {rows[-1]['tokens_per_s']:.1f} tok/s, step {step * 1e3:.2f} ms "
              f"(first call incl. compile {compile_s:.1f} s)", flush=True)
    return rows, step_b


def bench_torch(cfg: GLMConfig, batch_sizes, prompt: int, new: int, repeats: int, device: str, dtype: str):
    import torch
    import transformers

    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    hf = cfg.to_hf_dict("transformers")
    config = transformers.GlmConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.qkv_bias, rope_parameters=hf["rope_parameters"], pad_token_id=0, eos_token_id=None,
        tie_word_embeddings=False)
    with torch.device(device):
        model = transformers.GlmForCausalLM._from_config(config, dtype=tdtype, attn_implementation="sdpa").eval()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"[torch] params {fmt_bytes(n_bytes)} ({tdtype}) on {device}, transformers {transformers.__version__}",
          flush=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    rng = np.random.RandomState(0)
    for b in batch_sizes:
        ids = torch.tensor(rng.randint(3, cfg.vocab_size, (b, prompt)), device=device)
        mask = torch.ones_like(ids)

        def run(n):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
            sync()
            return out

        assert run(min(new, 8)).shape == (b, prompt + min(new, 8))  # warm-up
        total = timed(lambda: run(new), repeats)
        prefill = timed(lambda: run(1), repeats)
        step = max(total - prefill, 1e-9) / max(new - 1, 1)
        rows.append(dict(impl="transformers", weights=dtype, batch=b, total_s=total, prefill_s=prefill, step_ms=step * 1e3,
                         tokens_per_s=b * new / total, decode_tokens_per_s=b / step, weight_gbps=None))
        print(f"[torch] batch {b}: {rows[-1]['tokens_per_s']:.1f} tok/s, step {step * 1e3:.2f} ms", flush=True)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="chatglm3-6b")
    p.add_argument("--tiny", action="store_true", help="glm-test shape, small prompt/new tokens: a CPU smoke test")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--quant", type=int, nargs="+", default=[0], choices=(0, 8, 4),
                   help="weight-only quantization of the JAX rows: 0 = --dtype weights, 8 = int8, 4 = int4")
    p.add_argument("--unroll", type=int, default=1, help="GLMConfig.scan_unroll: decoder blocks per scan iteration")
    p.add_argument("--per-block", action="store_true",
                   help="GLMConfig.scan_layers=False: separate weights per block instead of one sliced stack")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--copy-mb", type=int, default=None, help="size of the copy-bandwidth probe")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    if args.tiny:
        cfg = GLMConfig.from_preset("glm-test", dtype=args.dtype, param_dtype=args.dtype, scan_unroll=args.unroll,
                                    scan_layers=not args.per_block)
        batch_sizes, prompt, new, repeats, copy_mb = [1, 4], 16, 16, 2, 64
    else:
        cfg = GLMConfig.from_preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, scan_unroll=args.unroll,
                                    scan_layers=not args.per_block)
        batch_sizes, prompt, new, repeats, copy_mb = [1, 32], 128, 256, 3, 2048
    batch_sizes = args.batch_sizes or batch_sizes
    prompt = args.prompt_len or prompt
    new = args.new_tokens or new
    repeats = args.repeats or repeats
    copy_mb = args.copy_mb or copy_mb
    if new < 2:
        p.error("--new-tokens must be >= 2 (decode time is total minus prefill)")

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')} x{jax.device_count()}, jax {jax.__version__}; "
          f"shape {cfg.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.dtype}; "
          f"layers {'per block' if not cfg.scan_layers else f'scanned, unroll {cfg.scan_unroll}'}; prompt {prompt}, "
          f"new {new}", flush=True)
    bw = copy_bandwidth(copy_mb << 20)
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    jax_rows, step_bytes = bench_jax(cfg, batch_sizes, prompt, new, repeats, args.quant)

    torch_rows = []
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("[torch] not installed: skipping the transformers comparison")
        else:
            device = "cuda" if torch.cuda.is_available() else ("cpu" if args.tiny else None)
            if device is None:
                print("[torch] no CUDA device: skipping the transformers comparison (use --tiny for a CPU run)")
            else:
                torch_rows = bench_torch(cfg, batch_sizes, prompt, new, repeats, device, args.dtype)

    print()
    header = ("| impl | weights | batch | tokens/s | decode tokens/s | ms/step | prefill ms | weight GB/s | of copy BW |"
              " vs transformers |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    ref = {r["batch"]: r for r in torch_rows}
    for r in jax_rows + torch_rows:
        wb = f"{r['weight_gbps']:.0f}" if r["weight_gbps"] else "-"
        frac = f"{r['weight_gbps'] * 1e9 / bw:.0%}" if r["weight_gbps"] else "-"
        speedup = (f"{r['tokens_per_s'] / ref[r['batch']]['tokens_per_s']:.1f}x"
                   if r["impl"] == "glm_jax" and r["batch"] in ref else "-")
        print(f"| {r['impl']} | {r['weights']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['step_ms']:.2f} | {r['prefill_s'] * 1e3:.1f} | {wb} | {frac} | {speedup} |")
    for bits, sb in step_bytes.items():
        print(f"{f'int{bits}' if bits else args.dtype}: weights read per step {fmt_bytes(sb)}; bandwidth bound at "
              f"batch 1 ~ {bw / sb:.0f} steps/s")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            device=f"{dev.platform} {getattr(dev, 'device_kind', '')}", jax=jax.__version__, preset=cfg.name,
            dtype=cfg.dtype, scan_unroll=cfg.scan_unroll, scan_layers=cfg.scan_layers, prompt=prompt, new=new, copy_gbps=bw / 1e9,
            rows=jax_rows + torch_rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
