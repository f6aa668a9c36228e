"""Model registry: config.model.name -> a Flax module built from the config.

    coca   CoCa (mmjax.models.coca); model.coca_layout "paper" or "open_clip" (open_clip's CoCa)
    clip   two towers (mmjax.models.clip): CLIP, or SigLIP with image_pool="map" and
           text_pool="last"

The contrastive loss's learned scalars follow the contrastive term's type
(objective.contrastive.type, read by mmjax.objectives.objective.contrastive_type), on every model: with
"siglip" the model learns SigLIP's bias b (parameter "logit_bias"), with "clip" it has
none (a softmax ignores a shared bias). Every shipped config's model section, CoCa's too,
has the same three keys: logit_scale_init (t′; logits are scaled by exp(t′)),
logit_scale_max (t′'s clamp; inf: none) and logit_bias_init (b), declared as
placeholder(float) so that a flag can pin them. None (their value in every shipped config)
means the loss's paper init (PAPER_LOGIT_INITS; under "siglip" b = −10); a number pins it.
So configs/siglip.py needs no inits of its own, and configs/coca.py or clip.py with
--config.objective.contrastive.type=siglip get SigLIP's. A pinned bias with the softmax loss is
a ConfigError, not an unused parameter.

Numerics (layers.Numerics): model.layernorm_eps (every LayerNorm's ε) and model.mlp_activation
(every MLP's: "gelu" exact, "gelu_tanh", "quick_gelu") and model.attention (every Attention's
implementation, mmjax.models.attention) reach every tower and pooler. A model section without
them (an older run's config.json) gets mmjax's defaults, ε 1e-6 and tanh-GELU, and "einsum"
attention (run_record.IMPLIED_BEFORE_THEY_EXISTED).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from mmjax.errors import ConfigError
from mmjax.models import layers
from mmjax.models.clip import CLIP, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX
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


@dataclasses.dataclass(frozen=True)
class LogitInits:
    scale_init: float  # t′
    scale_max: float  # t′'s clamp
    bias_init: float | None  # b; None: no bias


PAPER_LOGIT_INITS = {
    "clip": LogitInits(LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, None),  # Radford et al. 2021: τ = 0.07, ≥ 0.01
    "siglip": LogitInits(math.log(10.0), math.inf, -10.0),  # Zhai et al. 2023, Algorithm 1
}


def logit_inits(model_cfg, contrastive: str) -> dict:
    """The model's logit_scale_init/max and logit_bias_init: the config's where it pins
    them (a number), else the paper's for the `contrastive` loss."""
    if contrastive not in PAPER_LOGIT_INITS:
        raise ConfigError(f"unknown objective.contrastive.type {contrastive!r}; valid: {list(PAPER_LOGIT_INITS)}")
    paper = PAPER_LOGIT_INITS[contrastive]
    bias = model_cfg.get("logit_bias_init")
    if contrastive == "clip" and bias is not None:
        raise ConfigError(
            f"model.logit_bias_init={bias} needs objective.contrastive.type='siglip', but it is {contrastive!r} (a "
            "softmax loss has no bias); set --config.objective.contrastive.type=siglip or leave "
            "model.logit_bias_init unset"
        )

    def pinned_or(key, paper_value):
        value = model_cfg.get(key)
        return paper_value if value is None else value

    return dict(
        logit_scale_init=pinned_or("logit_scale_init", paper.scale_init),
        logit_scale_max=pinned_or("logit_scale_max", paper.scale_max),
        logit_bias_init=pinned_or("logit_bias_init", paper.bias_init),
    )


def _training_options(model_cfg) -> dict:
    if model_cfg.remat not in (*layers.REMAT_CHOICES, layers.REMAT_AUTO):
        raise ValueError(f"unknown model.remat {model_cfg.remat!r}; valid: {[*layers.REMAT_CHOICES, layers.REMAT_AUTO]}")
    if not 0.0 <= model_cfg.patch_dropout < 1.0:
        raise ValueError(f"model.patch_dropout must be in [0, 1), got {model_cfg.patch_dropout}")
    return dict(
        dtype=DTYPES[model_cfg.dtype],
        remat="none" if model_cfg.remat == layers.REMAT_AUTO else model_cfg.remat,  # see layers.REMAT_AUTO
        scan_layers=model_cfg.scan_layers,
        patch_dropout=model_cfg.patch_dropout,
        image_mean=tuple(model_cfg.image_mean),
        image_std=tuple(model_cfg.image_std),
    )


def model_numerics(model_cfg) -> layers.Numerics:
    """The config's LayerNorm ε, MLP activation and attention implementation; absent keys:
    layers.Numerics' defaults, but "einsum" attention (the one an older run's model had)."""
    default = layers.Numerics()
    eps = model_cfg.get("layernorm_eps", default.layernorm_eps)
    activation = model_cfg.get("mlp_activation", default.mlp_activation)
    attention = model_cfg.get("attention", "einsum")
    if activation not in layers.ACTIVATIONS:
        raise ValueError(f"unknown model.mlp_activation {activation!r}; valid: {list(layers.ACTIVATIONS)}")
    if attention not in layers.ATTENTION_IMPLS:
        raise ValueError(f"unknown model.attention {attention!r}; valid: {list(layers.ATTENTION_IMPLS)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"model.layernorm_eps must be a finite number above 0, got {eps!r}")
    return layers.Numerics(layernorm_eps=float(eps), mlp_activation=activation, attention=attention)


def build_model(model_cfg, vocab_size: int, pad_id: int = 0, *, contrastive: str):
    """Build the module named by `model_cfg.name`; `vocab_size` is the tokenizer's and
    `contrastive` the objective's loss ("clip" | "siglip"), which decides the bias."""
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
        **logit_inits(model_cfg, contrastive),
        **_training_options(model_cfg),
        numerics=model_numerics(model_cfg),
    )
    if model_cfg.name == "coca":
        return CoCa(
            unimodal_depth=t.unimodal_depth,
            multimodal_depth=t.multimodal_depth,
            caption_queries=model_cfg.caption_queries,
            layout=model_cfg.get("coca_layout", "paper"),  # absent in runs from before open_clip's layout
            **common,
        )
    return CLIP(
        text_depth=t.depth,
        image_pool=model_cfg.image_pool,
        text_pool=model_cfg.text_pool,
        projection_bias=model_cfg.projection_bias,
        **common,
    )
