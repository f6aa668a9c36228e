"""Two-tower contrastive models: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

    image ──ViT──► tokens ──pool──► W_img ──► x_img / ‖x_img‖ ┐
    text ──TextEncoder──► pooled ──► W_txt ──► x_txt / ‖x_txt‖ ┘ logits = exp(t)·x_img·x_txtᵀ (+ b)

CLIP, as open_clip's ViT-B/32, B/16, L/14 (image_pool="cls", text_pool="eot"): the image is
pooled at a [CLS] token (ViT with ln_pre and a bias-free patch embedding), the text is
causal and pooled at its end-of-text token; projections have no bias; t = log(1/0.07) is
learned and clamped at log 100; softmax loss.
SigLIP, as big_vision's two_towers B/16 (image_pool="map", text_pool="last"): the image is
pooled by a MAP head, the text is bidirectional and pooled at the last position;
projections ("heads") have a bias; t′ = log 10 and b = −10 are learned, t is not clamped;
sigmoid loss (config.objective.contrastive.type = "siglip").

Training and the embedding evaluations need only the pooled position of each tower, so
`__call__` and `embed_image`/`embed_text` (the evaluators' predictors) compute the last block
of a [CLS]-pooled ViT and of the text tower at that one position (keys and values still from
every position; layers.Block's query_index): the same embeddings, a block's queries, output
projection and MLP of every other position skipped. encode_image/encode_text return the
token features too unless told not to.

The learned scalars t′ and b are set up by `logit_params`, which CoCa shares; which ones a
model gets, and their inits, follow the objective (mmjax.models.build_model).
"""
from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers, poolers, text, vit

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # clamp: τ ≥ 0.01
IMAGE_POOLING = ("cls", "map")


def logit_params(module):
    """In `setup`: (t′, b) as scalar parameters "logit_scale" and "logit_bias" from the
    module's `logit_scale_init` and `logit_bias_init`; b is None when that init is None."""

    def scalar(name, value):
        return module.param(name, layers.param_init(nn.initializers.constant(value), ()), ())

    scale = scalar("logit_scale", module.logit_scale_init)
    bias = None if module.logit_bias_init is None else scalar("logit_bias", module.logit_bias_init)
    return scale, bias


def logit_outputs(module) -> dict:
    """The loss's scalars: t′ clamped at `logit_scale_max`, and b if the module has one."""
    outputs = {"logit_scale": module.clamped_logit_scale()}
    if module.logit_bias is not None:
        outputs["logit_bias"] = module.logit_bias
    return outputs


class CLIP(nn.Module):
    towers: ClassVar[dict[str, tuple[str, ...]]] = {
        "image": ("image_encoder", "image_pooler", "image_proj"),
        "text": ("text_encoder", "text_proj"),
        "shared": ("logit_scale", "logit_bias"),
    }
    has_decoder: ClassVar[bool] = False

    vocab_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_mlp_dim: int
    vision_heads: int
    text_width: int
    text_depth: int
    text_mlp_dim: int
    text_heads: int
    embed_dim: int
    image_pool: str = "cls"
    text_pool: str = "eot"
    projection_bias: bool = False
    logit_scale_init: float = LOGIT_SCALE_INIT
    logit_scale_max: float = LOGIT_SCALE_MAX  # math.inf: not clamped
    logit_bias_init: float | None = None  # SigLIP's b; None: no bias (CLIP)
    pad_id: int = 0
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    patch_dropout: float = 0.0
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    numerics: layers.Numerics = layers.Numerics()  # every LayerNorm's ε and MLP's activation, both towers

    def setup(self):
        if self.image_pool not in IMAGE_POOLING:
            raise ValueError(f"unknown image pooling {self.image_pool!r}; valid: {list(IMAGE_POOLING)}")
        cls = self.image_pool == "cls"
        self.image_encoder = vit.ViT(
            self.patch_size,
            self.vision_width,
            self.vision_depth,
            self.vision_mlp_dim,
            self.vision_heads,
            self.dtype,
            class_token=cls,
            patch_bias=not cls,
            pre_norm=cls,
            patch_dropout=self.patch_dropout,
            image_mean=self.image_mean,
            image_std=self.image_std,
            remat=self.remat,
            scan=self.scan_layers,
            numerics=self.numerics,
        )
        if not cls:
            self.image_pooler = poolers.MAPHead(self.vision_heads, self.vision_mlp_dim, self.dtype, self.numerics)
        self.image_projection = layers.dense(
            self.embed_dim, ("embed", "proj"), self.dtype, "image_proj", self.projection_bias
        )
        self.text_encoder = text.TextEncoder(
            self.vocab_size,
            self.text_width,
            self.text_depth,
            self.text_mlp_dim,
            self.text_heads,
            self.text_pool,
            self.pad_id,
            self.dtype,
            self.remat,
            self.scan_layers,
            self.numerics,
        )
        self.text_projection = layers.dense(
            self.embed_dim, ("embed", "proj"), self.dtype, "text_proj", self.projection_bias
        )
        self.logit_scale, self.logit_bias = logit_params(self)

    def encode_image(self, images, train: bool = False, tokens: bool = True):
        """-> (L2-normalised image embedding [B, embed_dim] f32, image tokens [B, N(+1), width]).

        tokens=False: (embedding, None); pooled at [CLS], the encoder's last block then
        computes the [CLS] position alone: the same embedding for most of a block's work
        less (a fifth of the tiny CLIP's 4-block ViT)."""
        if self.image_pool == "cls":
            out = self.image_encoder(images, train, cls_only=not tokens)
            pooled = out[:, 0]
        else:
            out = self.image_encoder(images, train)
            pooled = self.image_pooler(out)
        return layers.l2_normalize(self.image_projection(pooled)), out if tokens else None

    def encode_text(self, tokens, features: bool = True):
        """-> (L2-normalised text embedding [B, embed_dim] f32, token features [B, L, width]).

        features=False: (embedding, None), the encoder's last block computing the pooled
        position alone."""
        pooled, token_features = self.text_encoder(tokens, features)
        return layers.l2_normalize(self.text_projection(pooled)), token_features

    def embed_image(self, images):
        """The L2-normalised embedding alone (what zero-shot and retrieval read), by the pooled path."""
        return self.encode_image(images, tokens=False)[0]

    def embed_text(self, tokens):
        """The L2-normalised text embedding alone, by the pooled path."""
        return self.encode_text(tokens, features=False)[0]

    def clamped_logit_scale(self):
        return jnp.minimum(self.logit_scale, self.logit_scale_max)

    def __call__(self, images, tokens, train: bool = False):
        image_embedding, _ = self.encode_image(images, train, tokens=False)
        text_embedding, _ = self.encode_text(tokens, features=False)
        return {"image_embedding": image_embedding, "text_embedding": text_embedding, **logit_outputs(self)}
