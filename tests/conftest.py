import os
import sys

# Tests run on the CPU in float32; the oracle helpers live next to the tests. `pytest tests/test_gpu.py` (only
# GPU tests asked for) keeps the default backend, so that on a GPU machine the GPU tests run there.
_only_gpu_tests = [a for a in sys.argv[1:] if a.endswith(".py") or "::" in a] and all(
    "test_gpu" in a for a in sys.argv[1:] if a.endswith(".py") or "::" in a)
if not _only_gpu_tests:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The test models are tiny: XLA's CPU compiles cost far more than running them, and LLVM without its
    # optimisation passes compiles about a third faster. Subprocesses inherit it (their device-count flag is added
    # to it, never replacing it).
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
# XLA's CPU compiles dominate the suite's time: share compiled programs between tests and test processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program: many recur across files
sys.path.insert(0, os.path.dirname(__file__))
