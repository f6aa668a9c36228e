"""Vision Transformer image encoder (Dosovitskiy et al. 2021), without a class token:
CoCa pools its output with attentional poolers instead."""
from __future__ import annotations

import flax.linen as nn
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


class ViT(nn.Module):
    """Images uint8 [B, H, W, 3] (or float in [-1, 1]) -> image tokens [B, N, width]."""

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 127.5 - 1.0
        patches = patchify(images.astype(self.dtype), self.patch_size)
        x = layers.dense(self.width, ("patch", "embed"), self.dtype, "patch_embed")(patches)
        pos = self.param(
            "pos_embedding",
            layers.param_init(nn.initializers.normal(0.02), ("length", "embed")),
            x.shape[1:],
        )
        x = x + pos.astype(self.dtype)
        x = layers.Transformer(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, name="encoder")(x)
        return layers.LayerNorm(self.dtype, name="ln_out")(x)
