"""Text towers.

CoCa (Yu et al. 2022, §3.2): the decoder's bottom half is a *unimodal* causal text decoder:
it sees no image and a learned [CLS] token appended after the text yields the text
embedding. The top half is a *multimodal* decoder: causal self-attention plus
cross-attention to the image tokens, then an (untied) projection to the vocabulary.

CLIP / SigLIP: a `TextEncoder` pooled at one position (see its docstring).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers


def causal_mask(length: int):
    """[1, 1, L, L] boolean: query i may attend to keys j ≤ i."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def token_embedding(vocab_size: int, width: int) -> nn.Embed:
    """The [vocab, width] token table every text tower starts with."""
    return nn.Embed(
        vocab_size,
        width,
        embedding_init=layers.param_init(nn.initializers.normal(0.02), ("vocab", "embed")),
        name="token_embedding",
    )


class UnimodalTextDecoder(nn.Module):
    """tokens [B, L] -> (token features [B, L, width], [CLS] feature [B, width]).

    The [CLS] token sits at position L: causally it sees every text token; padding keys are
    masked so the embedding does not depend on how much padding follows the text.
    """

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    pad_id: int = 0
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        batch, length = tokens.shape
        embed = token_embedding(self.vocab_size, self.width)
        x = embed(tokens).astype(self.dtype)
        cls = self.param("cls", layers.param_init(nn.initializers.normal(0.02), ("embed",)), (self.width,))
        x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width))], axis=1)
        pos = self.param(
            "pos_embedding",
            layers.param_init(nn.initializers.normal(0.01), ("length", "embed")),
            (length + 1, self.width),
        )
        x = x + pos.astype(self.dtype)
        key_is_text = jnp.concatenate([tokens != self.pad_id, jnp.ones((batch, 1), bool)], axis=1)
        mask = causal_mask(length + 1) & key_is_text[:, None, None, :]
        x = layers.Transformer(
            self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, remat=self.remat, scan=self.scan, name="decoder"
        )(x, mask)
        cls_feature = layers.LayerNorm(self.dtype, name="ln_cls")(x[:, -1])
        return x[:, :-1], cls_feature


class MultimodalTextDecoder(nn.Module):
    """(unimodal features [B, L, w], image tokens [B, N, w']) -> vocabulary logits [B, L, V]."""

    vocab_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, text_features, image_tokens):
        length = text_features.shape[1]
        x = layers.Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            cross_attention=True,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            name="decoder",
        )(text_features, causal_mask(length), image_tokens)
        x = layers.LayerNorm(self.dtype, name="ln_out")(x)
        logits = layers.dense(self.vocab_size, ("embed", "vocab"), self.dtype, "to_vocab")(x)
        return layers.constrain(logits, ("act_batch", "act_length", "act_vocab"))


TEXT_POOLING = ("eot", "last")


class TextEncoder(nn.Module):
    """tokens [B, L] -> (pooled feature [B, width], token features [B, L, width]).

    pool="eot" (CLIP, open_clip): causal attention, pooled at the end-of-text token. open_clip
      finds it as the argmax token id; our rows are BOS, pieces, EOS, PAD…, so it is the last
      non-pad position (the last piece if truncation cut the EOS). Causality makes pads
      after it invisible, so no padding mask is needed.
    pool="last" (SigLIP, big_vision's text_transformer): bidirectional, no padding mask,
      pooled at the final position whatever it holds.
    """

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    pool: str = "eot"
    pad_id: int = 0
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        if self.pool not in TEXT_POOLING:
            raise ValueError(f"unknown text pooling {self.pool!r}; valid: {list(TEXT_POOLING)}")
        length = tokens.shape[1]
        embed = token_embedding(self.vocab_size, self.width)
        pos = self.param(
            "pos_embedding", layers.param_init(nn.initializers.normal(0.01), ("length", "embed")), (length, self.width)
        )
        x = embed(tokens).astype(self.dtype) + pos.astype(self.dtype)
        causal = self.pool == "eot"
        x = layers.Transformer(
            self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, remat=self.remat, scan=self.scan, name="encoder"
        )(x, causal_mask(length) if causal else None)
        x = layers.LayerNorm(self.dtype, name="ln_out")(x)
        if causal:
            positions = jnp.arange(length)[None, :]
            eot = jnp.max(jnp.where(tokens != self.pad_id, positions, 0), axis=1)
            pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        else:
            pooled = x[:, -1]
        return pooled, x
