"""Zero-shot classification (CLIP §3.1.4) with prompts built from class names.

A class here ("red circle") is a union of visually distinct sub-classes (one/two/three,
small/large), each with its own prompt, rather than one concept phrased several ways. So
instead of averaging prompt embeddings we marginalise: p(class | image) = Σ over the class's
prompts of p(prompt | image), the softmax over every prompt at the model's own temperature.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def class_log_probs(image_embeddings, prompt_embeddings, prompts_per_class: int, logit_scale: float):
    """log p(class | image) [N, C] from L2-normalised embeddings; prompts are grouped by class."""
    logits = np.exp(logit_scale) * (image_embeddings @ prompt_embeddings.T)  # [N, C·P]
    logits = logits.reshape(len(image_embeddings), -1, prompts_per_class)
    per_class = logsumexp(logits, axis=-1)
    return per_class - logsumexp(per_class, axis=-1, keepdims=True)


def topk_accuracy(class_scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    topk = np.argsort(-class_scores, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))
