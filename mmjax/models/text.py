"""Text towers.

CoCa (Yu et al. 2022, §3.2): the decoder's bottom half is a *unimodal* causal text decoder:
it sees no image and a learned [CLS] token appended after the text yields the text
embedding. The top half is a *multimodal* decoder: causal self-attention plus
cross-attention to the image tokens, then an (untied) projection to the vocabulary.

CLIP / SigLIP: a `TextEncoder` pooled at one position (see its docstring).
"""
from __future__ import annotations

import flax.linen as nn
import jax
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


# Which keys the unimodal decoder's queries may see (besides causality): "text" (the text
# tokens and the [CLS]) or "open_clip" (the row open_clip's CoCa weights learned; see below).
KEY_MASKS = ("text", "open_clip")


class UnimodalTextDecoder(nn.Module):
    """tokens [B, L] -> (token features [B, L, width], [CLS] feature [B, width]).

    The [CLS] token sits at position L: causally it sees every text token; padding keys are
    masked so the embedding does not depend on how much padding follows the text.
    key_mask="open_clip" is the mask open_clip's released CoCa weights were trained with (its
    `correct_cls_mask=False`): the validity row is shifted one position right, so the [CLS]
    sees the text and the first PAD position but not itself (and a PAD query one more PAD).

    Decoding cache (see mmjax.models.layers): a prefill (mutable "cache") also stores the
    key-validity row "cache"/"key_valid" [B, L + 1] (tokens != pad, then the [CLS] slot).
    A step, `cache_index` given, takes tokens [B, 1] at that position and returns
    (features [B, 1, width], None): the same features as the full pass at that position,
    with the same masks (causal, and no attention to PAD keys); no [CLS] output.
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
    numerics: layers.Numerics = layers.Numerics()
    key_mask: str = "text"  # one of KEY_MASKS

    def _pos_embedding(self, positions: int):
        init = layers.param_init(nn.initializers.normal(0.01), ("length", "embed"))
        return self.param("pos_embedding", init, (positions, self.width))

    @nn.compact
    def __call__(self, tokens, cache_index=None):
        batch, length = tokens.shape
        embed = token_embedding(self.vocab_size, self.width)
        x = embed(tokens).astype(self.dtype)
        cls = self.param("cls", layers.param_init(nn.initializers.normal(0.02), ("embed",)), (self.width,))
        decoder = layers.Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            kv_cache=True,
            numerics=self.numerics,
            name="decoder",
        )
        if cache_index is not None:
            key_valid = self.get_variable("cache", "key_valid")
            if key_valid is None:
                raise ValueError("no decoding cache: prefill it first (apply with mutable=['cache'])")
            # open_clip's mask: position i's validity is token i-1's, and a decoded token is never PAD.
            valid = tokens != self.pad_id if self.key_mask == "text" else jnp.ones_like(tokens, bool)
            key_valid = jax.lax.dynamic_update_slice(key_valid, valid, (0, cache_index))
            self.put_variable("cache", "key_valid", key_valid)
            # The table's full shape (L + 1 rows) comes from the cache: flax checks it.
            pos = jax.lax.dynamic_slice_in_dim(self._pos_embedding(key_valid.shape[1]), cache_index, length)
            x = decoder(x + pos.astype(self.dtype), key_valid[:, None, None, :], cache_index=cache_index)
            return x, None
        x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width))], axis=1)
        x = x + self._pos_embedding(length + 1).astype(self.dtype)
        if self.key_mask not in KEY_MASKS:
            raise ValueError(f"unknown key_mask {self.key_mask!r}; valid: {list(KEY_MASKS)}")
        is_text, cls_slot = tokens != self.pad_id, jnp.ones((batch, 1), bool)
        key_valid = jnp.concatenate([is_text, cls_slot] if self.key_mask == "text" else [cls_slot, is_text], axis=1)
        if layers.caching(self):
            self.put_variable("cache", "key_valid", key_valid)
        mask = causal_mask(length + 1) & key_valid[:, None, None, :]
        x = decoder(x, mask)
        cls_feature = self.numerics.layer_norm(self.dtype, "ln_cls")(x[:, -1])
        return x[:, :-1], cls_feature


class MultimodalTextDecoder(nn.Module):
    """(unimodal features [B, L, w], image tokens [B, N, w']) -> vocabulary logits [B, L, V].

    Decoding: a prefill (mutable "cache") stores every layer's self-attention keys/values and
    the image tokens' cross-attention keys/values. A step passes `cache_index` and features
    [B, 1, w]; image_tokens=None reuses the cached cross-attention keys/values, image tokens
    given are projected (and, the cache being mutable, stored) again.

    layout="open_clip": open_clip's CoCa decoder layers (layers.Block, cross_layout) and a
    vocabulary projection without bias.
    """

    vocab_size: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    numerics: layers.Numerics = layers.Numerics()
    layout: str = "paper"  # one of layers.CROSS_LAYOUTS

    @nn.compact
    def __call__(self, text_features, image_tokens, cache_index=None):
        length = text_features.shape[1]
        # A step's causal mask is the self-attention's own (positions <= cache_index).
        mask = causal_mask(length) if cache_index is None else None
        x = layers.Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            cross_attention=True,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            kv_cache=True,
            numerics=self.numerics,
            cross_layout=self.layout,
            name="decoder",
        )(text_features, mask, image_tokens, cache_index)
        x = self.numerics.layer_norm(self.dtype, "ln_out")(x)
        to_vocab = layers.dense(self.vocab_size, ("embed", "vocab"), self.dtype, "to_vocab", self.layout == "paper")
        logits = to_vocab(x)
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
    features=False: (pooled feature, None), the last block computing the pooled position
      alone (layers.Block's query_index).
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
    numerics: layers.Numerics = layers.Numerics()

    @nn.compact
    def __call__(self, tokens, features: bool = True):
        if self.pool not in TEXT_POOLING:
            raise ValueError(f"unknown text pooling {self.pool!r}; valid: {list(TEXT_POOLING)}")
        length = tokens.shape[1]
        embed = token_embedding(self.vocab_size, self.width)
        pos = self.param(
            "pos_embedding", layers.param_init(nn.initializers.normal(0.01), ("length", "embed")), (length, self.width)
        )
        x = embed(tokens).astype(self.dtype) + pos.astype(self.dtype)
        causal = self.pool == "eot"
        if causal:
            positions = jnp.arange(length)[None, :]
            pooled_at = jnp.max(jnp.where(tokens != self.pad_id, positions, 0), axis=1)
        else:
            pooled_at = jnp.full(tokens.shape[0], length - 1, jnp.int32)
        x = layers.Transformer(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            numerics=self.numerics,
            name="encoder",
        )(x, causal_mask(length) if causal else None, query_index=None if features else pooled_at)
        x = self.numerics.layer_norm(self.dtype, "ln_out")(x)
        if not features:
            return x[:, 0], None
        return layers.take_positions(x, pooled_at)[:, 0], x
