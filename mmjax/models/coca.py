"""CoCa: Contrastive Captioners (Yu et al. 2022).

    image ──ViT──► tokens ─┬─ pooler(n=1)   ─► proj ─► x_img  ┐
                           └─ pooler(n=256) ─► caption tokens │ L_con (λ=1): contrastive(x_img, x_txt)
    text ──unimodal decoder──► [CLS] ─► proj ─► x_txt         ┘
            └─► token features ──multimodal decoder(cross-attends caption tokens)──► logits
                                                                  L_cap (λ=2): next-token CE

Both poolers attend to the ViT's output in parallel (our reading of §3.2, "task-specific
attentional pooling ... n_query = 256 for the generative loss and n_query = 1 for the
contrastive loss", and of its Figure 2 pseudocode, where both poolers take `img_feature`;
open_clip calls this arrangement "parallel", as opposed to "cascade").

layout="open_clip" reproduces open_clip's CoCa (coca_ViT-B-32, coca_ViT-L-14), whose weights
are public; it differs from the paper's in four places (docs/models.md, "open_clip's CoCa"):
  * the ViT is CLIP's (a [CLS] token, ln_pre, a bias-free patch embedding); its final
    LayerNorm is what open_clip calls the pooler's ln_k;
  * one pooler, not two: `caption_queries` queries of the embedding's width (a LayerNorm on
    the queries, text_heads heads); query 0's output is the contrastive image feature, the
    other caption_queries - 1 are the image tokens the decoder reads;
  * each multimodal layer is a self-attention block and a cross-attention block, each with
    its own MLP (layers.Block, cross_layout), and the context is normalised; the
    vocabulary projection has no bias;
  * the unimodal decoder's padding mask is open_clip's (text.UnimodalTextDecoder, key_mask).

L_con is CLIP's softmax loss in the paper; with SigLIP's sigmoid loss instead, CoCa also
learns SigLIP's bias b (`logit_bias_init`, set by mmjax.models.build_model).

Caption decoding with a key/value cache (mmjax.models.decoding drives these; the cache is
the flax collection "cache", see mmjax.models.layers):

    logits, v = model.apply({"params": p}, caption_tokens, tokens, method=model.caption_prefill,
                            mutable=["cache"])                        # [B, L, V]; v["cache"]
    logits, v = model.apply({"params": p, "cache": v["cache"]}, token, t,
                            method=model.caption_step, mutable=["cache"])  # [B, V]
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers, poolers, text, vit
from mmjax.models.clip import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, logit_outputs, logit_params


LAYOUTS = ("paper", "open_clip")


class CoCa(nn.Module):
    # Top-level parameters of each tower (parameter counts, LiT locking).
    towers: ClassVar[dict[str, tuple[str, ...]]] = {
        "image": ("image_encoder", "contrastive_pooler", "caption_pooler", "image_pooler", "image_proj"),
        "text": ("unimodal_decoder", "text_proj"),
        "decoder": ("multimodal_decoder",),
        "shared": ("logit_scale", "logit_bias"),
    }
    has_decoder: ClassVar[bool] = True

    vocab_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_mlp_dim: int
    vision_heads: int
    text_width: int
    unimodal_depth: int
    multimodal_depth: int
    text_mlp_dim: int
    text_heads: int
    embed_dim: int
    caption_queries: int = 256
    logit_scale_init: float = LOGIT_SCALE_INIT
    logit_scale_max: float = LOGIT_SCALE_MAX  # math.inf: not clamped
    logit_bias_init: float | None = None  # SigLIP's b; None: no bias (softmax loss)
    pad_id: int = 0
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    patch_dropout: float = 0.0
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    numerics: layers.Numerics = layers.Numerics()  # every LayerNorm's ε and MLP's activation
    layout: str = "paper"  # one of LAYOUTS

    def setup(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown CoCa layout {self.layout!r}; valid: {list(LAYOUTS)}")
        open_clip = self.layout == "open_clip"
        self.image_encoder = vit.ViT(
            self.patch_size,
            self.vision_width,
            self.vision_depth,
            self.vision_mlp_dim,
            self.vision_heads,
            self.dtype,
            class_token=open_clip,
            patch_bias=not open_clip,
            pre_norm=open_clip,
            patch_dropout=self.patch_dropout,
            image_mean=self.image_mean,
            image_std=self.image_std,
            remat=self.remat,
            scan=self.scan_layers,
            numerics=self.numerics,
        )
        if open_clip:
            self.image_pooler = poolers.AttentionalPooler(
                self.caption_queries, self.text_heads, self.dtype, self.numerics, self.embed_dim, query_norm=True
            )
        else:
            self.contrastive_pooler = poolers.AttentionalPooler(1, self.vision_heads, self.dtype, self.numerics)
            self.caption_pooler = poolers.AttentionalPooler(
                self.caption_queries, self.vision_heads, self.dtype, self.numerics
            )
        self.image_projection = layers.dense(self.embed_dim, ("embed", "proj"), self.dtype, "image_proj", False)
        self.unimodal_decoder = text.UnimodalTextDecoder(
            self.vocab_size,
            self.text_width,
            self.unimodal_depth,
            self.text_mlp_dim,
            self.text_heads,
            self.pad_id,
            self.dtype,
            self.remat,
            self.scan_layers,
            self.numerics,
            key_mask="open_clip" if open_clip else "text",
        )
        self.text_projection = layers.dense(self.embed_dim, ("embed", "proj"), self.dtype, "text_proj", False)
        self.multimodal_decoder = text.MultimodalTextDecoder(
            self.vocab_size,
            self.multimodal_depth,
            self.text_mlp_dim,
            self.text_heads,
            self.dtype,
            self.remat,
            self.scan_layers,
            self.numerics,
            self.layout,
        )
        self.logit_scale, self.logit_bias = logit_params(self)

    def encode_image(self, images, train: bool = False):
        """-> (L2-normalised image embedding [B, embed_dim] f32, caption tokens [B, n, width])."""
        tokens = self.image_encoder(images, train)
        if self.layout == "open_clip":  # one pooler: query 0 for the contrastive loss, the rest for captions
            pooled = self.image_pooler(tokens)
            pooled, caption_tokens = pooled[:, 0], pooled[:, 1:]
        else:
            pooled, caption_tokens = self.contrastive_pooler(tokens)[:, 0], self.caption_pooler(tokens)
        return layers.l2_normalize(self.image_projection(pooled)), caption_tokens

    def encode_text(self, tokens):
        """-> (L2-normalised text embedding [B, embed_dim] f32, unimodal token features)."""
        features, cls = self.unimodal_decoder(tokens)
        return layers.l2_normalize(self.text_projection(cls)), features

    def embed_image(self, images):
        """The L2-normalised embedding alone (what zero-shot and retrieval read); under jit
        XLA drops the caption tokens nothing reads (a separate caption pooler's work)."""
        return self.encode_image(images)[0]

    def embed_text(self, tokens):
        """The L2-normalised text embedding alone."""
        return self.encode_text(tokens)[0]

    def decode(self, text_features, caption_tokens):
        """Next-token logits [B, L, vocab] (f32) from unimodal features and image tokens."""
        return self.multimodal_decoder(text_features, caption_tokens).astype(jnp.float32)

    def caption_logits(self, caption_tokens, tokens):
        """Logits for `tokens` given precomputed image tokens: the greedy decoder's inner step."""
        _, features = self.encode_text(tokens)
        return self.decode(features, caption_tokens)

    def caption_prefill(self, caption_tokens, tokens):
        """`caption_logits` [B, L, V]; applied with mutable=["cache"] it also fills the decoding
        cache: both decoders' self-attention keys/values for all L positions of `tokens`, the
        unimodal decoder's key-validity row, and the cross-attention keys/values of
        `caption_tokens`. Cache length = L (the text length the model reads, text_len - 1)."""
        return self.caption_logits(caption_tokens, tokens)

    def caption_step(self, token, cache_index, caption_tokens=None):
        """Next-token logits [B, V] (f32) for `token` [B, 1] at position `cache_index` (int32
        scalar, may be traced), given the cache of the positions before it; apply with
        mutable=["cache"]: the token's keys/values are written at cache_index. Equal to
        `caption_logits(caption_tokens, tokens)[:, cache_index]` for the row whose positions
        0..cache_index the cache and `token` hold. caption_tokens=None: the cached
        cross-attention keys/values; given: they are projected from these (and stored), which
        is how a zero-filled cache (mmjax.models.decoding.empty_cache) starts."""
        features, _ = self.unimodal_decoder(token, cache_index)
        return self.multimodal_decoder(features, caption_tokens, cache_index)[:, 0].astype(jnp.float32)

    def clamped_logit_scale(self):
        return jnp.minimum(self.logit_scale, self.logit_scale_max)

    def __call__(self, images, tokens, train: bool = False):
        image_embedding, caption_tokens = self.encode_image(images, train)
        text_embedding, features = self.encode_text(tokens)
        return {
            "image_embedding": image_embedding,
            "text_embedding": text_embedding,
            "caption_logits": self.decode(features, caption_tokens),
            **logit_outputs(self),
        }
