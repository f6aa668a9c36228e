"""Test setup: 8 simulated CPU devices so sharding is tested for real.

XLA reads the flag once, when jax first initialises its backends, so it must be set
before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
