"""The trainer: sharded step parity, checkpoint round trip, exact resume, end to end."""
import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import checkpoint, optim, train
from mmjax.data import pipeline
from mmjax.models import build_model
from mmjax.objectives import objective
from mmjax.parallel import sharding
from tests.helpers import tiny_train_config


def one_step(config, devices, tmp_path):
    """Build state on a mesh of `devices` and run two jitted train steps on a fixed batch."""
    parts = train.build_components(config, str(tmp_path / "tok.model"), devices)
    batch = next(pipeline.train_iterator(config.data, parts.tokenizer, config.batch_size, config.seed))
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        state, shardings = train.build_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        step = jax.jit(parts.train_step(config), out_shardings=(shardings, None))
        batch = pipeline.to_global({k: batch[k] for k in ("image", "tokens")}, sharding.batch_sharding(parts.mesh))
        new_state, logs = step(state, batch)
        # Second step so the optimizer's moments (not just the gradient) are compared too.
        new_state, logs = step(new_state, batch)
    return jax.device_get(new_state), jax.device_get(logs), new_state


@pytest.fixture(scope="module")
def single_device_reference(tmp_path_factory):
    config = tiny_train_config(**{"objective.contrastive.options.impl": "dense"})
    config.mesh.data = 1
    return one_step(config, jax.devices()[:1], tmp_path_factory.mktemp("reference"))[:2]


@pytest.mark.parametrize(
    "mesh,impl",
    [((2, 4, 1), "dense"), ((2, 2, 2), "blockwise"), ((8, 1, 1), "ring")],
)
def test_sharded_step_equals_single_device(tmp_path, single_device_reference, mesh, impl):
    config = tiny_train_config(**{"objective.contrastive.options.impl": impl})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    sharded, logs, live = one_step(config, jax.devices(), tmp_path)
    single, ref_logs = single_device_reference
    for key in ("loss", "contrastive_loss", "caption_loss", "grad_norm"):
        np.testing.assert_allclose(logs[key], ref_logs[key], rtol=2e-5, err_msg=key)
    chex.assert_trees_all_close(sharded["params"], single["params"], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(sharded["opt_state"], single["opt_state"], rtol=1e-4, atol=1e-7)
    # The parameters really are sharded as the rules say (FSDP splits `embed`).
    if mesh[1] > 1:
        kernel = live["params"]["image_encoder"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
        assert kernel.sharding.spec[0] == "fsdp", kernel.sharding


def test_checkpoint_round_trip(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = {
        "step": jax.numpy.array(3, jax.numpy.int32),
        "params": {"w": jax.device_put(np.arange(32.0).reshape(8, 4), jax.NamedSharding(mesh, jax.P("data")))},
    }
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    ckpt.save(3, state, {"position": 17})
    ckpt.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert ckpt.latest_step() == 3
    restored, data_state = ckpt.restore(3, state)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding
    assert data_state == {"position": 17}
    ckpt.close()


def test_interrupted_save_leaves_previous_checkpoint_restorable(tmp_path):
    """A crash mid-save leaves a temporary directory that orbax never takes for a checkpoint."""
    state = {"w": jax.numpy.ones((4,))}
    directory = tmp_path / "ckpt"
    ckpt = checkpoint.Checkpointer(str(directory), keep=3)
    ckpt.save(1, state, {"position": 1})
    ckpt.close()
    # What a SIGKILL during the write of step 2 leaves: orbax's tmp folder, half written.
    partial = directory / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    ckpt = checkpoint.Checkpointer(str(directory), keep=3)
    assert ckpt.latest_step() == 1
    restored, data_state = ckpt.restore(1, state)
    np.testing.assert_array_equal(restored["w"], 1.0)
    assert data_state == {"position": 1}
    ckpt.close()


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restored_state(config, workdir, step):
    """Checkpoint `step` of `workdir` read onto the mesh and shardings `config` asks for."""
    parts = train.build_components(config, os.path.join(workdir, "tokenizer.model"))
    with jax.set_mesh(parts.mesh), nn.logical_axis_rules(parts.rules):
        shapes, _ = train.abstract_state(parts.model, parts.tx, config, parts.mesh, parts.rules)
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, read_only=True)
        state, _ = ckpt.restore(step, shapes)
        ckpt.close()
    return state


def test_run_writes_outputs_and_resumes_onto_another_mesh(tmp_path, capsys):
    """Train 4 steps on data=8; drop the step-4 checkpoint as if killed after step 2; resume on
    fsdp=4 × tensor=2: the same parameters, each array laid out as the new mesh says, and the
    uninterrupted run's loss. (Resuming on the same mesh is exact to the bit: tests/test_main*.py.)"""
    saved_on = tiny_train_config()
    saved_on.mesh.data, saved_on.mesh.fsdp, saved_on.mesh.tensor = 8, 1, 1
    restored_on = tiny_train_config()
    restored_on.mesh.data, restored_on.mesh.fsdp, restored_on.mesh.tensor = 1, 4, 2
    workdir = str(tmp_path / "run")
    results = train.run(saved_on, workdir)
    assert set(results) >= {"eval/zeroshot/top1", "eval/retrieval/image_to_text_r@1", "eval/captioning/cider"}
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in ("loss", "contrastive_loss", "caption_loss", "lr", "examples_per_sec"):
        assert key in train_rows[-1], key
    assert rows[-1]["eval/zeroshot/top1"] == results["eval/zeroshot/top1"]
    assert os.path.exists(os.path.join(workdir, "curves.png"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    before, after = restored_state(saved_on, workdir, 2), restored_state(restored_on, workdir, 2)
    chex.assert_trees_all_equal(jax.device_get(after), jax.device_get(before))
    kernel = after["params"]["image_encoder"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor"), kernel.sharding

    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    capsys.readouterr()
    train.run(restored_on, workdir)  # resumes at step 2
    assert ("Resumed from step 2 in " + workdir + ", resharded: saved on mesh data=8 × fsdp=1 × tensor=1 in 1 "
            "process, restored onto mesh data=1 × fsdp=4 × tensor=2 in 1 process") in capsys.readouterr().out
    resumed = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in resumed] == [2, 4]  # the redone step is not logged twice
    assert resumed[-1]["loss"] == pytest.approx(train_rows[-1]["loss"], rel=1e-5)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(train.ConfigError, match="not writable"):
        train.run(tiny_train_config(), str(blocker / "sub"))


def test_batch_not_divisible_by_mesh_is_a_clear_error(tmp_path):
    with pytest.raises(train.ConfigError, match="multiple of 8"):
        train.run(tiny_train_config(batch_size=12), str(tmp_path))


def test_weight_decay_skips_norms_biases_and_temperature():
    config = tiny_train_config()
    model = build_model(config.model, 40, contrastive=objective.contrastive_type(config.objective))
    params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8), np.ones((1, 7), np.int32)))["params"]
    mask = optim.decay_mask(params)
    assert not mask["logit_scale"]
    block = mask["image_encoder"]["encoder"]["block0"]
    assert not block["ln_attn"]["LayerNorm_0"]["scale"] and not block["mlp"]["fc1"]["bias"]
    assert block["mlp"]["fc1"]["kernel"] and block["attn"]["query_kernel"]
