"""Zero-shot classification from the text embeddings of (class, template) prompts.

Two protocols turn the embeddings of every class's prompts into class scores:

- "clip" (Radford et al. 2021 §3.1.4; open_clip's zero_shot_classifier): a class is one
  concept phrased several ways. Each class's prompt embeddings are L2-normalised, averaged
  over the templates and renormalised; an image's score for a class is the cosine between
  its embedding and that class embedding (the logit scale does not change the ranking).
- "prob_sum": a class is a union of visually distinct sub-classes (the generated shapes
  data: "red circle" = one/two/three, small/large), each with its own prompt, so instead of
  averaging we marginalise: p(class | image) = Σ over the class's prompts of p(prompt |
  image), the softmax over every prompt at the model's own temperature exp(logit_scale).

Accuracies rank classes with ties going to the lower class index (a stable sort), so two
classes with the same name (ImageNet's "missile" and "sunglasses" in CLIP's names) do not
both count as correct.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

PROTOCOLS = ("clip", "prob_sum")


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.finfo(x.dtype).tiny)


def class_embeddings(template_embeddings) -> np.ndarray:
    """CLIP's class embeddings [C, D] from the text embeddings [C, T, D] of every (class, template):
    each normalised, the mean over templates, renormalised."""
    emb = np.asarray(template_embeddings)
    emb = emb.astype(np.result_type(emb.dtype, np.float32))
    if emb.ndim != 3:
        raise ValueError(f"template embeddings must be [classes, templates, dim], got shape {emb.shape}")
    return _l2_normalise(_l2_normalise(emb).mean(axis=1))


def class_log_probs(image_embeddings, prompt_embeddings, prompts_per_class: int, logit_scale: float):
    """log p(class | image) [N, C] from L2-normalised embeddings; prompts [C·P, D] are grouped by class."""
    logits = np.exp(logit_scale) * (np.asarray(image_embeddings) @ np.asarray(prompt_embeddings).T)  # [N, C·P]
    logits = logits.reshape(len(logits), -1, prompts_per_class)
    per_class = logsumexp(logits, axis=-1)
    return per_class - logsumexp(per_class, axis=-1, keepdims=True)


def class_scores(image_embeddings, template_embeddings, protocol: str = "clip", logit_scale: float = 0.0) -> np.ndarray:
    """Scores [N, C] (higher = more likely) of L2-normalised image embeddings [N, D] against the
    prompt embeddings [C, T, D] under one of PROTOCOLS: cosines to CLIP's class embeddings, or
    prob_sum's log p(class | image) at temperature exp(logit_scale)."""
    images = np.asarray(image_embeddings)
    prompts = np.asarray(template_embeddings)
    if protocol == "clip":
        return images @ class_embeddings(prompts).astype(images.dtype).T
    if protocol == "prob_sum":
        num_classes, per_class, dim = prompts.shape
        return class_log_probs(images, prompts.reshape(num_classes * per_class, dim), per_class, logit_scale)
    raise ValueError(f"unknown zero-shot protocol {protocol!r}; use one of {PROTOCOLS}")


def _rank_of_label(class_scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each example's true class in a stable descending sort of its scores:
    the classes scoring strictly higher, plus the lower-indexed classes scoring the same."""
    scores = np.asarray(class_scores)
    labels = np.asarray(labels)
    true = np.take_along_axis(scores, labels[:, None], axis=1)
    before = np.arange(scores.shape[1])[None, :] < labels[:, None]
    return np.sum((scores > true) | ((scores == true) & before), axis=1)


def topk_accuracy(class_scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of examples whose label is among their k best-scoring classes."""
    return float(np.mean(_rank_of_label(class_scores, labels) < k))


def mean_per_class_recall(class_scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Top-1 recall of each class present in `labels`, averaged over those classes (balanced
    accuracy; CLIP reports it for datasets like Pets, Caltech-101 and Flowers)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    correct = np.argmax(class_scores, axis=1) == labels
    count = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    present = count > 0
    return float(np.mean(hits[present] / count[present]))
