"""Throughput (peak table, TFLOP/s, MFU, the log window), the compiled step's memory, and the
persistent compilation cache, down to two trainer runs of which the second loads its step."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mmjax import compilation_cache, throughput


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v4", 275.0),
    ("cpu", None),
])
def test_peak_of_real_device_kinds(kind, peak):
    assert throughput.peak_tflops(kind) == peak


def test_a_given_peak_overrides_the_table():
    assert throughput.peak_tflops("cpu", 50) == 50.0
    assert throughput.peak_tflops("TPU v4", 100.0) == 100.0


def test_tflops_and_mfu_arithmetic():
    assert throughput.tflops_per_device(1e15, 0.5, 8) == 250.0
    assert throughput.mfu(1e15, 0.5, 8, 1000.0) == 0.25
    assert throughput.mfu(1e15, 0.5, 8, None) is None


def test_log_window_rates():
    window = throughput.LogWindow(batch_size=64, flops_per_step=2e15, num_devices=4, peak=2000.0)
    window.add_data_wait(7.0)  # before the first window (the compiling step): not counted
    assert window.measure(10, now=100.0) == {}
    window.restart(10, now=100.0)
    assert window.measure(10, now=101.0) == {}  # no step in the window yet
    window.add_data_wait(1.0)
    window.add_data_wait(0.25)
    rates = window.measure(20, now=105.0)
    assert rates == {"step_seconds": 0.5, "examples_per_sec": 128.0, "tflops_per_device": 1000.0,
                     "mfu": 0.5, "data_wait": 0.25}
    assert throughput.describe(rates) == "0.5 s/step  128 ex/s  1000 TFLOP/s/dev  MFU 50%  data_wait 25%"
    window.restart(20, now=105.0)
    assert window.measure(21, now=106.0)["data_wait"] == 0.0


def test_no_mfu_without_a_peak():
    window = throughput.LogWindow(batch_size=8, flops_per_step=1e9, num_devices=1, peak=None)
    window.restart(0, now=0.0)
    rates = window.measure(4, now=2.0)
    assert "mfu" not in rates and rates["tflops_per_device"] == 0.002
    assert throughput.describe(rates) == "0.5 s/step  16 ex/s  0.002 TFLOP/s/dev  data_wait 0%"


def test_memory_of_a_compiled_function():
    compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((8, 8), jnp.float32)).compile()
    memory = throughput.memory_per_device(compiled)
    assert list(memory) == ["arguments", "outputs", "temporaries", "code"]
    assert memory["arguments"] == memory["outputs"] == 8 * 8 * 4


class _NoAnalysis:
    def __init__(self, answer):
        self.answer = answer

    def memory_analysis(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("answer", [None, NotImplementedError("no analysis on this backend")])
def test_memory_unknown_is_empty(answer):
    assert throughput.memory_per_device(_NoAnalysis(answer)) == {}


def test_format_bytes():
    assert throughput.format_bytes(3 * 2**30) == "3.0 GiB"
    assert throughput.format_bytes(1536 * 2**10) == "1.5 MiB"
    assert throughput.format_bytes(2048) == "2.0 KiB"
    assert throughput.format_bytes(100) == "100 B"


def test_cache_directories(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.directory("user", "/w") == str(tmp_path / "xdg" / "mmjax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.directory("user", "/w") == str(tmp_path / "home" / ".cache" / "mmjax" / "xla")
    assert compilation_cache.directory("workdir", "/w") == "/w/xla_cache"
    assert compilation_cache.directory("off", "/w") is None
    assert compilation_cache.directory("/some/dir", "/w") == "/some/dir"


def _compile_new_function(scale):
    """Compile a function jax has not seen in this process; -> the cache's Watch."""
    fn = jax.jit(lambda x: jnp.tanh(x @ x) * scale)
    x = jnp.ones((16, 16))
    with compilation_cache.Watch() as watch:
        fn.lower(x).compile()
    return watch


def _entries(directory):
    """The cache's entries for the functions above (not for jax's own small helpers)."""
    return [name for name in os.listdir(directory) if name.startswith("jit__lambda-")]


def test_switching_directories_in_one_process(tmp_path):
    """jax opens its cache once per process: a second directory is used only because `use`
    resets it; on leaving, the previous setting is back."""
    before = jax.config.jax_compilation_cache_dir
    first, second = tmp_path / "first", tmp_path / "second"
    with compilation_cache.use(str(first), "unused") as path:
        assert path == str(first)
        assert _compile_new_function(2.0).written
        assert _compile_new_function(2.0).hit  # the same program again: loaded
        with compilation_cache.use("off", "unused") as off:
            assert off is None
            watch = _compile_new_function(3.0)
            assert not watch.written and not watch.hit
    with compilation_cache.use(str(second), "unused"):
        assert _compile_new_function(4.0).written
    assert len(_entries(first)) == len(_entries(second)) == 1  # "off" wrote nothing in `first`
    assert jax.config.jax_compilation_cache_dir == before


def test_no_cache_on_several_cpu_devices():
    assert "deadlock" in compilation_cache.unsupported(jax.devices())  # conftest's 8 CPU devices
    assert compilation_cache.unsupported(jax.devices()[:1]) is None


_TRAIN = """
import sys
import ml_collections
from mmjax import train
from tests.helpers import tiny_train_config

workdir, cache, steps = sys.argv[1:]
config = tiny_train_config(total_steps=int(steps), log_every=1, compilation_cache=cache, peak_tflops=1.0)
config.evals = ml_collections.ConfigDict()  # the step is what gets cached; evaluating only costs time
train.run(config, workdir)
"""


def _train(workdir, cache, steps):
    # One CPU device: on several, the trainer keeps the cache off (test_no_cache_on_several_cpu_devices).
    env = {**os.environ, "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-c", _TRAIN, str(workdir), cache, str(steps)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_a_second_run_loads_its_train_step_from_the_cache(tmp_path):
    cache = str(tmp_path / "xla")
    first = _train(tmp_path / "first", cache, steps=2)
    assert f"; saved to the compilation cache {cache}\n" in first and "loaded from" not in first
    assert "memory per device: arguments " in first
    assert "TFLOP/s/dev  MFU " in first and "data_wait " in first
    rows = [json.loads(line) for line in open(tmp_path / "first" / "metrics.jsonl")]
    timed = rows[-1]  # step 2; step 1 compiled, so its window is empty
    assert [r["step"] for r in rows] == [1, 2] and "step_seconds" not in rows[0]
    assert timed["mfu"] == timed["tflops_per_device"]  # the peak is 1 TFLOP/s
    assert timed["examples_per_sec"] == pytest.approx(16 / timed["step_seconds"], rel=1e-12)
    assert 0 <= timed["data_wait"] <= 1

    second = _train(tmp_path / "second", cache, steps=1)
    assert f"loaded from the compilation cache {cache} in " in second and "saved to" not in second
