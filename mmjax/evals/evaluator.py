"""Runs every evaluation of the held-out split (data.eval) on a set of parameters."""
from __future__ import annotations

import jax
import numpy as np

from mmjax.data import pipeline
from mmjax.evals import captioning, retrieval, zeroshot
from mmjax.parallel import sharding


class Evaluator:
    """Zero-shot top-1/5 when the split has classes (the embedded data, folder:, tfds
    classification sets), recall@1/5 both ways, and greedy captioning for models with a
    decoder (`model.has_decoder`: CoCa, not CLIP/SigLIP)."""

    def __init__(self, model, tokenizer, data_cfg, eval_cfg, mesh, param_shardings):
        self.model = model
        self.tokenizer = tokenizer
        self.data = pipeline.eval_set(data_cfg, tokenizer)
        class_prompts = self.data["zeroshot_prompts"] or []
        self.num_classes = len(class_prompts)
        self.prompts_per_class = len(class_prompts[0]) if class_prompts else 0
        if any(len(p) != self.prompts_per_class for p in class_prompts):
            raise ValueError("every class needs the same number of zero-shot prompts")
        prompts = [p for per_class in class_prompts for p in per_class]
        self.prompt_tokens = tokenizer.encode(prompts, data_cfg.text_len)
        shards = sharding.num_batch_shards(mesh)
        self.chunk = -(-eval_cfg.batch_size // shards) * shards  # a multiple of the batch shards
        batch = sharding.batch_sharding(mesh)
        out = sharding.replicated(mesh)
        text_len = data_cfg.text_len

        def embed_images(params, images):
            return model.apply({"params": params}, images, method=model.encode_image)[0]

        def embed_texts(params, tokens):
            return model.apply({"params": params}, tokens[:, :-1], method=model.encode_text)[0]

        def caption(params, images):
            _, caption_tokens = model.apply({"params": params}, images, method=model.encode_image)
            # The model reads text_len - 1 inputs (the last token is only ever a target).
            logits_fn = lambda t: model.apply({"params": params}, caption_tokens, t[:, :-1], method=model.caption_logits)
            return captioning.greedy_decode(
                logits_fn, images.shape[0], text_len, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
            )

        jit = lambda f: jax.jit(f, in_shardings=(param_shardings, batch), out_shardings=out)
        self._embed_images, self._embed_texts, self._caption = jit(embed_images), jit(embed_texts), jit(caption)

    def _map(self, fn, params, inputs: np.ndarray) -> np.ndarray:
        """Apply `fn` in fixed-size chunks (one compilation), padding the last one."""
        outputs = []
        for start in range(0, len(inputs), self.chunk):
            part = inputs[start : start + self.chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], self.chunk - len(part), axis=0)])
            outputs.append(np.asarray(fn(params, padded))[: len(part)])
        return np.concatenate(outputs)

    def __call__(self, params) -> dict[str, float]:
        images, labels, captions = self.data["image"], self.data["label"], [str(c) for c in self.data["caption"]]
        image_emb = self._map(self._embed_images, params, images)
        text_emb = self._map(self._embed_texts, params, self.data["tokens"])
        results = {}
        if self.num_classes and (labels >= 0).all():
            prompt_emb = self._map(self._embed_texts, params, self.prompt_tokens)
            logit_scale = float(self.model.apply({"params": params}, method=self.model.clamped_logit_scale))
            scores = zeroshot.class_log_probs(image_emb, prompt_emb, self.prompts_per_class, logit_scale)
            results["zeroshot_top1"] = zeroshot.topk_accuracy(scores, labels, 1)
            results["zeroshot_top5"] = zeroshot.topk_accuracy(scores, labels, 5)
        results.update(retrieval.recall_at_k(image_emb, text_emb, captions))
        self.last_predictions = []
        if self.model.has_decoder:
            predictions = self.tokenizer.decode(self._map(self._caption, params, images))
            results.update(captioning.caption_metrics(predictions, captions))
            self.last_predictions = list(zip(captions, predictions))
        return results

    def chance(self) -> dict[str, float]:
        """What a model that learned nothing scores, for the results table."""
        chance = {"zeroshot_top1": 1 / self.num_classes, "zeroshot_top5": 5 / self.num_classes} if self.num_classes else {}
        return {
            **chance,
            "image_to_text_r@1": retrieval.chance_recall_at_1(self.data["caption"]),
            "text_to_image_r@1": retrieval.chance_recall_at_1(self.data["caption"]),
        }
