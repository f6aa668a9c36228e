"""The training objective as configured: Σ weight · loss over config.objective's named terms.

    config.objective.contrastive = term("clip", 1.0, impl="blockwise", block_size=128)  # λ_con · L_con
    config.objective.caption = term("captioning", 2.0)                                 # λ_cap · L_cap

CoCa (eq. 4): λ_con = 1, λ_cap = 2. CLIP/SigLIP: the contrastive term alone. A term with
weight 0 is not computed (nor logged). Term types: mmjax.objectives.registry.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from mmjax.objectives import registry

TERM_FIELDS = ("type", "weight", "options")
DEFAULT_LOGITS = "clip"  # the logit scalars of a model whose objective has no contrastive term


def term(kind: str, weight: float, **options) -> ml_collections.ConfigDict:
    """A config.objective entry with every option of its type present (so --config.objective.X.options.Y works)."""
    defaults = registry.TYPES[kind].options
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} options {unknown}; valid: {sorted(defaults)}")
    return ml_collections.ConfigDict(dict(type=kind, weight=float(weight), options={**defaults, **options}))


def contrastive_type(objective_cfg) -> str:
    """The loss whose logit scalars the model learns ("clip" | "siglip"): the type of the term that
    trains them (whatever its weight), else DEFAULT_LOGITS. The model's inits, predict's sigmoid
    and the resume check all read it here."""
    kinds = [registry.TYPES[t.type].logits for t in objective_cfg.values()
             if t.type in registry.TYPES and registry.TYPES[t.type].logits]
    return kinds[0] if kinds else DEFAULT_LOGITS


def with_options(objective_cfg, **options):
    """A copy in which every term that has these options takes these values (e.g. impl="dense"
    for a loss on one device without a mesh)."""
    objective_cfg = objective_cfg.copy_and_resolve_references()
    for t in objective_cfg.values():
        t.options.update({k: v for k, v in options.items() if k in t.options})
    return objective_cfg


@dataclasses.dataclass(frozen=True)
class BoundTerm:
    """One configured term with a positive weight, ready to call."""

    name: str
    weight: float
    type: registry.TermType
    context: registry.Context

    def __call__(self, outputs, batch):
        return self.type.fn(outputs, batch, self.context)

    def mean_over(self, batch):
        return self.type.mean_over(batch, self.context)


@dataclasses.dataclass(frozen=True)
class Objective:
    terms: tuple[BoundTerm, ...]  # batch-coupled first, then per-example; by name within each

    @property
    def coupled(self) -> tuple[BoundTerm, ...]:
        return tuple(t for t in self.terms if t.type.batch_coupled)

    @property
    def per_example(self) -> tuple[BoundTerm, ...]:
        return tuple(t for t in self.terms if not t.type.batch_coupled)


def build(objective_cfg, *, mesh, pad_id: int) -> Objective:
    bound = [
        BoundTerm(name, float(t.weight), registry.TYPES[t.type],
                  registry.Context(mesh, pad_id, {**registry.TYPES[t.type].options, **t.options}))
        for name, t in objective_cfg.items() if t.weight
    ]
    return Objective(tuple(sorted(bound, key=lambda t: (not t.type.batch_coupled, t.name))))


def weighted_sum(terms, outputs, batch, shares=None):
    """-> (Σ weight · loss, {"<name>_loss": loss, "<name>_<metric>": value}). `shares` (per term
    name) scale each term's loss and metrics to a micro-batch's part of the global batch's mean,
    so that summing a micro-batch's results over the micro-batches gives the global batch's."""
    total, logs = 0.0, {}
    for t in terms:
        loss, metrics = t(outputs, batch)
        term_logs = {f"{t.name}_loss": loss, **{f"{t.name}_{k}": v for k, v in metrics.items()}}
        if shares is not None:
            loss, term_logs = shares[t.name] * loss, {k: shares[t.name] * v for k, v in term_logs.items()}
        total = total + t.weight * loss
        logs.update(term_logs)
    return total, logs


def scalar_outputs(outputs) -> dict:
    """The model's scalar outputs (logit_scale, logit_bias): logged beside the losses."""
    return {k: v for k, v in outputs.items() if jnp.ndim(v) == 0}


def total_loss(objective: Objective, outputs, batch):
    """-> (Σ weight · loss, {"<name>_loss": loss, ...}) on one (global) batch."""
    return weighted_sum(objective.terms, outputs, batch)
