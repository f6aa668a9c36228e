"""Train-step throughput against the chip's peak (MFU) and this machine's dense f32 matmul.

    python -m mmjax.benchmarks.step --config=configs/coca.py [--config.batch_size=256] [--steps=20]
        [--peak_tflops=989]

Prints one JSON object per measurement, then a table. Achieved GFLOP/s = analytic FLOPs per
step (mmjax.tools.flops) / median step time; XLA's own count is printed beside it. MFU =
TFLOP/s per device / the peak (--peak_tflops, else the device's row of
mmjax.throughput.PEAK_TFLOPS; null where neither gives one, e.g. a CPU). Also the compile
seconds and the compiled step's memory per device.
"""
from __future__ import annotations

from mmjax import host_memory

if __name__ == "__main__":  # before jax loads: glibc reads malloc tunables at start-up only
    host_memory.restart_with_kept_buffers("mmjax.benchmarks.step")

import json
import platform
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from mmjax import throughput, train
from mmjax.data import pipeline
from mmjax.parallel import sharding
from mmjax.tools import flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the square f32 matmul reference.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Dense bf16 peak TFLOP/s per device for MFU (default: the "
                           "device's row of mmjax.throughput.PEAK_TFLOPS, or config.peak_tflops).")


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * m * k * n / median_seconds(lambda: matmul(a, b), repeats) / 1e9


def step_measurement(config, repeats: int, peak: float | None) -> dict:
    parts = train.build_components(config, tempfile.mkdtemp() + "/tokenizer.model")
    batch = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, _ = train.build_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        batch = pipeline.to_global({k: batch[k] for k in ("image", "tokens")}, sharding.batch_sharding(parts.mesh))
        # No donation: the benchmark reuses one state for every timed call.
        start = time.perf_counter()
        step = jax.jit(parts.train_step(config)).lower(state, batch).compile()
        compile_seconds = time.perf_counter() - start
        seconds = median_seconds(lambda: step(state, batch), repeats)
    analytic = flops.train_step_flops(config, parts.tokenizer.vocab_size)
    devices = parts.mesh.devices.size
    return {
        "name": "train_step",
        "batch_size": config.batch_size,
        "step_seconds": seconds,
        "examples_per_sec": config.batch_size / seconds,
        "analytic_gflop_per_step": analytic / 1e9,
        "xla_gflop_per_step": step.cost_analysis()["flops"] / 1e9,
        "gflops": analytic / seconds / 1e9,
        "tflops_per_device": throughput.tflops_per_device(analytic, seconds, devices),
        "peak_tflops": peak,
        "mfu": throughput.mfu(analytic, seconds, devices, peak),
        "compile_seconds": compile_seconds,
        "memory_per_device_bytes": throughput.memory_per_device(step),
    }


def main(argv):
    del argv
    env = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__,
           "cpu": platform.processor() or platform.machine()}
    config = _CONFIG.value
    peak = throughput.peak_tflops(env["device"], _PEAK.value if _PEAK.value is not None else config.get("peak_tflops"))
    step = {**step_measurement(config, _STEPS.value, peak), **env}
    n = _MATMUL.value
    square = {"name": f"matmul_f32_{n}x{n}x{n}", "gflops": matmul_gflops(n, n, n, _STEPS.value), **env}
    # The model's own largest matmul: the vision MLP, [batch·patches, width] x [width, mlp_dim].
    v = config.model.vision
    rows = config.batch_size * (config.data.image_size // v.patch_size) ** 2
    shaped = {"name": f"matmul_f32_{rows}x{v.width}x{v.mlp_dim}",
              "gflops": matmul_gflops(rows, v.width, v.mlp_dim, _STEPS.value), **env}
    step["fraction_of_matmul"] = step["gflops"] / square["gflops"]
    step["fraction_of_model_shaped_matmul"] = step["gflops"] / shaped["gflops"]
    for row in (step, square, shaped):
        print(json.dumps(row))
    mfu = "-" if step["mfu"] is None else f"{step['mfu']:.1%} of {step['peak_tflops']:g}"
    print("\n| measurement | examples/s | GFLOP/s | TFLOP/s per device | MFU | step as a fraction of it |\n"
          "|---|---|---|---|---|---|")
    print(f"| train step (batch {step['batch_size']}) | {step['examples_per_sec']:.0f} | {step['gflops']:.1f} | "
          f"{step['tflops_per_device']:.3g} | {mfu} | - |")
    for ref in (square, shaped):
        print(f"| {ref['name']} | - | {ref['gflops']:.1f} | - | - | {step['gflops'] / ref['gflops']:.2f} |")
    memory = throughput.describe_memory(step["memory_per_device_bytes"])
    print(f"\ncompiled in {step['compile_seconds']:.1f} s; memory per device: {memory or 'not reported'}")


if __name__ == "__main__":
    app.run(main)
