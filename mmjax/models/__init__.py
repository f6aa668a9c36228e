"""Model registry: config.model.name -> a Flax module built from the config."""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.models.coca import CoCa

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg, vocab_size: int, pad_id: int = 0):
    """Build the module named by `model_cfg.name` (only "coca" for now)."""
    if model_cfg.name != "coca":
        raise ValueError(f"unknown model.name {model_cfg.name!r}; valid: ['coca']")
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model_cfg.dtype!r}; valid: {sorted(DTYPES)}")
    v, t = model_cfg.vision, model_cfg.text
    return CoCa(
        vocab_size=vocab_size,
        patch_size=v.patch_size,
        vision_width=v.width,
        vision_depth=v.depth,
        vision_mlp_dim=v.mlp_dim,
        vision_heads=v.heads,
        text_width=t.width,
        unimodal_depth=t.unimodal_depth,
        multimodal_depth=t.multimodal_depth,
        text_mlp_dim=t.mlp_dim,
        text_heads=t.heads,
        embed_dim=model_cfg.embed_dim,
        caption_queries=model_cfg.caption_queries,
        pad_id=pad_id,
        dtype=DTYPES[model_cfg.dtype],
    )
