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

# pytest-xdist (`--dist loadfile`) hands each worker whole files in collection order (pyproject's addopts turn
# off its own reordering, by test count, which put the longest file last): the longest files go first, so that
# the two workers end together instead of one running a long file alone at the end. Seconds per file, measured
# cold with the README's test command on a 2-core machine (2026-12-04); the rest keep their order, after these.
LONGEST_FILES = {"test_glm_pretraining.py": 195, "test_glm5_next.py": 146, "test_serving.py": 143,
                 "test_train_run.py": 133, "test_faults.py": 115, "test_benchmarks.py": 98, "test_compress.py": 96,
                 "test_distill.py": 71, "test_moe_train.py": 71, "test_glm_objective.py": 70, "test_model.py": 56,
                 "test_speculative.py": 54, "test_faults_input.py": 52, "test_serve_http.py": 50, "test_moe.py": 48,
                 "test_dsa.py": 45, "test_moe_sharding.py": 40, "test_embedding_train.py": 40}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))  # stable: each file keeps its own order
