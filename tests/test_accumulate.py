"""Gradient accumulation (mmjax.objectives.accumulate): one step in micro-batches equals the
full-batch step (loss, per-term losses, gradients, updated parameters), with GradCache for
CLIP and CoCa and summed gradients for a captioning-only CoCa, on one device and on a
data=2 × fsdp=4 mesh; and the compiled step's memory falls as the micro-batch shrinks.

Gradients are compared through an SGD step of rate 1 (new params = params − grads); AdamW's
first step, ≈ lr·sign(g), would hide them.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import throughput, train, train_step, validation
from mmjax.configs import load_config
from mmjax.errors import ConfigError
from mmjax.models import build_model
from mmjax.objectives import accumulate, objective
from mmjax.parallel import sharding
from tests.helpers import tiny_train_config, tiny_zoo_model

VOCAB, PAD, BATCH = 64, 0, 16


def tiny_config(family: str, **overrides):
    """tests.helpers' tiny CoCa, or for "clip"/"siglip" the small CLIP's towers and objective at that size;
    then `overrides` (dotted keys)."""
    config = tiny_train_config()
    if family in ("clip", "siglip"):
        config.model = tiny_zoo_model("configs/clip.py", depth=1)
        config.objective = load_config(f"configs/{family}.py").objective
        config.objective.contrastive.options.block_size = 8
        del config.evals.captioning
    config.batch_size = BATCH
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[leaf] = value
    return config


def fixed_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (n, 8), dtype=np.int32)
    tokens[np.arange(n), rng.integers(3, 8, n)] = PAD  # captions of different lengths: unequal token shares
    tokens = np.where(np.cumsum(tokens == PAD, axis=1) > 0, PAD, tokens)
    return {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "tokens": tokens}


def sgd_step(config, mesh, batch):
    """One jitted train step with SGD at rate 1: -> (logs, params before, params after)."""
    rules = sharding.rules_from_config(config.mesh)
    model = build_model(config.model, VOCAB, PAD, contrastive=objective.contrastive_type(config.objective))
    tx = optax.sgd(1.0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = train.build_state(model, tx, config, mesh, rules)
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        step = train_step.make_train_step(model, tx, lambda s: 1.0, config, mesh, PAD)
        new_state, logs = jax.jit(step, out_shardings=(shardings, None))(state, batch)
    return jax.device_get(logs), jax.device_get(state["params"]), jax.device_get(new_state["params"])


def assert_same_step(reference, accumulated):
    (ref_logs, params, ref_new), (logs, _, new) = reference, accumulated
    assert ref_logs.keys() == logs.keys()
    for key in ref_logs:
        np.testing.assert_allclose(logs[key], ref_logs[key], rtol=1e-5, atol=1e-7, err_msg=key)
    ref_grads = jax.tree.map(np.subtract, params, ref_new)
    grads = jax.tree.map(np.subtract, params, new)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)  # f32 sums in another order
    chex.assert_trees_all_close(new, ref_new, rtol=1e-5, atol=1e-5)


CASES = [
    # (family, mode, overrides, mesh (data, fsdp) or None for one device). One device: 4 micro-batches
    # of 4; the mesh: 2 micro-batches of 8, one row per batch shard.
    ("clip", "gradcache", {}, None),
    ("coca", "gradcache", {}, (2, 4)),
    ("coca", "grads", {"objective.contrastive.weight": 0.0}, None),
    ("siglip", "gradcache", {}, (2, 4)),
]


@pytest.mark.parametrize("family,mode,overrides,mesh_shape", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'mesh' if c[3] else 'one_device'}" for c in CASES])
def test_accumulated_step_equals_full_batch_step(family, mode, overrides, mesh_shape):
    batch = fixed_batch(BATCH)
    if mesh_shape is None:
        mesh, micro_steps = sharding.make_mesh(load_config("configs/coca.py").mesh, jax.devices()[:1]), 4
    else:
        mesh = jax.make_mesh(mesh_shape + (1,), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        micro_steps = BATCH // sharding.num_batch_shards(mesh)
    config = tiny_config(family, **overrides)
    config.accumulate.mode = mode
    reference = sgd_step(config, mesh, batch)
    config.accumulate.steps = micro_steps
    validation.validate(config)
    train_step.check_accumulation(config, mesh)
    assert_same_step(reference, sgd_step(config, mesh, batch))


def test_micro_batches_split_every_shard_and_merge_back():
    x = np.arange(24)
    micro = accumulate.split(x, steps=3, shards=4)  # 4 shards of 6 rows: micro-batch i takes rows 2i, 2i+1 of each
    np.testing.assert_array_equal(micro[0], [0, 1, 6, 7, 12, 13, 18, 19])
    np.testing.assert_array_equal(accumulate.merge(micro, shards=4), x)


@pytest.mark.parametrize("overrides,expected", [
    ({"accumulate.steps": 4, "accumulate.mode": "grads"}, "--config.accumulate.mode=gradcache"),
    ({"accumulate.steps": 3}, "a divisor of 16"),
    ({"accumulate.mode": "micro"}, "grads, gradcache"),
])
def test_bad_accumulation_is_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        validation.validate(tiny_config("coca", **overrides))
    assert "\n" not in str(e.value)


def test_micro_batch_must_split_over_the_batch_shards():
    config = tiny_config("coca", **{"accumulate.steps": 4})  # micro-batches of 4 rows, 8 shards
    mesh = jax.make_mesh((2, 4, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with pytest.raises(ConfigError, match="multiple of the 8 batch shards") as e:
        train.check_config(config, mesh)
    assert "--config.accumulate.steps" in str(e.value)


def test_compiled_memory_falls_as_the_micro_batch_shrinks():
    """A CLIP whose activations dominate: 64 px images in 64 patches, width 64, 2 blocks, batch 32."""
    config = tiny_config("clip", **{"data.image_size": 64})
    config.batch_size = 32
    config.model.vision.update(dict(patch_size=8, width=64, mlp_dim=256, depth=2))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    batch = jax.ShapeDtypeStruct((32, 64, 64, 3), np.uint8), jax.ShapeDtypeStruct((32, 8), np.int32)
    batch = {"image": batch[0], "tokens": batch[1]}
    model = build_model(config.model, VOCAB, PAD, contrastive="clip")
    rules = sharding.rules_from_config(config.mesh)
    temps = []
    for steps in (1, 4):
        config.accumulate.steps = steps
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, _ = train.abstract_state(model, optax.sgd(1.0), config, mesh, rules)
            step = train_step.make_train_step(model, optax.sgd(1.0), lambda s: 1.0, config, mesh, PAD)
            compiled = jax.jit(step).lower(state, batch).compile()
        temps.append(throughput.memory_per_device(compiled)["temporaries"])
    assert temps[1] < temps[0], temps


def test_each_micro_batch_sees_the_same_patch_dropout_in_both_passes():
    """With FLIP patch dropout GradCache's gradient is that of the loss whose micro-batch i
    drops patches with rng_i: the cached embeddings are the ones differentiated."""
    config = tiny_config("clip", **{"objective.contrastive.options.impl": "dense"})
    config.model.patch_dropout = 0.5
    model = build_model(config.model, VOCAB, PAD, contrastive="clip")
    batch = fixed_batch(8)
    batch["targets"] = batch["tokens"][:, 1:]
    params = model.init(jax.random.key(0), batch["image"], batch["tokens"][:, :-1])["params"]
    terms = objective.build(config.objective, mesh=None, pad_id=PAD)
    forward = lambda p, b, rng: model.apply({"params": p}, b["image"], b["tokens"][:, :-1], train=True,
                                            rngs={"dropout": rng})
    rng, steps = jax.random.key(3), 2

    def in_one_piece(p):
        micro = jax.tree.map(lambda x: accumulate.split(x, steps, 1), batch)
        rngs = jax.random.split(rng, steps)
        outputs = [forward(p, jax.tree.map(lambda x: x[i], micro), rngs[i]) for i in range(steps)]
        merged = {k: jnp.concatenate([o[k] for o in outputs]) if jnp.ndim(outputs[0][k]) else outputs[0][k]
                  for k in outputs[0]}
        return objective.total_loss(terms, merged, batch)[0]

    accumulated = lambda p: accumulate.gradients(forward, p, batch, rng, terms, steps, None)
    both = lambda p: (accumulated(p), jax.value_and_grad(in_one_piece)(p))
    (loss, _, grads), (ref_loss, ref_grads) = jax.jit(both)(params)  # one compile
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
