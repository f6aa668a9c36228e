"""Gradient accumulation's memory and time: the compiled train step's per-device memory (XLA's
analysis) and median step time for each micro-batch size, at one global batch.

    python -m mmjax.benchmarks.accumulate [--config=configs/clip.py] [--steps=1,2,4,8]
        [--mode=gradcache] [--repeats=5] [--config.batch_size=128 ...]

Prints one JSON object per accumulate.steps, then a markdown table. The default is the small
CLIP (configs/clip.py, batch 128) on one device: GradCache trades a second forward pass for
activations of batch_size / steps examples. Peak is arguments + outputs + temporaries (the
state is not donated here, so both the old and the new state count).
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from mmjax import throughput, train
from mmjax.data import pipeline
from mmjax.parallel import sharding


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (mmjax.benchmarks.step's, whose module
    defines flags at import)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config, steps: int, mode: str, repeats: int) -> dict:
    config = config.copy_and_resolve_references()
    config.accumulate.steps, config.accumulate.mode = steps, mode
    parts = train.build_components(config, tempfile.mkdtemp() + "/tokenizer.model", jax.devices()[:1])
    batch = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, _ = train.build_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        batch = pipeline.to_global({k: batch[k] for k in ("image", "tokens")}, sharding.batch_sharding(parts.mesh))
        step = jax.jit(parts.train_step(config)).lower(state, batch).compile()  # no donation: one state, many calls
        seconds = median_seconds(lambda: step(state, batch), repeats)
    memory = throughput.memory_per_device(step)
    return {"accumulate_steps": steps, "mode": mode, "micro_batch": config.batch_size // steps,
            "batch_size": config.batch_size, "step_seconds": seconds, **{f"{k}_bytes": v for k, v in memory.items()},
            "peak_bytes": sum(memory.get(k, 0) for k in ("arguments", "outputs", "temporaries"))}


def main():
    config_flag = config_flags.DEFINE_config_file("config", "configs/clip.py", "Config file.")
    steps_flag = flags.DEFINE_list("steps", ["1", "2", "4", "8"], "accumulate.steps values to measure.")
    mode_flag = flags.DEFINE_enum("mode", "gradcache", ["grads", "gradcache"], "accumulate.mode.")
    repeats_flag = flags.DEFINE_integer("repeats", 5, "Timed steps after warm-up.")

    def run(argv):
        del argv
        config = config_flag.value
        env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "cpu": platform.processor() or platform.machine()}
        rows = [{**measure(config, int(s), mode_flag.value, repeats_flag.value), **env} for s in steps_flag.value]
        for row in rows:
            print(json.dumps(row))
        print("\n| accumulate.steps | micro-batch | temporaries | peak (arguments + outputs + temporaries) | step |\n"
              "|---|---|---|---|---|")
        for r in rows:
            temporaries, peak = (throughput.format_bytes(r[k]) for k in ("temporaries_bytes", "peak_bytes"))
            print(f"| {r['accumulate_steps']} | {r['micro_batch']} | {temporaries} | {peak} | "
                  f"{r['step_seconds'] * 1e3:.0f} ms |")

    app.run(run)


if __name__ == "__main__":
    main()
