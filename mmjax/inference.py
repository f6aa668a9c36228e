"""A trained model rebuilt from its workdir alone: config.json, the tokenizer's file and a checkpoint.

    run = inference.load("runs/coca")            # latest step; params only, no optimizer state
    run.model.apply({"params": run.params}, ...)

The evaluators, `python -m mmjax.evaluate` and `python -m mmjax.predict` all start here.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax import checkpoint, epath_io, run_record
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.errors import UserError
from mmjax.models import build_model
from mmjax.objectives import objective
from mmjax.parallel import sharding


@dataclasses.dataclass
class Run:
    workdir: str
    step: int
    config: ml_collections.ConfigDict
    tokenizer: tokenizer_lib.Tokenizer
    model: nn.Module
    params: dict
    mesh: jax.sharding.Mesh
    rules: tuple


def model_for(config, tokenizer) -> nn.Module:
    """The module a config trains (the trainer builds its model with this too)."""
    return build_model(config.model, tokenizer.vocab_size, tokenizer.pad_id,
                       contrastive=objective.contrastive_type(config.objective))


def abstract_params(model, config, mesh, rules):
    """The parameters' ShapeDtypeStructs with their shardings on `mesh`; nothing allocated."""
    d = config.data
    images = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.uint8)
    tokens = jnp.zeros((1, d.text_len - 1), jnp.int32)
    init = lambda rng: model.init(rng, images, tokens)["params"]
    shardings = sharding.logical_to_sharding(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
    shapes = jax.eval_shape(lambda rng: nn.unbox(init(rng)), jax.random.key(0))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def checkpoint_step(ckpt: checkpoint.Checkpointer, step: int | None, workdir: str) -> int:
    steps = ckpt.all_steps()
    if not steps:
        raise UserError(f"{workdir} has no checkpoint yet (checkpoints/ is empty); train first, or wait for the run's "
                        "first save (every config.checkpoint_every steps)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"{workdir} has no checkpoint at step {step}; saved steps: {', '.join(map(str, steps))}")
    return step


def load(workdir: str, step: int | None = None, config=None, devices=None) -> Run:
    """The run in `workdir` at `step` (default: its latest checkpoint). `config` replaces the
    recorded one (e.g. with other evals); its model section must be the recorded one's."""
    workdir = epath_io.absolute(workdir)
    epath_io.check_filesystem(workdir)
    recorded, tokenizer = run_record.load(workdir)
    config = recorded if config is None else config
    devices = jax.devices() if devices is None else devices
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError:  # the recorded mesh needs other devices than these: data parallelism over all
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
    rules = sharding.rules_from_config(config.mesh)
    model = model_for(config, tokenizer)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False, read_only=True)
    try:
        step = checkpoint_step(ckpt, step, workdir)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            params = ckpt.restore_params(step, abstract_params(model, config, mesh, rules))
    finally:
        ckpt.close()
    return Run(workdir, step, config, tokenizer, model, params, mesh, rules)
