"""The train step: loss, gradients, the non-finite guard and the optimizer update, as one
pure function of (state, batch) for jax.jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmjax import nonfinite
from mmjax.models import towers
from mmjax.objectives import multimodal


def locked_mask(model, model_cfg):
    """LiT: fn(params) -> True for the locked towers' parameters, or None if nothing is locked."""
    locked = towers.locked_towers(model_cfg)
    return towers.locked_mask(model, locked) if locked else None


def make_train_step(model, tx, schedule, config, mesh, pad_id):
    locked = locked_mask(model, config.model)

    def train_step(state, batch):
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        # Training-only randomness (FLIP patch dropout) from (seed, step): a resumed run
        # draws exactly what the uninterrupted one did.
        dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])

        def loss_fn(params):
            if locked is not None:
                params = towers.stop_locked_gradients(params, locked(params))
            outputs = model.apply(
                {"params": params}, batch["image"], inputs, train=True, rngs={"dropout": dropout_rng}
            )
            loss, components = multimodal.total_loss(outputs, targets, config.objective, pad_id, mesh)
            scalars = {k: outputs[k] for k in ("logit_scale", "logit_bias") if k in outputs}
            return loss, {**components, **scalars}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
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
