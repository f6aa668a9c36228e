"""`zeroshot`: classify a labelled split by its class names (CLIP §3.1.4).

Options:
  class_names  "" = the split's own (folder names, tfds ClassLabel), a named set
               (mmjax.evals.prompts: imagenet1k, cifar10, cifar100) or a text file, one per line
  templates    "" = the split's own prompts if it has them (shapes), else "photo"
               ("a photo of a {}."); a named set (imagenet80, cifar, photo) or a file
  protocol     clip: mean of the normalised template embeddings per class, renormalised,
               then cosine similarity; prob_sum: p(class) = Σ over its prompts of the softmax
               over all prompts at the model's temperature (mmjax.evals.zeroshot)
Metrics: top1, top5 (with more than 5 classes), mean_per_class_recall.
"""
from __future__ import annotations

from mmjax import validation
from mmjax.evals import Unavailable, prompts, zeroshot

OPTIONS = dict(class_names="", templates="", protocol="clip")
OPTION_RULES = dict(class_names=validation.string, templates=validation.string,
                    protocol=validation.one_of(zeroshot.PROTOCOLS))


class Evaluator:
    def __init__(self, name, entry, context):
        self.options = entry.options
        self.data = context.dataset(entry)
        if (self.data.labels < 0).any():
            raise Unavailable(f"{self.data.name} has no class labels; point its data at a classification set")
        names = prompts.class_names(self.options.class_names) if self.options.class_names else self.data.class_names
        if not names:
            raise Unavailable(f"{self.data.name} has labels but no class names; set its options.class_names")
        if self.data.labels.max() >= len(names):
            raise Unavailable(f"{self.data.name} has label {self.data.labels.max()} but {len(names)} class names")
        if not self.options.templates and self.data.prompts:
            self.prompts = [list(p) for p in self.data.prompts]
        else:
            templates = prompts.templates(self.options.templates or "photo")
            self.prompts = [[prompts.fill(t, n) for t in templates] for n in names]
        self.num_classes = len(self.prompts)
        if len({len(p) for p in self.prompts}) != 1:
            raise Unavailable("every class needs the same number of prompts")

    def run(self, predict) -> dict[str, float]:
        prompt_emb = predict.embed_texts([p for class_prompts in self.prompts for p in class_prompts])
        scores = zeroshot.class_scores(predict.embed_images(self.data.images),
                                       prompt_emb.reshape(self.num_classes, len(self.prompts[0]), -1),
                                       self.options.protocol, predict.logit_scale)
        labels = self.data.labels
        results = {"top1": zeroshot.topk_accuracy(scores, labels, 1)}
        if self.num_classes > 5:
            results["top5"] = zeroshot.topk_accuracy(scores, labels, 5)
        results["mean_per_class_recall"] = zeroshot.mean_per_class_recall(scores, labels, self.num_classes)
        return results

    def chance(self) -> dict[str, float]:
        c = self.num_classes
        return {"top1": 1 / c, **({"top5": 5 / c} if c > 5 else {}), "mean_per_class_recall": 1 / c}
