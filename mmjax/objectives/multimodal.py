"""The training objective as configured: λ_con · L_con + λ_cap · L_cap (CoCa eq. 4).

CoCa: λ_con = 1, λ_cap = 2. CLIP/SigLIP: λ_cap = 0 (and a model without a decoder).
"""
from __future__ import annotations

from mmjax.objectives import captioning, contrastive
from mmjax.parallel import sharding


def total_loss(outputs: dict, targets, obj_cfg, pad_id: int, mesh):
    """-> (weighted total, {component name: unweighted value})."""
    components = {}
    total = 0.0
    if obj_cfg.contrastive_weight:
        impl, tiles = obj_cfg.impl, "blockwise"
        if impl in ("blockwise", "pallas") and sharding.num_batch_shards(mesh) > 1:
            # A sharded batch: the same tiles, but text blocks travel a ring instead of every
            # device gathering the global batch (memory O(B_local·d), not O(B·d)).
            impl, tiles = "ring", impl
        loss = contrastive.contrastive_loss(
            obj_cfg.contrastive,
            outputs["image_embedding"],
            outputs["text_embedding"],
            outputs["logit_scale"],
            outputs.get("logit_bias"),
            impl=impl,
            block_size=obj_cfg.block_size,
            mesh=mesh,
            axis_names=sharding.BATCH_AXES,
            ring_tiles=tiles,
        )
        components["contrastive_loss"] = loss
        total = total + obj_cfg.contrastive_weight * loss
    if obj_cfg.caption_weight:
        loss = captioning.captioning_loss(outputs["caption_logits"], targets, pad_id)
        components["caption_loss"] = loss
        total = total + obj_cfg.caption_weight * loss
    return total, components
