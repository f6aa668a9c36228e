"""Poolers: learned queries cross-attend to the image encoder's tokens.

AttentionalPooler (CoCa §3.2): CoCa uses two: n=1 gives the image embedding for the
contrastive loss, n=256 gives the tokens the multimodal decoder cross-attends to
("task-specific attentional pooling").
open_clip's CoCa uses one AttentionalPooler of 256 queries, `width` = the embedding
dimension and `query_norm` (its ln_q); its first query's output is the contrastive one.
MAPHead (SigLIP, big_vision): one probe, then a residual MLP.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers


class AttentionalPooler(nn.Module):
    """tokens [B, N, w] -> LN(Attn(queries, tokens)) [B, num_queries, width or w]."""

    num_queries: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    numerics: layers.Numerics = layers.Numerics()
    width: int = 0  # the queries' (and output's) width; 0: the tokens'
    query_norm: bool = False  # LayerNorm on the learned queries (open_clip's ln_q)

    @nn.compact
    def __call__(self, tokens):
        width = self.width or tokens.shape[-1]
        queries = self.param(
            "queries",
            layers.param_init(nn.initializers.normal(0.02), ("length", "embed")),
            (self.num_queries, width),
        )
        if self.query_norm:
            queries = self.numerics.layer_norm(self.dtype, "ln_queries")(queries)
        queries = jnp.broadcast_to(queries.astype(self.dtype), (tokens.shape[0], self.num_queries, width))
        pooled = layers.Attention(self.num_heads, self.dtype, impl=self.numerics.attention, name="attn")(queries, tokens)
        return self.numerics.layer_norm(self.dtype, "ln_out")(pooled)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's MAPHead, SigLIP's image pooling):
    y = Attn(probe, tokens);  z = y + MLP(LN y);  -> z [B, width]."""

    num_heads: int
    mlp_dim: int
    dtype: layers.Dtype = jnp.float32
    numerics: layers.Numerics = layers.Numerics()

    @nn.compact
    def __call__(self, tokens):
        width = tokens.shape[-1]
        probe_init = layers.param_init(nn.initializers.xavier_uniform(), ("length", "embed"))
        probe = self.param("probe", probe_init, (1, width))
        probe = jnp.broadcast_to(probe.astype(self.dtype), (tokens.shape[0], 1, width))
        y = layers.Attention(self.num_heads, self.dtype, impl=self.numerics.attention, name="attn")(probe, tokens)
        z = y + self.numerics.mlp(self.mlp_dim, self.dtype, "mlp")(self.numerics.layer_norm(self.dtype, "ln")(y))
        return z[:, 0]
