"""The built-in objective terms: functions `(outputs, batch, context) -> (loss, metrics)`.

`outputs` is the model's dict, `batch` {"image", "tokens", "targets"} (targets: the tokens
shifted left by one), `context` a registry.Context (mesh, pad_id, the term's options).
mmjax.objectives.registry names them; a new term is a function like these, registered there.
"""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.objectives import captioning, contrastive
from mmjax.parallel import sharding


def contrastive_term(kind: str):
    """CLIP's softmax ("clip") or SigLIP's sigmoid ("siglip") loss over the global batch."""

    def term(outputs, batch, context):
        impl, tiles = context.options["impl"], "blockwise"
        if impl in ("blockwise", "pallas") and context.mesh is not None and sharding.num_batch_shards(context.mesh) > 1:
            # A sharded batch: the same tiles, but text blocks travel a ring instead of every
            # device gathering the global batch (memory O(B_local·d), not O(B·d)).
            impl, tiles = "ring", impl
        loss = contrastive.contrastive_loss(
            kind,
            outputs["image_embedding"],
            outputs["text_embedding"],
            outputs["logit_scale"],
            outputs.get("logit_bias"),
            impl=impl,
            block_size=context.options["block_size"],
            mesh=context.mesh,
            axis_names=sharding.BATCH_AXES,
            ring_tiles=tiles,
        )
        return loss, {}

    return term


def captioning_term(outputs, batch, context):
    """CoCa's L_Cap: next-token cross-entropy, a mean over the non-pad target tokens."""
    return captioning.captioning_loss(outputs["caption_logits"], batch["targets"], context.pad_id), {}


def caption_tokens(batch, context):
    """What captioning_term's mean runs over: the batch's non-pad target tokens (at least 1, as its mean's)."""
    return jnp.maximum(jnp.sum(batch["targets"] != context.pad_id), 1).astype(jnp.float32)
