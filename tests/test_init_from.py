"""config.init: a new run's parameters from another workdir; step and optimizer state fresh.

Only the end-to-end test compiles a model: the others build parameters from the model's
abstract shapes (random values placed with the trainer's shardings), which is all
`init_from.apply` sees of a run.
"""
import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from mmjax import checkpoint, inference, init_from, run_record, train
from mmjax.errors import ConfigError, UserError
from mmjax.models import scan_layout
from tests.helpers import tiny_train_config, tiny_zoo_model

IMAGE_TOWER = ("image_encoder", "contrastive_pooler", "caption_pooler", "image_proj")  # CoCa's


def config_for(model="configs/coca.py", depth=None, scan_layers=False, **overrides):
    """A tiny run without evaluators (they cost seconds and test nothing here)."""
    model_overrides = {k: overrides.pop(k) for k in list(overrides) if k.startswith("model.")}
    config = tiny_train_config(**{"total_steps": 2, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
                                  "objective.contrastive.options.impl": "dense", **overrides})
    if depth is not None or model != "configs/coca.py":
        config.model = tiny_zoo_model(model, depth or 1)
    config.update_from_flattened_dict(model_overrides)  # after the model section is replaced: none is lost
    if config.model.name != "coca":
        config.objective.caption.weight = 0.0
    config.model.scan_layers = scan_layers
    config.evals = ml_collections.ConfigDict()
    return config


def random_params(config, tokenizer_path, seed):
    """Parameters for `config`'s model laid out as the trainer lays them out; and the tokenizer."""
    parts = train.build_components(config, tokenizer_path, jax.devices())
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        shapes = inference.abstract_params(parts.model, config, parts.mesh, parts.rules)
    rng = np.random.default_rng(seed)
    place = lambda s: jax.device_put((0.1 * rng.standard_normal(s.shape)).astype(s.dtype), s.sharding)
    return jax.tree.map(place, shapes), parts.tokenizer


def write_workdir(workdir, config, seed=1):
    """A workdir as a run or an importer leaves it: config.json, the tokenizer, a checkpoint."""
    os.makedirs(workdir)
    params, tokenizer = random_params(config, os.path.join(workdir, run_record.TOKENIZER), seed)
    run_record.write(workdir, config, tokenizer)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    ckpt.save(1, {"step": np.int32(1), "params": params}, {})
    ckpt.close()
    return str(workdir)


def flat(params):
    """{unrolled path: numpy array}: what init compares, whatever the layout."""
    return traverse_util.flatten_dict(jax.device_get(scan_layout.unroll_blocks(params)), sep="/")


def source_params(workdir):
    return flat(inference.load(workdir).params)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_workdir(tmp_path_factory.mktemp("source") / "run", config_for())


def apply(config, tmp_path):
    """(fresh parameters, the parameters init makes of them) for a new run of `config`."""
    fresh, _ = random_params(config, str(tmp_path / "tok.model"), seed=0)
    return fresh, init_from.apply(config, fresh, jax.devices())


def test_a_fine_tune_starts_from_the_source_trains_with_lit_and_resumes_its_own_checkpoint(
        source, tmp_path, monkeypatch, capsys):
    started = []  # (step, state) each run's training loop starts from
    real_loop = train._loop

    def spy(config, state, step, *rest):
        started.append((step, jax.device_get(state)))  # before the first step donates it
        return real_loop(config, state, step, *rest)

    monkeypatch.setattr(train, "_loop", spy)
    copy = shutil.copytree(source, tmp_path / "source")  # deleted before the resume
    config = config_for(**{"init.path": str(copy), "model.lock_image": True})
    workdir = str(tmp_path / "fine_tune")
    train.run(config, workdir)

    step, state = started[0]
    assert step == 0 and int(state["step"]) == 0
    origin = source_params(source)
    first = flat(state["params"])
    assert first.keys() == origin.keys()
    for path, value in first.items():
        np.testing.assert_array_equal(value, origin[path], err_msg=path)
    assert not any(np.any(x) for x in jax.tree.leaves(state["opt_state"]))  # Adam's count and moments: 0
    out = capsys.readouterr().out
    assert f"init: {len(origin)} of {len(origin)} parameter arrays" in out and f"from {copy}\n" in out

    # LiT: the locked image tower is still the source's, bit for bit; the text tower learned.
    trained = flat(inference.load(workdir).params)
    for path, value in trained.items():
        if path.split("/")[0] in IMAGE_TOWER:
            np.testing.assert_array_equal(value, origin[path], err_msg=path)
        elif path.startswith(("unimodal_decoder/", "text_proj/")):
            assert not np.array_equal(value, origin[path]), path

    # Re-run: it restores its own step-2 checkpoint; init is not read (its source is gone).
    shutil.rmtree(copy)
    train.run(config, workdir)
    step, state = started[1]
    assert step == 2
    for path, value in flat(state["params"]).items():
        np.testing.assert_array_equal(value, trained[path], err_msg=path)
    assert "init:" not in capsys.readouterr().out


