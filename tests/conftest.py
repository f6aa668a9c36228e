"""Test setup: 8 simulated CPU devices so sharding is tested for real, and a private cache home.

XLA reads the flag once, when jax first initialises its backends, so it must be set
before anything imports jax.
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The trainer's default compilation cache lives under $XDG_CACHE_HOME: the tests, and the runs
# they start in subprocesses, keep theirs in a temporary directory of this process, never in
# the user's ~/.cache (and never shared between pytest-xdist workers).
_CACHE_HOME = tempfile.mkdtemp(prefix="mmjax-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
