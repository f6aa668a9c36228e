"""Keep XLA:CPU's step buffers mapped between steps (glibc malloc tunables).

XLA's CPU client mallocs one buffer arena for every step it runs (1.3 GB for the tiny CLIP of
the speed benchmark) and frees it after the step. glibc serves an allocation that large with
a fresh mmap and unmaps it on free, so every step faults the whole arena in again, one 4 KiB
page at a time: 320,000 page faults and 0.58 s of kernel time per tiny-CLIP step on a 2-core
CPU whose step took 1.66 s (docs/benchmarks.md, "Page faults"). Three glibc tunables make
malloc keep that memory for the next step instead: one arena for all threads (a worker
thread's arena cannot grow past 64 MiB without mmap), no mmap, and no trimming of the heap's
top. The arena is then faulted in once, by the first step.

glibc reads its tunables once, when the process starts, so an entry point re-executes itself
at its top (`restart_with_kept_buffers`, before jax is imported): same process id, arguments
and environment, plus GLIBC_TUNABLES. Only where it was measured to help and changes
something: Linux with glibc, no accelerator plugin installed (jax then runs on the CPU),
no malloc tunable of the user's set already, MMJAX_KEEP_BUFFERS not "0".
"""
from __future__ import annotations

import os
import pkgutil
import platform
import sys

TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
OPT_OUT = "MMJAX_KEEP_BUFFERS"  # "0": glibc's defaults
ACCELERATOR_PLUGINS = ("jax_cuda", "jax_rocm", "jax_plugins", "libtpu")  # module name prefixes


def accelerator_plugin_installed() -> bool:
    """Whether jax may find a GPU or TPU here (its plugins are installed), without importing jax."""
    return any(m.name.startswith(ACCELERATOR_PLUGINS) for m in pkgutil.iter_modules())


def tunables_to_add(environ, glibc: bool, accelerator: bool) -> str | None:
    """The GLIBC_TUNABLES value to restart with; None when a restart would change nothing."""
    current = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or not glibc or accelerator or "glibc.malloc." in current:
        return None  # "glibc.malloc." present: set by us before the restart, or by the user
    ours = ":".join(f"{name}={value}" for name, value in TUNABLES.items())
    return f"{current}:{ours}" if current else ours


def restart_with_kept_buffers(module: str) -> None:
    """At the top of `python -m <module>`: re-execute the same command with the tunables (see
    the module docstring), or return at once. A process not started as `python -m <module>`
    (a test importing the module, a multiprocessing child) returns."""
    argv = getattr(sys, "orig_argv", [])
    started_as_module = any(a == "-m" and b == module for a, b in zip(argv, argv[1:]))
    if sys.platform != "linux" or not started_as_module:
        return
    glibc = platform.libc_ver()[0] == "glibc"
    tunables = tunables_to_add(os.environ, glibc, glibc and accelerator_plugin_installed())
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