def test_include_and_exclude_choose_what_comes_from_the_source(source, tmp_path, capsys):
    include, exclude = f"^({'|'.join(IMAGE_TOWER)})/", "block0/attn"
    fresh, params = apply(config_for(**{"init.path": source, "init.include": include, "init.exclude": exclude}),
                          tmp_path)
    fresh, params, origin = flat(fresh), flat(params), source_params(source)
    taken = [p for p in params if p.split("/")[0] in IMAGE_TOWER and exclude not in p]
    assert 0 < len(taken) < len(params)
    for path, value in params.items():
        np.testing.assert_array_equal(value, origin[path] if path in taken else fresh[path], err_msg=path)
    out = capsys.readouterr().out
    assert f"init: {len(taken)} of {len(params)} parameter arrays" in out
    assert f"(include '{include}', exclude '{exclude}'); the rest keep their fresh initialisation" in out


@pytest.mark.parametrize("source_scans,target_scans", [(True, False), (False, True)])
def test_scanned_and_unrolled_runs_exchange_weights(tmp_path, source_scans, target_scans):
    workdir = write_workdir(tmp_path / "source", config_for(depth=2, scan_layers=source_scans))
    fresh, params = apply(config_for(depth=2, scan_layers=target_scans, **{"init.path": workdir}), tmp_path)
    assert jax.tree.structure(params) == jax.tree.structure(fresh)  # the target's layout...
    for got, like in zip(jax.tree.leaves(params), jax.tree.leaves(fresh)):
        assert got.sharding == like.sharding and got.dtype == like.dtype  # ...and placement
    origin = source_params(workdir)
    for path, value in flat(params).items():
        np.testing.assert_array_equal(value, origin[path], err_msg=path)


@pytest.mark.parametrize("source_config,overrides,expected", [
    ({"model.vision.width": 64}, {}, r"^init: \d+ selected parameter arrays do not fit \S+ \(caption_pooler/\S+: "
                                     r"source \(2, 32\) vs target \(2, 16\); .*; \.\.\.\); leave them out .*"
                                     r"--config\.init\.exclude='\^\(caption_pooler\|contrastive_pooler\|image_encoder"),
    ({"model": "configs/clip.py"}, {"init.exclude": "^caption"},
     r"^init: \d+ selected parameter arrays do not fit \S+ \(contrastive_pooler/\S+: missing in source; .*"
     r"--config\.init\.exclude='\^caption\|\^\(contrastive_pooler\|.*\|multimodal_decoder\|unimodal_decoder\)/'"),
    ({}, {"init.include": "^nothing"}, r"selects none of this model's parameters"),
])
def test_what_does_not_fit_is_named_in_one_line(tmp_path, source_config, overrides, expected):
    workdir = write_workdir(tmp_path / "source", config_for(**source_config))
    with pytest.raises(UserError, match=expected) as error:
        apply(config_for(**{"init.path": workdir, **overrides}), tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("init,error,expected", [
    ({"init.path": "missing"}, UserError, r"init\.path /\S+/missing does not exist; set --config\.init\.path to a "),
    ({"init.path": "."}, UserError, r"is a directory without config\.json, so no mmjax workdir"),
    ({"init.path": "weights.npz"}, UserError, r"weights\.npz is a file of unknown kind; .*\.safetensors, \.bin"),
    ({"init.exclude": "text_("}, ConfigError, r"init\.exclude='text_\(' is not a regular expression"),
])
def test_a_bad_init_stops_a_new_run_before_it_starts(tmp_path, monkeypatch, init, error, expected):
    config = config_for(**init)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(error, match=expected) as raised:
        train.run(config, str(tmp_path / "run"))
    assert "\n" not in str(raised.value)
    assert not os.path.exists(tmp_path / "run")  # nothing written: fixing the flag starts a clean run


def test_init_may_change_at_resume_and_older_records_have_none():
    config = config_for(total_steps=4)
    record = run_record.as_record(config)
    del record["init"]  # a record from before config.init existed
    assert run_record.check_resume(record, config, saved_step=2) == []
    notes = run_record.check_resume(record, config_for(total_steps=4, **{"init.path": "/elsewhere"}), saved_step=2)
    assert notes == ["resuming with changed settings: init.path '' -> '/elsewhere'"]
