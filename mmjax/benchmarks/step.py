"""Train-step throughput against this machine's dense f32 matmul throughput.

    python -m mmjax.benchmarks.step --config=configs/coca.py [--config.batch_size=256] [--steps=20]

Prints one JSON object per measurement, then a table. Achieved GFLOP/s = analytic FLOPs per
step (mmjax.tools.flops) / median step time; XLA's own count is printed beside it.
"""
from __future__ import annotations

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

from mmjax import train
from mmjax.data import pipeline
from mmjax.parallel import sharding
from mmjax.tools import flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the square f32 matmul reference.")


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


def step_measurement(config, repeats: int) -> dict:
    parts = train.build_components(config, tempfile.mkdtemp() + "/tokenizer.model")
    batch = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, _ = train.build_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        batch = pipeline.to_global({k: batch[k] for k in ("image", "tokens")}, sharding.batch_sharding(parts.mesh))
        # No donation: the benchmark reuses one state for every timed call.
        step = jax.jit(parts.train_step(config))
        xla_flops = step.lower(state, batch).compile().cost_analysis()["flops"]
        seconds = median_seconds(lambda: step(state, batch), repeats)
    analytic = flops.train_step_flops(config, parts.tokenizer.vocab_size)
    return {
        "name": "train_step",
        "batch_size": config.batch_size,
        "step_seconds": seconds,
        "examples_per_sec": config.batch_size / seconds,
        "analytic_gflop_per_step": analytic / 1e9,
        "xla_gflop_per_step": xla_flops / 1e9,
        "gflops": analytic / seconds / 1e9,
    }


def main(argv):
    del argv
    env = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__,
           "cpu": platform.processor() or platform.machine()}
    config = _CONFIG.value
    step = {**step_measurement(config, _STEPS.value), **env}
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
    print("\n| measurement | examples/s | GFLOP/s | step as a fraction of it |\n|---|---|---|---|")
    print(f"| train step (batch {step['batch_size']}) | {step['examples_per_sec']:.0f} | {step['gflops']:.1f} | - |")
    for ref in (square, shaped):
        print(f"| {ref['name']} | - | {ref['gflops']:.1f} | {step['gflops'] / ref['gflops']:.2f} |")


if __name__ == "__main__":
    app.run(main)
