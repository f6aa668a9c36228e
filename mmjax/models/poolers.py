"""Attentional pooler (CoCa §3.2): n learned queries cross-attend to the encoder's tokens.

CoCa uses two: n=1 gives the image embedding for the contrastive loss, n=256 gives the
tokens the multimodal decoder cross-attends to ("task-specific attentional pooling").
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers


class AttentionalPooler(nn.Module):
    num_queries: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        width = tokens.shape[-1]
        queries = self.param(
            "queries",
            layers.param_init(nn.initializers.normal(0.02), ("length", "embed")),
            (self.num_queries, width),
        )
        queries = jnp.broadcast_to(queries.astype(self.dtype), (tokens.shape[0], self.num_queries, width))
        pooled = layers.Attention(self.num_heads, self.dtype, name="attn")(queries, tokens)
        return layers.LayerNorm(self.dtype, name="ln_out")(pooled)
