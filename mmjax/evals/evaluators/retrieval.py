"""`retrieval`: image→text and text→image recall@k on an image–caption split.

Positives are by image: an image's captions are all the texts of its record (COCO's five),
or of every record naming the same image file. Options: ks (recall cut-offs), chunk_size
(query rows scored at once: memory is chunk_size × the candidates, never N_i × N_t).
Metrics: image_to_text_r@k, text_to_image_r@k.
"""
from __future__ import annotations

import numpy as np

from mmjax import validation
from mmjax.evals import Unavailable, pictures, retrieval

OPTIONS = dict(ks=(1, 5, 10), chunk_size=1024)
OPTION_RULES = dict(
    ks=validation.integers(1),
    chunk_size=validation.integer(1),
)
PICTURE_QUERIES = 4


class Evaluator:
    def __init__(self, name, entry, context):
        self.options = entry.options
        self.data = context.dataset(entry)
        if not self.data.texts:
            raise Unavailable(f"{self.data.name} has no captions")
        self._last = None

    def run(self, predict) -> dict[str, float]:
        image_emb = predict.embed_images(self.data.images)
        text_emb = predict.embed_texts(self.data.texts)
        self._last = image_emb, text_emb
        return retrieval.recall_at_k(image_emb, text_emb, self.data.text_image, ks=tuple(self.options.ks),
                                     chunk_size=self.options.chunk_size)

    def chance(self) -> dict[str, float]:
        return retrieval.chance_recall_at_k(self.data.text_image, len(self.data.images), ks=tuple(self.options.ks))

    def draw(self, path: str) -> None:
        """The first images, and one caption of each of the first images, with their top 5."""
        image_emb, text_emb = self._last
        queries = min(PICTURE_QUERIES, len(image_emb))
        # Text queries first (the picture's text rows are its first texts), then the rest.
        first_texts = np.searchsorted(self.data.text_image, np.arange(queries))
        order = np.concatenate([first_texts, np.setdiff1d(np.arange(len(text_emb)), first_texts)])
        position = np.argsort(order)  # a text's index in `order`
        pictures.retrieval_grid(
            path, self.data.images, [self.data.texts[i] for i in order],
            position[retrieval.top_matches(image_emb[:queries], text_emb, k=5)],
            retrieval.top_matches(text_emb[first_texts], image_emb, k=5),
            self.data.text_image[order], queries=queries)
