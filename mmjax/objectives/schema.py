"""config.json written before the objective had named terms, read in today's schema.

Before: objective = {contrastive: "clip" | "siglip", contrastive_weight, caption_weight, impl,
block_size} and no `accumulate`. Now: objective = {name: {type, weight, options}} and
accumulate = {steps, mode}. Old records map to the terms their run trained with (the caption
term only on a model with a decoder, as the shipped CLIP/SigLIP configs have none), and to no
accumulation, so tools that rebuild a model from a workdir, and resume checks, read either.
"""
from __future__ import annotations

from mmjax import models
from mmjax.objectives import accumulate


def upgrade(record: dict) -> dict:
    """The record (config.json's dict) in today's schema; a current one is returned as it is."""
    record = dict(record)
    old = record.get("objective", {})
    if isinstance(old.get("contrastive"), str):  # the flat schema: contrastive was the loss's kind
        terms = {"contrastive": dict(type=old["contrastive"], weight=old["contrastive_weight"],
                                     options=dict(impl=old["impl"], block_size=old["block_size"]))}
        model_class = models.MODEL_CLASSES.get(record.get("model", {}).get("name"))
        if old["caption_weight"] or (model_class is not None and model_class.has_decoder):
            terms["caption"] = dict(type="captioning", weight=old["caption_weight"], options={})
        record["objective"] = terms
    record.setdefault("accumulate", dict(accumulate.DEFAULTS))
    return record
