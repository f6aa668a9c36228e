"""Image↔text retrieval recall@k.

A generated dataset repeats captions (several images are "two small red circles"), so a
retrieved item counts as correct when its caption equals the query's, not only when it is
the query's own pair; otherwise recall@1 would be capped well below 1 for a perfect model.
"""
from __future__ import annotations

import numpy as np


def recall_at_k(image_embeddings, text_embeddings, captions, ks=(1, 5)) -> dict[str, float]:
    captions = np.asarray(captions)
    same = captions[:, None] == captions[None, :]  # same[i, j]: item j is a correct answer for i
    sims = image_embeddings @ text_embeddings.T
    results = {}
    for direction, scores in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranked = np.argsort(-scores, axis=1)
        hits = np.take_along_axis(same, ranked, axis=1)
        for k in ks:
            results[f"{direction}_r@{k}"] = float(np.mean(np.any(hits[:, :k], axis=1)))
    return results


def chance_recall_at_1(captions) -> float:
    """Expected recall@1 of a random ranking: the mean share of items with the query's caption."""
    captions = np.asarray(captions)
    return float(np.mean((captions[:, None] == captions[None, :]).mean(axis=1)))
