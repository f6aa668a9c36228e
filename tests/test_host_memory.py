"""Entry points restart once with glibc tunables that keep a freed step arena mapped for the
next step (mmjax.host_memory); measured here by the page faults of a second large allocation."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mmjax import host_memory

OURS = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


@pytest.mark.parametrize(
    "environ,glibc,accelerator,expected",
    [
        ({}, True, False, OURS),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, True, False, "glibc.pthread.rseq=0:" + OURS),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, True, False, None),  # the user's own malloc settings
        ({"GLIBC_TUNABLES": OURS}, True, False, None),  # after the restart
        ({"MMJAX_KEEP_BUFFERS": "0"}, True, False, None),
        ({}, False, False, None),  # musl, macOS: no glibc tunables
        ({}, True, True, None),  # a GPU/TPU plugin: jax's buffers are not on the host
    ],
)
def test_which_tunables_a_restart_adds(environ, glibc, accelerator, expected):
    assert host_memory.tunables_to_add(environ, glibc, accelerator) == expected


PROBE = textwrap.dedent("""
    import ctypes, json, os, resource, sys, threading
    from mmjax import host_memory

    if __name__ == "__main__":
        print("start", os.getpid(), flush=True)
        host_memory.restart_with_kept_buffers("probe")
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size, faults = 256 << 20, []

        def step():  # as XLA's CPU client does on a worker thread: allocate, fill, free
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            pointer = libc.malloc(size)
            ctypes.memset(pointer, 1, size)
            libc.free(pointer)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        for _ in range(2):
            worker = threading.Thread(target=step)
            worker.start()
            worker.join()
        print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
""")


def run_probe(tmp_path, **env):
    (tmp_path / "probe.py").write_text(PROBE)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root]), **env}
    environ.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-m", "probe"], env=environ, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    return [line for line in lines if line.startswith("start")], json.loads(lines[-1])


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc tunables")
@pytest.mark.skipif(host_memory.accelerator_plugin_installed(), reason="no restart where jax has an accelerator")
def test_restarted_process_reuses_a_freed_arena_and_the_default_does_not(tmp_path):
    starts, kept = run_probe(tmp_path)
    assert starts == [f"start {kept['pid']}"] * 2  # restarted once, in place (same process id)
    assert kept["tunables"] == OURS
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert kept["faults"][0] > pages // 2  # the first step maps the arena
    assert kept["faults"][1] < pages // 20  # the second reuses it

    starts, default = run_probe(tmp_path, MMJAX_KEEP_BUFFERS="0")
    assert len(starts) == 1 and default["tunables"] is None
    assert default["faults"][1] > pages // 2  # glibc's default: mapped afresh, faulted in again
