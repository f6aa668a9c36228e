"""`linear_probe`: few-shot and full linear classifiers on frozen image embeddings
(big_vision's fewshot evaluators): fit on `train_data`, score on `data`.

Options: train_data (a labelled split; required), train_limit (0: all), shots (per class),
l2_reg (None: the method's own, mmjax.evals.linear_probe.DEFAULT_L2), method (ridge: closed form; logistic: L-BFGS), full (also fit on all of train_data),
seed (which examples make each few-shot set). Metrics: {k}shot_top1, full_top1.
"""
from __future__ import annotations

from ml_collections.config_dict import placeholder

from mmjax import validation
from mmjax.evals import Unavailable, linear_probe

OPTIONS = dict(train_data="", train_limit=0, shots=(1, 5, 10, 25), l2_reg=placeholder(float), method="ridge", full=True,
               seed=0)
OPTION_RULES = dict(
    train_data=validation.optional_source,
    train_limit=validation.integer(0),
    shots=validation.integers(1),
    l2_reg=validation.optional(validation.number(0), "the method's default, linear_probe.DEFAULT_L2"),
    method=validation.one_of(linear_probe.METHODS),
    full=validation.flag,
    seed=validation.integer(0),
)


class Evaluator:
    def __init__(self, name, entry, context):
        self.options = entry.options
        if not self.options.train_data:
            raise Unavailable("options.train_data is empty; name the labelled split to fit on")
        self.test = context.dataset(entry)
        self.train = context.load(self.options.train_data, self.options.train_limit)
        for split in (self.test, self.train):
            if (split.labels < 0).any():
                raise Unavailable(f"{split.name} has no class labels")
        self.num_classes = int(max(self.test.labels.max(), self.train.labels.max())) + 1

    def run(self, predict) -> dict[str, float]:
        return linear_probe.probe(
            predict.embed_images(self.train.images), self.train.labels,
            predict.embed_images(self.test.images), self.test.labels, self.num_classes,
            shots=tuple(self.options.shots), l2_reg=self.options.l2_reg, method=self.options.method,
            full=self.options.full, seed=self.options.seed)

    def chance(self) -> dict[str, float]:
        return {}
