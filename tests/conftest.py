import os
import sys

# Tests run on the CPU in float32; the oracle helpers live next to the tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
