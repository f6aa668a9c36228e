"""Model registry: config.model.name -> a Flax module built from the config.

    coca   CoCa (mmjax.models.coca)
    clip   two towers (mmjax.models.clip): CLIP, or SigLIP with image_pool="map",
           text_pool="last" and a logit bias
"""
from __future__ import annotations

import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.clip import CLIP
from mmjax.models.coca import CoCa

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODELS = ("coca", "clip")
MODEL_CLASSES = {"coca": CoCa, "clip": CLIP}  # their ClassVars (towers, has_decoder) describe a config


def model_vocab_size(model_cfg, tokenizer_vocab_size: int) -> int:
    """The embedding table's size: model.vocab_size when the config pins one (a paper's
    vocabulary; the tokenizer then uses its first ids), else the tokenizer's."""
    pinned = model_cfg.get("vocab_size")
    if pinned and pinned < tokenizer_vocab_size:
        raise ValueError(
            f"model.vocab_size {pinned} is smaller than the tokenizer's {tokenizer_vocab_size} pieces; "
            "raise --config.model.vocab_size or lower --config.data.vocab_size"
        )
    return pinned or tokenizer_vocab_size


def _training_options(model_cfg) -> dict:
    if model_cfg.remat not in layers.REMAT_CHOICES:
        raise ValueError(f"unknown model.remat {model_cfg.remat!r}; valid: {list(layers.REMAT_CHOICES)}")
    if not 0.0 <= model_cfg.patch_dropout < 1.0:
        raise ValueError(f"model.patch_dropout must be in [0, 1), got {model_cfg.patch_dropout}")
    return dict(
        dtype=DTYPES[model_cfg.dtype],
        remat=model_cfg.remat,
        scan_layers=model_cfg.scan_layers,
        patch_dropout=model_cfg.patch_dropout,
        image_mean=tuple(model_cfg.image_mean),
        image_std=tuple(model_cfg.image_std),
    )


def build_model(model_cfg, vocab_size: int, pad_id: int = 0):
    """Build the module named by `model_cfg.name`; `vocab_size` is the tokenizer's."""
    if model_cfg.name not in MODELS:
        raise ValueError(f"unknown model.name {model_cfg.name!r}; valid: {list(MODELS)}")
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model_cfg.dtype!r}; valid: {sorted(DTYPES)}")
    v, t = model_cfg.vision, model_cfg.text
    common = dict(
        vocab_size=model_vocab_size(model_cfg, vocab_size),
        patch_size=v.patch_size,
        vision_width=v.width,
        vision_depth=v.depth,
        vision_mlp_dim=v.mlp_dim,
        vision_heads=v.heads,
        text_width=t.width,
        text_mlp_dim=t.mlp_dim,
        text_heads=t.heads,
        embed_dim=model_cfg.embed_dim,
        pad_id=pad_id,
        **_training_options(model_cfg),
    )
    if model_cfg.name == "coca":
        return CoCa(
            unimodal_depth=t.unimodal_depth,
            multimodal_depth=t.multimodal_depth,
            caption_queries=model_cfg.caption_queries,
            **common,
        )
    return CLIP(
        text_depth=t.depth,
        image_pool=model_cfg.image_pool,
        text_pool=model_cfg.text_pool,
        projection_bias=model_cfg.projection_bias,
        logit_scale_init=model_cfg.logit_scale_init,
        logit_scale_max=model_cfg.logit_scale_max,
        logit_bias_init=model_cfg.logit_bias_init,
        **common,
    )
