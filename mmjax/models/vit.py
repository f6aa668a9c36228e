"""Vision Transformer image encoder (Dosovitskiy et al. 2021).

One module serves the three families; they differ only in options:
  CoCa:    no class token, patch bias, LN at the end; pooled by attentional poolers.
  CLIP:    class token, no patch bias, LN before (ln_pre) and after the encoder (open_clip).
  SigLIP:  like CoCa; pooled by a MAP head (big_vision).
FLIP patch dropout (Li et al. 2023) drops a random share of the patch tokens in training.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers


def patchify(images, patch_size: int):
    """[B, H, W, C] -> [B, (H/p)·(W/p), p·p·C]: a stride-p conv is a Dense on these rows."""
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {patch_size}")
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def kept_patches(num_patches: int, rate: float) -> int:
    """How many patch tokens FLIP keeps: the same count for every image (static shapes)."""
    return max(1, int(num_patches * (1.0 - rate)))


def patch_dropout(tokens, rate: float, rng, num_prefix: int = 0):
    """Keep a random subset of each image's patch tokens; the first `num_prefix` (a class
    token) always stay. Positions are already embedded, so the kept order does not matter."""
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    batch, n, _ = patches.shape
    order = jnp.argsort(jax.random.uniform(rng, (batch, n)), axis=1)[:, : kept_patches(n, rate)]
    kept = jnp.take_along_axis(patches, order[:, :, None], axis=1)
    return jnp.concatenate([prefix, kept], axis=1)


class ViT(nn.Module):
    """Images uint8 [B, H, W, 3] (or float, already normalised) -> image tokens [B, N(+1), width].

    uint8 pixels are normalised here, on the accelerator, as (x/255 - mean) / std per channel:
    the host ships 4× fewer bytes than float32.
    """

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    class_token: bool = False  # prepend a learned [CLS] token (CLIP pools it)
    patch_bias: bool = True
    pre_norm: bool = False  # CLIP's ln_pre on the embedded tokens
    patch_dropout: float = 0.0  # FLIP: share of patch tokens dropped in training
    remat: str = "none"
    scan: bool = False
    image_mean: tuple = (0.5, 0.5, 0.5)  # in [0, 1] units; (0.5, 0.5) maps pixels to [-1, 1]
    image_std: tuple = (0.5, 0.5, 0.5)
    numerics: layers.Numerics = layers.Numerics()  # LayerNorm ε, MLP activation

    @nn.compact
    def __call__(self, images, train: bool = False, cls_only: bool = False):
        """cls_only: only the [CLS] token's output, [B, 1, width], the last block computing
        that position alone (layers.Block's query_index)."""
        if cls_only and not self.class_token:
            raise ValueError("cls_only needs a class token (class_token=True)")
        if images.dtype == jnp.uint8:
            mean, std = jnp.asarray(self.image_mean, jnp.float32), jnp.asarray(self.image_std, jnp.float32)
            images = (images.astype(jnp.float32) / 255.0 - mean) / std
        patches = patchify(images.astype(self.dtype), self.patch_size)
        x = layers.dense(self.width, ("patch", "embed"), self.dtype, "patch_embed", self.patch_bias)(patches)
        if self.class_token:
            cls = self.param("cls", layers.param_init(nn.initializers.normal(0.02), ("embed",)), (self.width,))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width)), x], axis=1)
        pos = self.param(
            "pos_embedding",
            layers.param_init(nn.initializers.normal(0.02), ("length", "embed")),
            x.shape[1:],
        )
        x = x + pos.astype(self.dtype)
        if train and self.patch_dropout > 0:
            x = patch_dropout(x, self.patch_dropout, self.make_rng("dropout"), num_prefix=int(self.class_token))
        if self.pre_norm:
            x = self.numerics.layer_norm(self.dtype, "ln_pre")(x)
        x = layers.Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            numerics=self.numerics,
            name="encoder",
        )(x, query_index=jnp.zeros(x.shape[0], jnp.int32) if cls_only else None)
        x = self.numerics.layer_norm(self.dtype, "ln_out")(x)
        return layers.constrain(x, ("act_batch", "act_length", "act_embed"))
