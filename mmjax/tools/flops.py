"""Analytic FLOPs of a training example: 2 FLOPs per multiply-add of every matmul.

Elementwise work (norms, softmax, GELU) is left out, as in the papers' counts; a training
step costs 3× the forward pass (forward, and backward for activations and for weights).
"""
from __future__ import annotations


def attention_flops(q_len: int, kv_len: int, width: int, kv_width: int) -> int:
    projections = q_len * width * width * 2 + kv_len * kv_width * width * 2  # q, out; k, v
    scores_and_mix = 2 * q_len * kv_len * width  # q kᵀ and weights · v
    return 2 * (projections + scores_and_mix)


def block_flops(length: int, width: int, mlp_dim: int, context_len: int = 0, context_width: int = 0) -> int:
    flops = attention_flops(length, length, width, width) + 2 * 2 * length * width * mlp_dim
    if context_len:
        flops += attention_flops(length, context_len, width, context_width)
    return flops


def coca_forward_flops(model_cfg, image_size: int, text_len: int, vocab_size: int) -> int:
    """Forward FLOPs of one image–text pair; `text_len` counts the model's input tokens."""
    v, t = model_cfg.vision, model_cfg.text
    patches = (image_size // v.patch_size) ** 2
    image = 2 * patches * v.patch_size**2 * 3 * v.width
    image += v.depth * block_flops(patches, v.width, v.mlp_dim)
    queries = 1 + model_cfg.caption_queries
    image += attention_flops(queries, patches, v.width, v.width)
    image += 2 * v.width * model_cfg.embed_dim
    text = t.unimodal_depth * block_flops(text_len + 1, t.width, t.mlp_dim)  # + [CLS]
    text += 2 * t.width * model_cfg.embed_dim
    text += t.multimodal_depth * block_flops(text_len, t.width, t.mlp_dim, model_cfg.caption_queries, v.width)
    text += 2 * text_len * t.width * vocab_size
    return image + text


def contrastive_forward_flops(batch: int, embed_dim: int) -> int:
    """The B×B logits of one global batch."""
    return 2 * batch * batch * embed_dim


def train_step_flops(config, vocab_size: int) -> int:
    per_example = coca_forward_flops(config.model, config.data.image_size, config.data.text_len - 1, vocab_size)
    forward = config.batch_size * per_example + contrastive_forward_flops(config.batch_size, config.model.embed_dim)
    return 3 * forward
