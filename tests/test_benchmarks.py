"""The benchmark scripts run (CPU smoke mode); they measure nothing here, they only must not rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train_step.py", "decode.py"])
def test_benchmark_script_runs_in_tiny_mode(script, tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| glm_jax" in r.stdout and "| transformers" in r.stdout, r.stdout
    assert out.exists()
