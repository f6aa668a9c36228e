"""`captioning`: caption each image of a split with the model's decoder; score against its
references (all captions of the image) with BLEU-4 and CIDEr-D (mmjax.evals.caption_metrics).

Options: the decoding (mmjax.models.decoding.DecodeOptions: method greedy | beam | sample,
beam_size, length_penalty, temperature, top_k, top_p, min_len, max_len) and the sampling seed.
Metrics: bleu4, cider, exact_match (the caption equals one of the references).
"""
from __future__ import annotations

import dataclasses

from mmjax import validation
from mmjax.evals import Unavailable, caption_metrics, pictures
from mmjax.models import decoding

OPTIONS = {**dataclasses.asdict(decoding.DecodeOptions()), "seed": 0}
OPTION_RULES = dict(
    method=validation.one_of(decoding.METHODS),
    beam_size=validation.integer(1),
    length_penalty=validation.number(0),
    temperature=validation.number(0, low_open=True),
    top_k=validation.integer(0),
    top_p=validation.number(0, 1, low_open=True),
    min_len=validation.integer(0),
    max_len=validation.integer(0),
    seed=validation.integer(0),
)
SAMPLES = 8


class Evaluator:
    def __init__(self, name, entry, context):
        if not context.has_decoder:
            raise Unavailable("the model has no caption decoder")
        self.data = context.dataset(entry)
        if not self.data.texts:
            raise Unavailable(f"{self.data.name} has no captions")
        options = {k: v for k, v in entry.options.items() if k != "seed"}
        self.decode = decoding.DecodeOptions(**options)
        self.seed = entry.options.seed
        self.references = self.data.references()
        self.samples = []  # (first reference, generated) per image, from the last run
        self._generated = []

    def run(self, predict) -> dict[str, float]:
        generated = predict.caption(self.data.images, self.decode, self.seed)
        self.samples = [(refs[0] if refs else "", g) for refs, g in zip(self.references, generated)]
        self._generated = generated
        scored = [(g, r) for g, r in zip(generated, self.references) if r]
        predictions, references = [g for g, _ in scored], [r for _, r in scored]
        return {
            **caption_metrics.caption_scores(predictions, references),
            "exact_match": sum(g in r for g, r in scored) / len(scored),
        }

    def chance(self) -> dict[str, float]:
        return {}

    def draw(self, path: str) -> None:
        pictures.caption_samples(path, self.data.images[:SAMPLES], self.references[:SAMPLES],
                                 self._generated[:SAMPLES])
