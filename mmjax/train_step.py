"""The train step: loss, gradients, the non-finite guard and the optimizer update, as one
pure function of (state, batch) for jax.jit.

The loss is config.objective's terms (mmjax.objectives.objective); with config.accumulate.steps
> 1 the gradient comes from micro-batches (mmjax.objectives.accumulate: "grads" or GradCache).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmjax import nonfinite
from mmjax.errors import ConfigError
from mmjax.models import towers
from mmjax.objectives import accumulate, objective as objective_lib
from mmjax.parallel import sharding


def locked_mask(model, model_cfg):
    """LiT: fn(params) -> True for the locked towers' parameters, or None if nothing is locked."""
    locked = towers.locked_towers(model_cfg)
    return towers.locked_mask(model, locked) if locked else None


def check_accumulation(config, mesh) -> None:
    """What validation cannot know without the mesh: each micro-batch splits over every batch shard."""
    steps, shards = config.accumulate.steps, sharding.num_batch_shards(mesh)
    if config.batch_size % (steps * shards):
        raise ConfigError(
            f"accumulate.steps={steps} cuts batch_size {config.batch_size} into micro-batches of "
            f"{config.batch_size / steps:g}, which must be a multiple of the {shards} batch shards of the mesh "
            f"{dict(mesh.shape)}; set --config.accumulate.steps so that batch_size / steps is a multiple of {shards}"
        )


def make_train_step(model, tx, schedule, config, mesh, pad_id):
    locked = locked_mask(model, config.model)
    objective = objective_lib.build(config.objective, mesh=mesh, pad_id=pad_id)
    steps = config.accumulate.steps

    def forward(params, batch, rng):
        if locked is not None:
            params = towers.stop_locked_gradients(params, locked(params))
        return model.apply({"params": params}, batch["image"], batch["tokens"][:, :-1], train=True,
                           rngs={"dropout": rng})

    def gradients(params, batch, rng):
        """-> (loss, logs, grads) on the global batch, at once or in micro-batches."""
        if steps > 1:
            return accumulate.gradients(forward, params, batch, rng, objective, steps, mesh)

        def loss_fn(params):
            outputs = forward(params, batch, rng)
            loss, logs = objective_lib.total_loss(objective, outputs, batch)
            return loss, {**logs, **objective_lib.scalar_outputs(outputs)}

        (loss, logs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logs, grads

    def train_step(state, batch):
        batch = {**batch, "targets": batch["tokens"][:, 1:]}  # next-token targets of the inputs tokens[:, :-1]
        # Training-only randomness (FLIP patch dropout) from (seed, step): a resumed run
        # draws exactly what the uninterrupted one did.
        dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        loss, aux, grads = gradients(state["params"], batch, dropout_rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        # The non-finite guard: a NaN/inf loss or gradient leaves parameters and optimizer
        # state as they were (the step counter and the data still move on).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = nonfinite.select_finite(
            finite,
            (optax.apply_updates(state["params"], updates), opt_state),
            (state["params"], state["opt_state"]),
        )
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        logs = {"loss": loss, **aux, "lr": schedule(state["step"]), "grad_norm": grad_norm, "nonfinite": ~finite}
        return new_state, logs

    return train_step
