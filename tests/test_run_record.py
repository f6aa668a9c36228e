"""The run record (workdir/config.json) and the config-drift check at resume."""
import json
import os

import pytest

from mmjax import run_record
from mmjax.configs import load_config, variants
from mmjax.errors import ConfigError

SHIPPED = [(path, v) for path in ("configs/coca.py", "configs/clip.py", "configs/siglip.py") for v in variants(path)]


def coca(**overrides):
    config = load_config("configs/coca.py")
    config.update_from_flattened_dict(overrides)
    return config


def saved(**overrides) -> dict:
    return run_record.as_record(coca(**overrides))


@pytest.mark.parametrize("path,variant", SHIPPED)
def test_every_shipped_config_round_trips_unchanged(tmp_path, path, variant):
    config = load_config(path, variant)
    run_record.write(str(tmp_path), config)
    record = run_record.read(str(tmp_path))
    assert record == run_record.as_record(config)
    assert run_record.check_resume(record, config, saved_step=1) == []


def test_no_record_reads_as_none(tmp_path):
    assert run_record.read(str(tmp_path)) is None


def test_shape_change_is_refused_naming_key_values_and_the_way_out():
    with pytest.raises(ConfigError) as e:
        run_record.check_resume(saved(), coca(**{"model.vision.width": 64}), saved_step=250)
    message = str(e.value)
    assert "model.vision.width: saved 128, now 64" in message
    assert "step 250" in message and "--workdir" in message
    assert "\n" not in message


def test_every_breaking_key_is_listed_and_resumable_ones_are_not():
    changed = coca(**{"model.vision.width": 64, "data.train": "wds:/data/{0..9}.tar", "log_every": 5})
    with pytest.raises(ConfigError) as e:
        run_record.check_resume(saved(), changed, saved_step=250)
    assert "model.vision.width" in str(e.value) and "data.train: saved 'shapes'" in str(e.value)
    assert "log_every" not in str(e.value)


def test_long_values_are_truncated():
    with pytest.raises(ConfigError) as e:
        run_record.check_resume(saved(), coca(**{"data.train": "wds:/" + "x" * 200}), saved_step=250)
    assert "x" * 60 not in str(e.value) and "…" in str(e.value)


def test_resumable_changes_make_one_note():
    changed = coca(**{
        "log_every": 5, "total_steps": 1000, "eval.batch_size": 64, "mesh.data": 2, "mesh.fsdp": 4,
        "optimizer.learning_rate": 3e-4, "model.remat": "dots", "objective.contrastive.options.impl": "dense",
        "data.num_eval": 128,
    })
    default = coca()
    notes = run_record.check_resume(saved(), changed, saved_step=250)
    assert len(notes) == 1
    assert notes[0].startswith("resuming with changed settings: ")
    for part in (f"log_every {default.log_every} -> 5", f"total_steps {default.total_steps} -> 1000",
                 "eval.batch_size 256 -> 64", "mesh.data -1 -> 2", "mesh.fsdp 1 -> 4", "optimizer.learning_rate 0.001 -> 0.0003", "model.remat 'none' -> 'dots'",
                 "objective.contrastive.options.impl 'blockwise' -> 'dense'", "data.num_eval 512 -> 128"):
        assert part in notes[0]


@pytest.mark.parametrize("total_steps", [200, 250])
def test_total_steps_at_or_below_the_checkpoint_is_a_note(total_steps):
    notes = run_record.check_resume(saved(), coca(total_steps=total_steps), saved_step=250)
    assert notes == [
        f"the checkpoint is already at step 250 ≥ total_steps {total_steps}: nothing will be trained and "
        "step 250's final evaluation is reported; raise --config.total_steps to train on"
    ]


def test_finished_run_relaunched_unchanged_is_a_note():
    total = coca().total_steps
    notes = run_record.check_resume(saved(), coca(), saved_step=total)
    assert len(notes) == 1 and f"already at step {total} ≥ total_steps {total}" in notes[0]


@pytest.mark.parametrize("key,value", [
    ("data.train", "shapes:eval"), ("data.text_len", 16), ("data.augment.crop", "random_resized"),
    ("data.shuffle_buffer", 10), ("data.worker_count", 2), ("batch_size", 64), ("seed", 1),
    ("model.scan_layers", True), ("model.lock_image", True), ("objective.contrastive.type", "siglip"),
])
def test_breaking_changes_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_record.check_resume(saved(), coca(**{key: value}), saved_step=250)


def test_grad_clip_norm_may_change_but_not_appear_or_disappear():
    notes = run_record.check_resume(saved(), coca(**{"optimizer.grad_clip_norm": 0.5}), saved_step=250)
    assert notes == ["resuming with changed settings: optimizer.grad_clip_norm 1.0 -> 0.5"]
    with pytest.raises(ConfigError, match=r"optimizer\.grad_clip_norm: saved 1\.0, now 0\.0"):
        run_record.check_resume(saved(), coca(**{"optimizer.grad_clip_norm": 0.0}), saved_step=250)


def test_keys_only_one_side_has_are_classified_like_any_other():
    record = saved()
    del record["max_nonfinite_steps"]  # a record from before the key existed
    notes = run_record.check_resume(record, coca(), saved_step=250)
    assert notes == ["resuming with changed settings: max_nonfinite_steps (absent) -> 5"]
    record["model"]["retired_option"] = 3
    with pytest.raises(ConfigError, match=r"model\.retired_option: saved 3, now \(absent\)"):
        run_record.check_resume(record, coca(), saved_step=250)


def test_a_record_from_before_a_model_option_existed_resumes_with_its_old_value():
    record = saved()
    del record["model"]["layernorm_eps"], record["model"]["mlp_activation"]
    assert run_record.check_resume(record, coca(), saved_step=250) == []
    with pytest.raises(ConfigError, match=r"model\.mlp_activation: saved 'gelu_tanh', now 'gelu'"):
        run_record.check_resume(record, coca(**{"model.mlp_activation": "gelu"}), saved_step=250)


@pytest.mark.parametrize("crashing", ["fsync", "replace"])  # mid-write, or before the rename
def test_an_interrupted_write_keeps_the_old_record(tmp_path, monkeypatch, crashing):
    workdir = str(tmp_path)
    run_record.write(workdir, coca())

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, crashing, crash)
    with pytest.raises(KeyboardInterrupt):
        run_record.write(workdir, coca(total_steps=5))
    with open(run_record.path(workdir)) as f:
        assert json.load(f)["total_steps"] == coca().total_steps
    assert os.listdir(workdir) == ["config.json"]  # no temporary file left behind


def test_an_unreadable_record_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"total_steps": 8')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        run_record.read(str(tmp_path))
