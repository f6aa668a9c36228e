"""Image↔text retrieval: recall@k with several captions per image, in bounded memory.

Which texts are correct answers is given by image id only: `text_image[t]` is the index of
the image text t describes (COCO and Flickr30k: 5 captions per image). Image→text is a hit
at k when ANY of the image's captions is among its k best texts; text→image is a hit when
the text's own image is among its k best images.

Ties. Identical caption strings (and identical images) get bit-identical embeddings, so
exact ties happen. A query's rank is the number of NEGATIVES scoring strictly higher than its
best-scoring positive: ties resolve in favour of the positive, so the result does not
depend on the order of the dataset. (Breaking ties by position would make e.g. "a man
riding a wave on a surfboard", written for several images, a hit or a miss depending on
which image comes first; breaking them against the positive would make it a miss for all of
them.) To make the ties exact whatever the BLAS kernels do, bit-identical candidate rows are
scored once and the score is shared.

Memory: similarities are computed for `chunk_size` queries at a time, so the 5k × 25k matrix
of COCO is never held whole: O(chunk_size × candidates) at a time.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import hypergeom


def _as_float(x) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


def _distinct_rows(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(the bit-distinct rows, index of each candidate's row among them), or (candidates, None)
    when every row is distinct already."""
    rows = np.ascontiguousarray(candidates)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    if len(first) == len(rows):
        return rows, None
    return rows[first], inverse.reshape(-1)


def _chunked_scores(queries: np.ndarray, candidates: np.ndarray, chunk_size: int):
    """Yields (start, scores [chunk, N_c]) with bit-identical scores for bit-identical candidates."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    distinct, inverse = _distinct_rows(candidates)
    for start in range(0, len(queries), chunk_size):
        scores = queries[start : start + chunk_size] @ distinct.T
        yield start, scores if inverse is None else scores[:, inverse]


def _ranks(queries, candidates, positive_of, chunk_size: int) -> np.ndarray:
    """Per query, the number of negatives scoring strictly higher than its best positive.

    `positive_of(start, stop)` returns the bool mask [stop - start, N_c] of each query's positives.
    """
    ranks = np.empty(len(queries), np.int64)
    for start, scores in _chunked_scores(queries, candidates, chunk_size):
        stop = start + len(scores)
        positive = positive_of(start, stop)
        best = np.max(np.where(positive, scores, -np.inf), axis=1, keepdims=True)
        ranks[start:stop] = np.sum((scores > best) & ~positive, axis=1)
    return ranks


def _check(image_embeddings, text_embeddings, text_image):
    images, texts = _as_float(image_embeddings), _as_float(text_embeddings)
    text_image = np.asarray(text_image)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"embeddings must be [N, D] with one D, got {images.shape} and {texts.shape}")
    if text_image.shape != (len(texts),) or not np.issubdtype(text_image.dtype, np.integer):
        raise ValueError(f"text_image must hold one integer image index per text ({len(texts)}), got {text_image.dtype} {text_image.shape}")
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= len(images)):
        raise ValueError(f"text_image must index the {len(images)} images, got {text_image.min()}..{text_image.max()}")
    return images, texts, text_image


def recall_at_k(image_embeddings, text_embeddings, text_image, ks=(1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k both ways: keys `image_to_text_r@{k}` and `text_to_image_r@{k}`.

    image_embeddings [N_i, D] and text_embeddings [N_t, D] are L2-normalised (scores are dot
    products); text_image [N_t] int is the image each text describes. A query's rank is the
    number of negatives scoring strictly higher than its best positive (exact ties go to the
    positive; see the module docstring), and it is a hit at k when that rank is below k.
    Images that no text describes have no correct answer and are left out of image→text.
    """
    images, texts, text_image = _check(image_embeddings, text_embeddings, text_image)
    i2t = _ranks(images, texts, lambda a, b: text_image[None, :] == np.arange(a, b)[:, None], chunk_size)
    described = np.bincount(text_image, minlength=len(images)) > 0
    t2i = _ranks(texts, images, lambda a, b: np.arange(len(images))[None, :] == text_image[a:b, None], chunk_size)
    results = {}
    for k in ks:
        results[f"image_to_text_r@{k}"] = float(np.mean(i2t[described] < k))
    for k in ks:
        results[f"text_to_image_r@{k}"] = float(np.mean(t2i < k))
    return results


def top_matches(queries, candidates, k: int = 5, chunk_size: int = 1024) -> np.ndarray:
    """Indices [Q, min(k, N_c)] of each query's k best-scoring candidates (dot products), best
    first; equal scores in candidate order. k is capped at the number of candidates, so a
    picture of a tiny set still draws."""
    queries, candidates = _as_float(queries), _as_float(candidates)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(candidates))
    out = np.empty((len(queries), k), np.int64)
    for start, scores in _chunked_scores(queries, candidates, chunk_size):
        out[start : start + len(scores)] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return out


def chance_recall_at_k(text_image, num_images: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected recall@k of a uniformly random ranking, with the keys of recall_at_k.

    Image→text: image i with n_i captions among N_t texts is a hit at k unless all k texts
    drawn (without replacement) are negatives: 1 - C(N_t - n_i, k) / C(N_t, k), the
    hypergeometric probability of no positive; averaged over the images with n_i > 0. At k = 1
    that is mean_i n_i / N_t = (Σ n_i) / (N_i' N_t) = 1 / N_i', N_i' the images with a caption
    (Σ n_i = N_t: each text describes one image). Text→image: one positive among N_i images,
    so min(k, N_i) / N_i.
    """
    text_image = np.asarray(text_image)
    num_texts = len(text_image)
    per_image = np.bincount(text_image, minlength=num_images)
    per_image = per_image[per_image > 0]
    results = {}
    for k in ks:
        miss = hypergeom.pmf(0, num_texts, per_image, min(k, num_texts))
        results[f"image_to_text_r@{k}"] = float(np.mean(1.0 - miss))
    for k in ks:
        results[f"text_to_image_r@{k}"] = min(k, num_images) / num_images
    return results


def chance_recall_at_1(text_image, num_images: int) -> dict[str, float]:
    """Expected recall@1 both ways of a random ranking: image→text 1 / (images with a caption),
    text→image 1 / num_images (see chance_recall_at_k)."""
    return chance_recall_at_k(text_image, num_images, ks=(1,))
