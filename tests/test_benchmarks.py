"""The benchmark scripts run (CPU smoke mode); they measure nothing here, they only must not rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-device / compile-heavy: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("script,extra", [("train_step.py", []), ("decode.py", ["--quant", "0", "8"])])
def test_benchmark_script_runs_in_tiny_mode(script, extra, tmp_path):
    out = tmp_path / "rows.json"
    stdout = run(script, "--json", str(out), *extra)
    assert "| glm_jax" in stdout and "| transformers" in stdout, stdout
    rows = json.loads(out.read_text())["rows"]
    if script == "decode.py":
        assert {(r["weights"], r["batch"]) for r in rows if r["impl"] == "glm_jax"} == {
            ("bfloat16", 1), ("bfloat16", 4), ("int8", 1), ("int8", 4)}
        by = {r["weights"]: r["weight_bytes_per_step"] for r in rows if r["impl"] == "glm_jax"}
        assert by["int8"] < 0.8 * by["bfloat16"]  # int8 block kernels; norms, scales and lm_head stay bf16


def test_attention_benchmark_runs_in_tiny_mode(tmp_path):
    out = tmp_path / "attn.json"
    run("attention.py", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["kernel"] == "xla" and rows[0]["err_out"] == 0.0


def test_train_step_compile_only_reports_the_memory_plan(tmp_path):
    """--compile-only runs nothing: XLA's plan for the step; unrolled, the compiled FLOPs match the formula."""
    out = tmp_path / "plan.json"
    stdout = run("train_step.py", "--compile-only", "--unroll", "2", "--no-segments", "--json", str(out))
    plan = json.loads(out.read_text())
    c = plan["compile"]
    assert c["args_gib"] > 0 and c["temp_gib"] > 0 and c["peak_gib"] >= c["args_gib"]
    assert 0.8 < c["hlo_flops"] / plan["model_flops_per_device"] < 1.5, stdout
    assert "| transformers" not in stdout


def test_loader_benchmark_runs_in_tiny_mode(tmp_path):
    out = tmp_path / "rows.json"
    run("loader.py", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["loader"] for r in rows][0] == "numpy loader (before Grain)" and all(r["rows_per_s"] > 0 for r in rows)


def test_moe_benchmark_compares_with_transformers_and_finds_dense_expert_matmuls(tmp_path):
    """benchmarks/moe.py: every expert path matches transformers' Glm4MoeMoE (fp32 eager, same weights), and its
    dense-work check finds the all-experts dot in the dense reference (the check can fail), none in gather, and
    none in the ragged path's StableHLO for GPU / TPU (chlo.ragged_dot instead)."""
    out = tmp_path / "moe.json"
    stdout = run("moe.py", "--json", str(out))
    assert "| glm_jax ragged" in stdout and "| transformers" in stdout, stdout
    res = json.loads(out.read_text())
    rows = {r["impl"]: r for r in res["rows"]}
    for name in ("glm_jax ragged", "glm_jax gather", "glm_jax dense", "transformers grouped_mm"):
        assert rows[name]["err out"] < 1e-5 and rows[name]["err dx"] < 1e-5, rows[name]
    checks = {c["impl"].split()[-1]: c for c in res["checks"]}
    for mode in ("fwd", "fwd+bwd"):
        dense, gather, ragged = (checks[i] for i in ("dense", "gather", "ragged"))
        shlo = {i: checks[i][f"stablehlo {mode}"] for i in checks}
        assert dense[f"hlo {mode}"]["dense_dots"] > 0 and all(v["dense_dots"] > 0 for v in shlo["dense"].values())
        assert gather[f"hlo {mode}"]["dense_dots"] == 0 and all(v["dense_dots"] == 0 for v in shlo["gather"].values())
        for platform in ("cuda", "tpu"):
            assert shlo["ragged"][platform]["dense_dots"] == 0 and shlo["ragged"][platform]["ragged_ops"] >= 2
        if shlo["ragged"]["cpu"]["ragged_ops"] == 0:  # JAX expanded ragged_dot for the CPU: XLA's HLO shows it
            assert ragged[f"hlo {mode}"]["dense_dots"] > 0, ragged


def test_serve_benchmark_runs_in_tiny_mode(tmp_path):
    """benchmarks/serve.py against glm_jax.serve and the engine in-process (the transformers peer needs
    `accelerate`, not a test extra): the same workload, so the same number of output tokens; the levels
    interleaved (each measured on every target before the next)."""
    out = tmp_path / "serve.json"
    run("serve.py", "--json", str(out), "--servers", "engine", "glm_jax", "--concurrency", "1", "2", "--workdir",
        str(tmp_path))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["server"], r["concurrency"]) for r in rows] == [("glm_jax", 1), ("engine", 1), ("glm_jax", 2),
                                                                ("engine", 2)]
    for http, engine in (rows[:2], rows[2:]):
        assert http["output_tokens"] == engine["output_tokens"] > 0 and http["requests"] == engine["requests"]


def test_speculative_benchmark_runs_in_tiny_mode(tmp_path):
    out = tmp_path / "rows.json"
    run("speculative.py", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["method"], r["k"]) for r in rows] == [("plain", 0), ("mtp", 1), ("ngram", 2)]
    assert all(r["same_tokens"] and r["tokens_per_s"] > 0 and 1 <= r["accept_length"] for r in rows)


def test_compress_benchmark_runs_in_tiny_mode(tmp_path):
    """A random glm-test and its pruned copy: both measured by glm_jax and transformers, the pruned one smaller."""
    out = tmp_path / "rows.json"
    stdout = run("compress.py", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["model", "pruned"] and rows[1]["params"] < rows[0]["params"], stdout
    assert all(set(r["decode_tokens_per_s"]) == set(r["transformers_tokens_per_s"]) == {"1", "2"} for r in rows)


def test_retrieval_benchmark_runs_in_tiny_mode(tmp_path):
    out = tmp_path / "rows.json"
    run("retrieval.py", "--json", str(out))
    rows = json.loads(out.read_text())
    assert rows[0]["mode"] == "bm25" and rows[0]["recall@5"] >= 0.99
    assert [r["search"] for r in rows[1:]] == ["exact (numpy product)", "hnsw (usearch)"] and rows[2]["recall@10"] > 0.9
