"""Serving throughput and latency: `glm_jax.serve` vs `transformers serve --continuous-batching`, same checkpoint,
same workload, one run.

    python benchmarks/serve.py                      # a random 8-layer, hidden-512 GLM-4 checkpoint (built here)
    python benchmarks/serve.py --checkpoint DIR     # any transformers-format GLM checkpoint with its tokenizer
    python benchmarks/serve.py --tiny               # smoke test: 2-layer model, few requests
    python benchmarks/serve.py --concurrency 1 8 16 32 --requests 64 --max-tokens 64 --json out.json
    python benchmarks/serve.py --servers glm_jax engine   # and the engine in-process: what HTTP costs
    python benchmarks/serve.py --dtype bfloat16     # both servers in bf16 (the checkpoint's dtype by default)

The peer needs `pip install accelerate` besides transformers. Every target is started first and the levels are
interleaved (each concurrency measured on every target before the next), so that a machine whose speed drifts
during the run (shared cloud VMs do, by tens of percent) does not favour the target measured first; a target
waiting for requests takes no CPU, so each wave still has the machine to itself. The workload for each
concurrency c: `--requests` chat completions sent by c client threads (each sends its next one when the previous
finishes), the same fixed prompt text for all, greedy, `max_tokens` new tokens, streamed with
`stream_options.include_usage`. Reported per server and c: output tokens/s (completion tokens / wall time), time to
first token and inter-token latency (time between streamed content chunks) p50 / p99. Before each measured level,
the same wave unmeasured warms both servers up; glm_jax also starts with `--warmup` (every step program compiled
before traffic, over a `--max-model-len` context: without it, a measured wave whose arrivals met a rows x chunk x
page-table shape the warm-up wave had not compiled it mid-wave).

`engine`: the same workload on `glm_jax.serve.Engine` in this process (built as glm-serve builds it, the chat
prompt rendered as the server renders it), c requests in flight, each replaced as soon as it finishes: no HTTP,
no client threads; ITL is the time between a request's steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # run from a checkout without installing
    import glm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/tokenizer_fixtures.py builds the tokenizer of the random model

import numpy as np  # noqa: E402

PROMPT = ("Read the following verses and say in one sentence what they are about. In the beginning God created "
          "the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of "
          "the deep.")


def build_checkpoint(out: Path, tiny: bool) -> Path:
    """A random GLM-4 (glm4: sandwich norms) transformers checkpoint with a byte-level BPE tokenizer.json and
    GLM-4.5's chat template."""
    import jax

    import tokenizer_fixtures as fx
    from glm_jax import GLMConfig, GLMForCausalLM, init_params, save_hf

    tok_dir = fx.write_hf(fx.train_bpe(1000 if tiny else 4000), out / "tokenizer", "glm45.jinja", in_config=False)
    size = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=16) if tiny \
        else dict(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_heads=8, num_kv_heads=2, head_dim=64)
    cfg = GLMConfig.from_preset("glm-test", vocab_size=1088 if tiny else 4096, sandwich_norm=True, max_seq_len=2048,
                                **size)
    ckpt = save_hf(cfg, init_params(GLMForCausalLM(cfg), jax.random.key(0)), out / "model", format="transformers")
    for f in tok_dir.iterdir():
        if f.name != "generation_config.json":  # no eos ids: every request produces max_tokens tokens
            (ckpt / f.name).write_bytes(f.read_bytes())
    return ckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, checkpoint: Path, port: int, args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if name == "glm_jax":
        cmd = [sys.executable, "-m", "glm_jax.serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--served-model-name", str(checkpoint), "--log-level", "warning", *glm_jax_options(args)]
    else:
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(checkpoint), "--port", str(port),
               "--continuous-batching", "--device", args.torch_device, "--log-level", "warning",
               *(["--dtype", args.dtype] if args.dtype else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(2400):  # glm_jax's --warmup compiles its step programs first (minutes on a CPU)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{name} server did not start")


def glm_jax_options(args) -> list[str]:
    """glm-serve's options for the run (the engine mode builds its engine from the same): a slot per client and,
    but for --tiny, `--warmup` over a context that fits the workload, so that no step program compiles while a
    wave is measured (glm-serve compiles each rows x chunk x page-table shape on first use otherwise; a measured
    wave whose arrivals met new shapes ran at ~60% speed)."""
    options = ["--max-num-seqs", str(max(args.concurrency)), *(["--dtype", args.dtype] if args.dtype else [])]
    if not args.tiny:
        options += ["--warmup", "--max-model-len", str(args.max_model_len)]
    return options


def one_request(client, model: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, usage = [], None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.content or getattr(chunk.choices[0].delta, "reasoning_content",
                                                                          None)):
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    tokens = usage.completion_tokens if usage else len(stamps)
    return {"tokens": tokens, "ttft": (stamps[0] - t0) if stamps else None, "itl": list(np.diff(stamps))}


def run_load(client, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: one_request(client, model, max_tokens), range(requests)))
    return summary(concurrency, results, time.perf_counter() - t)


