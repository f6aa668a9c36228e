"""Resuming a workdir: an unreadable latest checkpoint falls back to the previous one; a config
that no longer matches the checkpoint is refused in one line, a harmless change is noted."""
import json
import os

import pytest

from mmjax import train
from mmjax.errors import ConfigError
from tests.helpers import tiny_train_config


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def truncate_largest_file(step_dir):
    """Half of the largest array data file is cut off (orbax's OCDBT layout: state/d/<hash>)."""
    files = [os.path.join(step_dir, "state", "d", f) for f in os.listdir(os.path.join(step_dir, "state", "d"))]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, capfd):
    config = tiny_train_config(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2, keep_checkpoints=3)
    train.run(config, str(tmp_path))
    straight = losses(tmp_path)
    truncate_largest_file(tmp_path / "checkpoints" / "4")
    capfd.readouterr()
    train.run(config, str(tmp_path))
    out, err = capfd.readouterr()
    warnings = [line for line in err.splitlines() if "checkpoint step 4" in line]
    assert len(warnings) == 1 and "cannot be read" in warnings[0] and "trying step 2" in warnings[0], err
    assert "Resumed from step 2" in out
    assert (tmp_path / "checkpoints_unreadable" / "4").is_dir()  # kept for a post-mortem
    assert (tmp_path / "checkpoints" / "4").is_dir()  # saved again by the resumed run
    assert losses(tmp_path) == pytest.approx(straight, rel=1e-6)  # steps 3-4 redone exactly


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    train.run(tiny_train_config(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2), str(workdir))
    return workdir


def test_a_shape_change_is_refused_in_one_line(finished_workdir):
    config = tiny_train_config(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    config.model.vision.width = 64
    with pytest.raises(ConfigError) as refused:
        train.run(config, str(finished_workdir))
    message = str(refused.value)
    assert "\n" not in message
    assert "model.vision.width: saved 32, now 64" in message and "--workdir" in message


def test_a_cadence_change_resumes_with_a_note(finished_workdir, capfd):
    config = tiny_train_config(total_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
    train.run(config, str(finished_workdir))
    out = capfd.readouterr().out
    assert "note: resuming with changed settings: log_every 1 -> 2" in out
    assert "nothing will be trained" in out
