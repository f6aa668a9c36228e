"""AdamW with linear warmup and cosine decay; no weight decay on norms, biases, the temperature.
Locked (LiT) parameters get no update at all."""
from __future__ import annotations

import jax
import optax

from mmjax.models.layers import SCANNED_BLOCKS

OPTIMIZERS = ("adamw",)  # optimizer.name


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt_cfg.learning_rate,
        warmup_steps=opt_cfg.warmup_steps,
        decay_steps=max(total_steps, opt_cfg.warmup_steps + 1),
        end_value=opt_cfg.learning_rate * opt_cfg.final_lr_fraction,
    )


def decay_mask(params):
    """Decay matrices only: norms' scales, biases and the (scalar) logit scale have ndim < 2
    (counted per layer: scanned blocks carry an extra leading `layers` axis)."""

    def is_matrix(path, p):
        scanned = any(getattr(k, "key", None) == SCANNED_BLOCKS for k in path)
        return p.ndim - scanned >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(opt_cfg, total_steps: int, locked_mask=None) -> optax.GradientTransformation:
    """`locked_mask(params)` -> bools, True for frozen parameters (mmjax.models.towers)."""
    if opt_cfg.name != "adamw":
        raise ValueError(f"unknown optimizer.name {opt_cfg.name!r}; valid: ['adamw']")
    chain = []
    if opt_cfg.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(opt_cfg, total_steps),
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*chain)
    if locked_mask is None:
        return tx
    labels = lambda params: jax.tree.map(lambda frozen: "locked" if frozen else "trained", locked_mask(params))
    return optax.multi_transform({"trained": tx, "locked": optax.set_to_zero()}, labels)
