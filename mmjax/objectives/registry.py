"""Objective term types: config.objective.<name>.type -> how the term is computed.

    config.objective.<name> = objective.term(TYPE, weight, **options)   # {type, weight, options}

The trainer minimises Σ weight · loss over the terms with a positive weight and logs each
as `<name>_loss`. A term type is a function `(outputs, batch, context) -> (loss, metrics)`
(mmjax.objectives.terms) and what the step needs to know about it:

  batch_coupled  its loss couples the examples of the global batch (a contrastive loss's
                 negatives): gradient accumulation must use GradCache for it, which caches
                 the model outputs it `reads` (embeddings, logit scalars) for the global batch.
                 Otherwise it is per-example: a mean, over `mean_over(batch, context)`
                 units (examples, tokens), that micro-batches split exactly.
  options        its options and their defaults; option_rules check them (mmjax.validation).
  needs_decoder  it reads the caption decoder's outputs (CoCa).
  logits         the learned logit scalars it trains, a key of mmjax.models.PAPER_LOGIT_INITS
                 (the model gets that loss's scale/bias parameters and inits), or None.

A new objective is one `register(...)` call; nothing in the trainer changes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from mmjax import validation
from mmjax.objectives import contrastive, terms


@dataclasses.dataclass(frozen=True)
class Context:
    mesh: Any  # jax.sharding.Mesh, or None on one device
    pad_id: int
    options: dict


@dataclasses.dataclass(frozen=True)
class TermType:
    fn: Callable  # (outputs, batch, Context) -> (loss, {metric: value})
    batch_coupled: bool
    reads: tuple[str, ...] = ()  # batch-coupled terms: the model outputs the loss reads
    options: dict = dataclasses.field(default_factory=dict)
    option_rules: dict = dataclasses.field(default_factory=dict)
    needs_decoder: bool = False
    logits: str | None = None
    mean_over: Callable | None = None  # per-example terms: (batch, Context) -> the units its mean runs over


def examples(batch, context):
    """The default per-example normaliser: the number of examples."""
    return float(batch["image"].shape[0])


TYPES: dict[str, TermType] = {}


def register(name: str, term_type: TermType) -> None:
    if name in TYPES:
        raise ValueError(f"objective term type {name!r} is already registered")
    if term_type.batch_coupled and not term_type.reads:
        raise ValueError(f"batch-coupled term type {name!r} must say which model outputs it reads")
    if not term_type.batch_coupled and term_type.mean_over is None:
        term_type = dataclasses.replace(term_type, mean_over=examples)
    if set(term_type.option_rules) != set(term_type.options):
        raise ValueError(f"term type {name!r}: option_rules {sorted(term_type.option_rules)} must check exactly "
                         f"its options {sorted(term_type.options)}")
    TYPES[name] = term_type


_CONTRASTIVE_OPTIONS = dict(impl="blockwise", block_size=128)
_CONTRASTIVE_RULES = dict(impl=validation.one_of(contrastive.IMPLS), block_size=validation.POSITIVE)
_CONTRASTIVE_READS = ("image_embedding", "text_embedding", "logit_scale", "logit_bias")
for _kind in contrastive.KINDS:
    register(_kind, TermType(terms.contrastive_term(_kind), batch_coupled=True, reads=_CONTRASTIVE_READS,
                             options=_CONTRASTIVE_OPTIONS, option_rules=_CONTRASTIVE_RULES, logits=_kind))
register("captioning", TermType(terms.captioning_term, batch_coupled=False, needs_decoder=True,
                                mean_over=terms.caption_tokens))
