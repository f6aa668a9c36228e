"""Test setup: 8 simulated CPU devices so sharding is tested for real, LLVM's -O0 for XLA's
CPU kernels, and a private cache home.

The suite compiles many small programs and runs most of them a few times, so
compiling fast beats running fast: -O0 (--xla_backend_optimization_level=0) took the suite
from 19:02 to 16:56 on 2 cores, every test passing; the matmuls (YNNPACK's own kernels) are
unaffected. Users and benchmarks keep XLA's default. The runs the tests start in
subprocesses inherit both flags through XLA_FLAGS, which XLA reads once, when jax first
initialises its backends: so they are set before anything imports jax.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The trainer's default compilation cache lives under $XDG_CACHE_HOME: the tests, and the runs
# they start in subprocesses, keep theirs in a temporary directory of this process, never in
# the user's ~/.cache (and never shared between pytest-xdist workers).
_CACHE_HOME = tempfile.mkdtemp(prefix="mmjax-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
