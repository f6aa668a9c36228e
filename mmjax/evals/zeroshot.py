"""Zero-shot classification (CLIP §3.1.4): the class whose prompt-ensemble embedding is
closest to the image embedding wins."""
from __future__ import annotations

import numpy as np


def class_embeddings(prompt_embeddings: np.ndarray, prompts_per_class: int) -> np.ndarray:
    """Mean of each class's L2-normalised prompt embeddings, renormalised: [C·P, d] -> [C, d]."""
    grouped = prompt_embeddings.reshape(-1, prompts_per_class, prompt_embeddings.shape[-1]).mean(axis=1)
    return grouped / np.linalg.norm(grouped, axis=-1, keepdims=True)


def topk_accuracy(image_embeddings: np.ndarray, classes: np.ndarray, labels: np.ndarray, k: int) -> float:
    scores = image_embeddings @ classes.T
    topk = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))
