"""train.py --compile-only: the configured step compiled for abstract inputs, XLA's memory plan, no data read."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(*args, devices=1, env=None):
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--compile-only", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def plan_row(stdout):
    row = next(line for line in stdout.splitlines() if line.startswith("| ") and line[2].isdigit())
    cells = [c.strip() for c in row.strip("|").split("|")]
    return dict(zip(["compile", "args", "out", "temps", "donated", "peak"], map(float, cells[:6])))


def test_compile_only_plans_without_data_or_run_dir(tmp_path):
    """A data file that does not exist is never read, nothing is written; FSDP over 4 devices divides the
    per-device parameter + optimizer bytes by about 4."""
    common = ["model.preset=glm-test", "data.seq_len=64", "train.global_batch_size=8",
              f"data.train_files=[{tmp_path / 'missing.txt'}]", f"run_dir={tmp_path / 'run'}"]
    one = train(*common)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    assert "compiled for 1 x cpu (nothing run)" in one.stdout
    four = train(*common, "mesh.fsdp=4", devices=4)
    assert four.returncode == 0, four.stdout[-2000:] + four.stderr[-2000:]
    a, b = plan_row(one.stdout), plan_row(four.stdout)
    assert 3.0 < a["args"] / b["args"] < 5.0, (a, b)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["lora", "ptuning"])
def test_compile_only_covers_the_parameter_efficient_modes(mode):
    r = train("--config", "configs/sft-tiny.yaml", f"train.mode={mode}", "model.preset=glm-test", "data.seq_len=128")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"mode {mode}" in r.stdout and plan_row(r.stdout)["peak"] > 0


def test_a_plan_over_the_device_memory_exits_4(monkeypatch, capsys):
    from glm_jax.train import plan as P
    from glm_jax.train.config import load_config
    from glm_jax.train.exit_codes import ExitCode

    monkeypatch.setitem(P.DEVICE_MEMORY, "cpu", 1024)  # pretend the host has 1 KiB
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.preset=glm-test", "data.seq_len=32"])
    assert P.compile_only(cfg) == ExitCode.NO_FIT
    assert "more than the 0.0 GiB of a cpu" in capsys.readouterr().err


def test_unknown_topology_is_a_one_line_error():
    r = train("--topology", "v9-8")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "unknown TPU slice" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'jax[tpu]')")
@pytest.mark.slow
def test_compiles_for_a_tpu_slice_with_splash_attention():
    """With libtpu, the TPU compiler itself plans the step for a v5p-8 slice, splash kernel included."""
    r = train("model.preset=glm-test", "model.attention_impl=splash", "model.overrides.head_dim=128", "model.overrides.max_seq_len=512",
              "data.seq_len=512", "train.global_batch_size=8", "mesh.fsdp=-1", "--topology", "v5p-8",
              env={"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "compiled for 4 x TPU v5" in r.stdout and "falling back" not in r.stdout + r.stderr