def engine_load(engine, prompt: list[int], concurrency: int, requests: int, max_tokens: int) -> dict:
    """run_load's workload on the engine itself: a closed loop keeping `concurrency` requests in flight."""
    from glm_jax.serve.sampling import SamplingParams

    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    sent, results, stamps = 0, [], {}
    t0 = time.perf_counter()
    while sent < min(concurrency, requests):
        stamps[engine.add_request(prompt, sampling)] = [time.perf_counter()]
        sent += 1
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            stamps[out.request_id].append(now)
            if out.finished:
                times = stamps.pop(out.request_id)
                results.append({"tokens": len(out.token_ids), "ttft": times[1] - times[0],
                                "itl": list(np.diff(times[1:]))})
                if sent < requests:
                    stamps[engine.add_request(prompt, sampling)] = [time.perf_counter()]
                    sent += 1
    return summary(concurrency, results, time.perf_counter() - t0)


def summary(concurrency: int, results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level (default 2 x c, >= 8)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--servers", nargs="+", default=["glm_jax", "transformers"], choices=["glm_jax", "transformers", "engine"])
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/glm_jax_serve_bench"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="both servers compute in this dtype (default: the checkpoint's)")
    p.add_argument("--max-model-len", type=int, default=256,
                   help="glm_jax's context (its --warmup compiles every step shape up to it); the prompt + "
                        "--max-tokens fit")
    args = p.parse_args(argv)
    import openai

    from glm_jax.platforms import skip_absent_tpu

    skip_absent_tpu()

    args.concurrency = args.concurrency or ([1, 4] if args.tiny else [1, 8, 16, 32])
    max_tokens = args.max_tokens or (8 if args.tiny else 64)
    ckpt = args.checkpoint or build_checkpoint(args.workdir, args.tiny)
    targets, procs = {}, []
    try:
        for name in sorted(args.servers, key=lambda n: n == "engine"):  # all up at once: idle, a server takes no CPU
            if name == "engine":
                targets[name] = engine_target(ckpt, args, max_tokens)
                continue
            port = free_port()
            procs.append(start(name, ckpt, port, args))
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
            model = str(ckpt)  # transformers serve, pinned to a checkpoint, answers to its path only
            one_request(client, model, max_tokens)  # warm-up: compilation
            targets[name] = functools.partial(run_load, client, model, max_tokens=max_tokens)
        rows = []
        for c in args.concurrency:  # interleaved: each level measured on every target before the next level
            n = args.requests or max(8, 2 * c)
            for name, load in targets.items():
                load(concurrency=c, requests=n)  # warm-up: the same wave (glm_jax: its shapes compile)
                rows.append({"server": name, **load(concurrency=c, requests=n)})
                report(rows[-1])
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(ckpt), "max_tokens": max_tokens, "rows": rows}, indent=1))
    return 0


def engine_target(ckpt: Path, args, max_tokens: int):
    """The engine as glm-serve builds it, with the chat prompt the server renders: a load function like run_load's."""
    from glm_jax.serve.__main__ import _arg_parser, build

    served = _arg_parser().parse_args(["--checkpoint", str(ckpt), *glm_jax_options(args)])
    _, engine = build(served)
    prompt = list(engine.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                       add_generation_prompt=True))
    engine_load(engine, prompt, 1, 1, max_tokens)  # warm-up: compilation
    return functools.partial(engine_load, engine, prompt, max_tokens=max_tokens)


def report(row: dict) -> None:
    print(f"| {row['server']:12s} | c={row['concurrency']:3d} | {row['tok_s']:8.1f} tok/s | TTFT p50 "
          f"{row['ttft_p50_ms']:8.1f} ms p99 {row['ttft_p99_ms']:8.1f} ms | ITL p50 {row['itl_p50_ms']:7.1f} ms "
          f"p99 {row['itl_p99_ms']:7.1f} ms |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
