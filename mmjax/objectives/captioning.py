"""Captioning loss (CoCa's L_Cap): next-token cross-entropy, padding ignored."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def captioning_loss(logits, targets, pad_id: int = 0):
    """Mean over non-pad targets of −log p(target_t | image, text_<t).

    logits [B, L, V] predict targets [B, L] (the input tokens shifted left by one).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}: expected [B, L, V] vs [B, L]")
    weights = (targets != pad_id).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
