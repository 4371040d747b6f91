import os
import subprocess
import sys


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA accepts `flag` (an unknown flag in XLA_FLAGS aborts every process at start-up)."""
    probe = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


# Tests run on the CPU in float32; the oracle helpers live next to the tests. `pytest tests/test_gpu.py` (only
# GPU tests asked for) keeps the default backend, so that on a GPU machine the GPU tests run there.
_only_gpu_tests = [a for a in sys.argv[1:] if a.endswith(".py") or "::" in a] and all(
    "test_gpu" in a for a in sys.argv[1:] if a.endswith(".py") or "::" in a)
if not _only_gpu_tests:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The test models are tiny: XLA's CPU compiles cost far more than running them. LLVM without its optimisation
    # passes compiles about a third faster, and XLA's older loop emitters for fusions 1.5-3x faster again (the same
    # values; the run time of these models barely changes). Subprocesses inherit the flags (their device-count
    # flag is added, never replacing them).
    _flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in _flags:
        _flags += " --xla_backend_optimization_level=0"
    if "--xla_cpu_use_fusion_emitters" not in _flags and _xla_knows("--xla_cpu_use_fusion_emitters=false"):
        _flags += " --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = _flags.strip()
# XLA's CPU compiles dominate the suite's time: share compiled programs between tests and test processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program: many recur across files
sys.path.insert(0, os.path.dirname(__file__))
