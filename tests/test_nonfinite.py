"""The non-finite guard: a NaN step is skipped (state unchanged) and counted; K in a row stop the
run with every checkpoint finite; metrics.jsonl stays valid JSON."""
import json

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import checkpoint, nonfinite, train
from mmjax.data import pipeline
from mmjax.errors import RunStopped
from mmjax.parallel import sharding
from tests.helpers import tiny_train_config


def poison(batch):
    """Float images are taken as already normalised: NaN pixels make the loss NaN."""
    return {**batch, "image": np.full(batch["image"].shape, np.nan, np.float32)}


def test_nonfinite_step_leaves_state_unchanged(tmp_path):
    config = tiny_train_config()
    parts = train.build_components(config, str(tmp_path / "tok.model"))
    raw = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    good = {"image": raw["image"].astype(np.float32) / 127.5 - 1, "tokens": raw["tokens"]}
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, _ = train.build_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        step = jax.jit(parts.train_step(config))
        to_global = lambda b: pipeline.to_global(b, sharding.batch_sharding(parts.mesh))
        state, logs = step(state, to_global(good))
        assert not logs["nonfinite"]
        before = jax.device_get(state)
        state, logs = step(state, to_global(poison(good)))
        after = jax.device_get(state)
    assert logs["nonfinite"] and np.isnan(logs["loss"])
    assert after["step"] == before["step"] + 1  # the step (and the data) move on...
    chex.assert_trees_all_equal(after["params"], before["params"])  # ...the model does not
    chex.assert_trees_all_equal(after["opt_state"], before["opt_state"])


def test_monitor_counts_and_stops_after_k_in_a_row():
    monitor = nonfinite.NonFiniteMonitor(3, "lower the learning rate")
    flags = [False, True, False, True, True]
    for step, flag in enumerate(flags, start=1):
        monitor.push(step, np.bool_(flag))
    monitor.flush()
    assert (monitor.total, monitor.in_a_row) == (3, 2)
    monitor.push(6, np.bool_(True))
    with pytest.raises(RunStopped, match=r"steps 4-6: .*3 times in a row.*step 3's.*lower the learning rate"):
        monitor.flush()


def run_with_nan_at(monkeypatch, steps_with_nan, config, workdir):
    """train.run with NaN images at the given (1-based) steps."""
    original, calls = pipeline.to_global, []

    def to_global(batch, batch_sharding):
        calls.append(None)
        batch = {**batch, "image": batch["image"].astype(np.float32) / 127.5 - 1}
        return original(poison(batch) if len(calls) in steps_with_nan else batch, batch_sharding)

    monkeypatch.setattr(pipeline, "to_global", to_global)
    return train.run(config, str(workdir))


def strict_rows(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nan_steps_are_skipped_counted_and_k_in_a_row_stop_the_run(tmp_path, monkeypatch):
    config = tiny_train_config(total_steps=12, log_every=1, eval_every=100, checkpoint_every=2,
                               max_nonfinite_steps=3)
    with pytest.raises(RunStopped, match=r"steps 6-8: loss or gradient norm not finite 3 times in a row"):
        run_with_nan_at(monkeypatch, {3, 6, 7, 8, 9}, config, tmp_path)
    rows = [r for r in strict_rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] is None for r in rows] == [False, False, True, False, False, True, True]  # NaN -> null
    assert [r["train/skipped_nonfinite"] for r in rows] == [0, 0, 1, 1, 1, 2, 3]
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), 5)
    assert ckpt.latest_step() == 6  # step 8 was not saved: the guard stopped the run first
    with jax.set_mesh(sharding.make_mesh(config.mesh)):
        parts = train.build_components(config, str(tmp_path / "tokenizer.model"))
        shapes, _ = train.abstract_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        step, state, _ = ckpt.restore_latest(shapes)
    ckpt.close()
    assert step == 6 and bool(nonfinite.all_finite(state))
