"""Gradient accumulation: one optimizer step's gradient from config.accumulate.steps micro-batches.

    config.accumulate = {steps: 1, mode: "grads" | "gradcache"}     # steps 1: off

The global batch B is cut into `steps` micro-batches of B/steps, each split over every batch
shard of the mesh (split/merge), so activations shrink by `steps` and no device idles.

  "grads"      per-example terms only (captioning): the gradient is Σ_i share_i · ∇L_i over
               micro-batches i, share_i the micro-batch's part of the term's mean (its
               non-pad tokens for captioning), so it equals the global batch's gradient.
               A batch-coupled term (contrastive) has no such split: the mode refuses it.
  "gradcache"  GradCache (Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch
               Size under Memory Limited Setup", arXiv:2101.06983, "Gradient Cache Technique"):
               the loss depends on the global batch only through the representations f(s)
               (embeddings, and the logit scalars), so the chain rule splits over micro-batches:
                 ∂L/∂Θ = Σ_i Σ_{s ∈ micro-batch i} (∂L/∂f(s)) · (∂f(s)/∂Θ)
               1. graph-less forward: embed every micro-batch, no gradient, no activations kept;
               2. representation gradient computation and caching: the batch-coupled terms
                  on the global batch's representations, and their gradient u = ∂L/∂f;
               3. sub-batch gradient accumulation: per micro-batch, forward again and
                  back-propagate the cached u_i (the gradient of ⟨f_i, u_i⟩: f_i's VJP of u_i),
                  adding the per-example terms (weighted by share_i) in the same pass.
               A scalar representation (the logit scale, bias) is the same in every
               micro-batch: each pass back-propagates 1/steps of its cached gradient.
               With no batch-coupled term it is "grads".
Each micro-batch i draws its training randomness (FLIP patch dropout) from rng_i in both
passes, so the representations cached are the ones differentiated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax.objectives import objective as objective_lib
from mmjax.parallel import sharding

MODES = ("grads", "gradcache")
DEFAULTS = dict(steps=1, mode="gradcache")


def split(x, steps: int, shards: int):
    """[B, ...] -> [steps, B/steps, ...]: micro-batch i takes the i-th slice of every shard's
    rows, so it stays spread over all `shards` batch shards (a local reshape, no traffic)."""
    rest = x.shape[1:]
    x = x.reshape(shards, steps, x.shape[0] // (shards * steps), *rest).swapaxes(0, 1)
    return x.reshape(steps, -1, *rest)


def merge(x, shards: int):
    """split's inverse: [steps, B/steps, ...] -> [B, ...] in the global batch's order."""
    steps, rest = x.shape[0], x.shape[2:]
    x = x.reshape(steps, shards, -1, *rest).swapaxes(0, 1)
    return x.reshape(-1, *rest)


def gradients(forward, params, batch, rng, objective: objective_lib.Objective, steps: int, mesh):
    """-> (loss, logs, grads) of objective over `batch` in `steps` micro-batches (the module docstring).

    forward(params, micro_batch, rng) -> the model's outputs; batch {"image", "tokens", "targets"}.
    logs: "<term>_loss" for each term and the model's scalar outputs (logit_scale, logit_bias)."""
    shards = 1 if mesh is None else sharding.num_batch_shards(mesh)
    constrain = _constrainer(mesh)
    micro = constrain(jax.tree.map(lambda x: split(x, steps, shards), batch), P(None, sharding.BATCH_AXES))
    rngs = jax.random.split(rng, steps)

    coupled_loss, coupled_logs, cached = 0.0, {}, {}
    if objective.coupled:
        reads = sorted({name for t in objective.coupled for name in t.type.reads})

        def embed(_, xs):  # 1. representations, no gradient
            micro_batch, micro_rng = xs
            outputs = forward(params, constrain(micro_batch, P(sharding.BATCH_AXES)), micro_rng)
            return None, {k: outputs[k] for k in reads if k in outputs}

        _, reps = jax.lax.scan(embed, None, (micro, rngs))
        full = {k: v[0] if v.ndim == 1 else merge(v, shards) for k, v in reps.items()}
        # 2. the batch-coupled terms on the global batch, and their gradient w.r.t. the representations
        coupled = lambda r: objective_lib.weighted_sum(objective.coupled, r, batch)
        (coupled_loss, coupled_logs), grads_of_reps = jax.value_and_grad(coupled, has_aux=True)(full)
        cached = {k: jnp.broadcast_to(g / steps, (steps,)) if g.ndim == 0
                  else constrain(split(g, steps, shards), P(None, sharding.BATCH_AXES))
                  for k, g in grads_of_reps.items()}

    totals = {t.name: t.mean_over(batch) for t in objective.per_example}

    def backward(grads, xs):  # 3. per micro-batch: forward again, back-propagate u_i and the per-example terms
        micro_batch, micro_rng, u = xs
        micro_batch = constrain(micro_batch, P(sharding.BATCH_AXES))
        shares = {t.name: t.mean_over(micro_batch) / totals[t.name] for t in objective.per_example}

        def surrogate(p):
            outputs = forward(p, micro_batch, micro_rng)
            loss, logs = objective_lib.weighted_sum(objective.per_example, outputs, micro_batch, shares)
            cached_dot = sum(jnp.vdot(outputs[k], u[k]) for k in u)
            return cached_dot + loss, (loss, logs, objective_lib.scalar_outputs(outputs))

        g, aux = jax.grad(surrogate, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, g), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, logs, scalars) = jax.lax.scan(backward, zeros, (micro, rngs, cached))
    logs = {**coupled_logs, **jax.tree.map(lambda v: jnp.sum(v, axis=0), logs),
            **jax.tree.map(lambda v: v[0], scalars)}
    return coupled_loss + jnp.sum(losses), logs, grads


def _constrainer(mesh):
    """(tree, spec) -> the tree laid out as spec over `mesh` (nothing without a mesh)."""
    if mesh is None:
        return lambda tree, spec: tree
    return lambda tree, spec: jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, spec))
