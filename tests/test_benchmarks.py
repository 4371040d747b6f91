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
