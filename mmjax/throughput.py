"""How fast a train step runs against what the chip could do: TFLOP/s per device and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = analytic FLOPs per step (mmjax.tools.flops)
/ step seconds / devices / the chip's dense bf16 peak. Also what the compiled step holds in
memory, so one report says what the step costs in time and in bytes.
"""
from __future__ import annotations

# Dense (no 2:4 sparsity) bf16 peak TFLOP/s per chip, keyed by a lower-case substring of jax's
# `device_kind`; the first match wins, so a name must come before any shorter name inside it
# ("tpu v5 lite" before "tpu v5"). Sources: Google Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: 275, 197, 459, 918 per chip); NVIDIA
# datasheets (A100: 312; H100 SXM: 989, PCIe: 756, NVL: 835 -- half the "with sparsity"
# figures; H200 SXM: 989, NVL: 835).
PEAK_TFLOPS = (
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # what jax calls a v5p
    ("tpu v6 lite", 918.0),  # v6e, Trillium
    ("tpu v6e", 918.0),
    ("tpu v4", 275.0),
    ("a100", 312.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200 nvl", 835.0),
    ("h200", 989.0),
)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """The chip's dense bf16 peak in TFLOP/s: `override` if given, else the table's row for
    `device_kind`, else None (a CPU, or a chip the table does not list)."""
    if override is not None:
        return float(override)
    kind = device_kind.lower()
    return next((peak for pattern, peak in PEAK_TFLOPS if pattern in kind), None)


def tflops_per_device(flops_per_step: float, step_seconds: float, num_devices: int) -> float:
    return flops_per_step / step_seconds / num_devices / 1e12


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak: float | None) -> float | None:
    """Share of the peak the step achieves (0.31 = 31%); None without a peak."""
    if peak is None:
        return None
    return tflops_per_device(flops_per_step, step_seconds, num_devices) / peak


_MEMORY_FIELDS = (  # CompiledMemoryStats attribute -> what the report calls it
    ("argument_size_in_bytes", "arguments"),
    ("output_size_in_bytes", "outputs"),
    ("temp_size_in_bytes", "temporaries"),
    ("generated_code_size_in_bytes", "code"),
)


def memory_analysis(compiled):
    """XLA's CompiledMemoryStats of a compiled program; None where the backend does not say
    (memory_analysis() is None or raises)."""
    try:
        return compiled.memory_analysis()
    except Exception:  # backends without the analysis raise (e.g. Unimplemented)
        return None


def memory_per_device(compiled) -> dict[str, int]:
    """The compiled step's buffers on one device in bytes, e.g. {"arguments": ..., "temporaries":
    ...}; {} where the backend does not say."""
    stats = memory_analysis(compiled)
    if stats is None:
        return {}
    return {name: int(getattr(stats, attr)) for attr, name in _MEMORY_FIELDS if hasattr(stats, attr)}


def describe_memory(memory: dict[str, int]) -> str:
    """memory_per_device's dict as one line: 'arguments 20.2 MiB, outputs 19.8 MiB, ...'."""
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in memory.items())


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class LogWindow:
    """The steps since the last log line: their time per step, the FLOP rate that implies,
    and the share of the window the loop spent waiting for the next batch (near 1: the
    input pipeline, not the chip, sets the pace)."""

    def __init__(self, batch_size: int, flops_per_step: float, num_devices: int, peak: float | None):
        self.batch_size, self.flops_per_step, self.num_devices, self.peak = (
            batch_size, flops_per_step, num_devices, peak)
        self.started = False

    def restart(self, step: int, now: float) -> None:
        self.started, self.start, self.step, self.data_wait = True, now, step, 0.0

    def add_data_wait(self, seconds: float) -> None:
        if self.started:  # the batch that precedes the first window belongs to no window
            self.data_wait += seconds

    def measure(self, step: int, now: float) -> dict[str, float]:
        """The window's rates; {} when it holds no step (right after compiling or evaluating)."""
        if not self.started or step <= self.step:
            return {}
        elapsed = now - self.start
        seconds = elapsed / (step - self.step)
        rates = {
            "step_seconds": seconds,
            "examples_per_sec": self.batch_size / seconds,
            "tflops_per_device": tflops_per_device(self.flops_per_step, seconds, self.num_devices),
            "data_wait": self.data_wait / elapsed,
        }
        if self.peak is not None:
            rates["mfu"] = mfu(self.flops_per_step, seconds, self.num_devices, self.peak)
        return rates


def describe(rates: dict[str, float]) -> str:
    """The console's view of LogWindow.measure: '0.123 s/step  1040 ex/s  3.1 TFLOP/s/dev  MFU 31%  data_wait 2%'."""
    if not rates:
        return ""
    text = (f"{_figure(rates['step_seconds'])} s/step  {rates['examples_per_sec']:.0f} ex/s  "
            f"{_figure(rates['tflops_per_device'])} TFLOP/s/dev")
    if "mfu" in rates:
        text += f"  MFU {rates['mfu']:.0%}"
    return text + f"  data_wait {rates['data_wait']:.0%}"


def _figure(x: float) -> str:
    """Three significant digits, never in exponent notation above 1: 0.0482, 3.1, 412, 1000."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"
