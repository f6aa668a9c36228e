"""Analytic FLOPs of a training example: 2 FLOPs per multiply-add of every matmul.

Elementwise work (norms, softmax, GELU) is left out, as in the papers' counts; a training
step costs 3× the forward pass (forward, and backward for activations and for weights).
With FLIP patch dropout the training forward sees only the kept patches.
"""
from __future__ import annotations

from mmjax.models import model_vocab_size
from mmjax.models.vit import kept_patches


def attention_flops(q_len: int, kv_len: int, width: int, kv_width: int) -> int:
    projections = q_len * width * width * 2 + kv_len * kv_width * width * 2  # q, out; k, v
    scores_and_mix = 2 * q_len * kv_len * width  # q kᵀ and weights · v
    return 2 * (projections + scores_and_mix)


def mlp_flops(length: int, width: int, mlp_dim: int) -> int:
    return 2 * 2 * length * width * mlp_dim


def block_flops(length: int, width: int, mlp_dim: int, context_len: int = 0, context_width: int = 0) -> int:
    flops = attention_flops(length, length, width, width) + mlp_flops(length, width, mlp_dim)
    if context_len:
        flops += attention_flops(length, context_len, width, context_width)
    return flops


def pooled_block_flops(length: int, width: int, mlp_dim: int) -> int:
    """A block computed at one position only (layers.Block's query_index): keys and values of
    every position, the query, output projection and MLP of one."""
    return attention_flops(1, length, width, width) + mlp_flops(1, width, mlp_dim)


def vit_flops(model_cfg, image_size: int, train: bool) -> tuple[int, int]:
    """-> (FLOPs of patch embedding + blocks, tokens at the encoder's output)."""
    v = model_cfg.vision
    patches = (image_size // v.patch_size) ** 2
    kept = kept_patches(patches, model_cfg.patch_dropout) if train and model_cfg.patch_dropout else patches
    class_token = (model_cfg.name == "clip" and model_cfg.image_pool == "cls") or _open_clip_coca(model_cfg)
    tokens = kept + int(class_token)
    return 2 * patches * v.patch_size**2 * 3 * v.width + v.depth * block_flops(tokens, v.width, v.mlp_dim), tokens


def _open_clip_coca(model_cfg) -> bool:
    return model_cfg.name == "coca" and model_cfg.get("coca_layout", "paper") == "open_clip"


def coca_forward_flops(model_cfg, image_size: int, text_len: int, vocab_size: int, train: bool = False) -> int:
    """Forward FLOPs of one image–text pair; `text_len` counts the model's input tokens."""
    v, t, queries, embed = model_cfg.vision, model_cfg.text, model_cfg.caption_queries, model_cfg.embed_dim
    image, tokens = vit_flops(model_cfg, image_size, train)
    if _open_clip_coca(model_cfg):  # one pooler of embed-wide queries; its first output is the contrastive one
        image += attention_flops(queries, tokens, embed, v.width) + 2 * embed * embed
        context_len, context_width = queries - 1, embed
    else:  # a contrastive and a caption pooler
        image += attention_flops(1, tokens, v.width, v.width) + attention_flops(queries, tokens, v.width, v.width)
        image += 2 * v.width * embed
        context_len, context_width = queries, v.width
    text = t.unimodal_depth * block_flops(text_len + 1, t.width, t.mlp_dim)  # + [CLS]
    text += 2 * t.width * embed
    text += t.multimodal_depth * block_flops(text_len, t.width, t.mlp_dim, context_len, context_width)
    if _open_clip_coca(model_cfg):  # each layer's cross-attention block has its own MLP
        text += t.multimodal_depth * mlp_flops(text_len, t.width, t.mlp_dim)
    text += 2 * text_len * t.width * vocab_size
    return image + text


def clip_forward_flops(model_cfg, image_size: int, text_len: int, train: bool = False) -> int:
    """Forward FLOPs of one image–text pair for CLIP/SigLIP (the token lookup is free).

    A tower pooled at one position computes its last block at that position only, scanned or
    not (mmjax.models.clip): the [CLS]-pooled ViT and every text tower."""
    v, t = model_cfg.vision, model_cfg.text
    image, tokens = vit_flops(model_cfg, image_size, train)
    if model_cfg.image_pool == "map":
        image += attention_flops(1, tokens, v.width, v.width) + mlp_flops(1, v.width, v.mlp_dim)
    else:
        image += pooled_block_flops(tokens, v.width, v.mlp_dim) - block_flops(tokens, v.width, v.mlp_dim)
    image += 2 * v.width * model_cfg.embed_dim
    text = t.depth * block_flops(text_len, t.width, t.mlp_dim) + 2 * t.width * model_cfg.embed_dim
    text += pooled_block_flops(text_len, t.width, t.mlp_dim) - block_flops(text_len, t.width, t.mlp_dim)
    return image + text


def forward_flops(config, vocab_size: int, train: bool = False) -> int:
    """Forward FLOPs of one example of `config` (model input: data.text_len - 1 tokens)."""
    m, d = config.model, config.data
    if m.name == "coca":
        return coca_forward_flops(m, d.image_size, d.text_len - 1, vocab_size, train)
    return clip_forward_flops(m, d.image_size, d.text_len - 1, train)


def contrastive_forward_flops(batch: int, embed_dim: int) -> int:
    """The B×B logits of one global batch."""
    return 2 * batch * batch * embed_dim


def train_step_flops(config, tokenizer_vocab_size: int) -> int:
    vocab = model_vocab_size(config.model, tokenizer_vocab_size)
    per_example = forward_flops(config, vocab, train=True)
    forward = config.batch_size * per_example + contrastive_forward_flops(config.batch_size, config.model.embed_dim)
    return 3 * forward
