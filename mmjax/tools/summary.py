"""A config's model at a glance: parameters per tower, FLOPs and activation memory per example.

    python -m mmjax.tools.summary --config=configs/coca.py:base [--json]

Nothing is allocated: shapes come from `jax.eval_shape`, so the 2.1B CoCa takes seconds.
  parameters     per tower (the model's `towers`) and in total.
  FLOPs          analytic (mmjax.tools.flops): 3 × forward matmul FLOPs of one training
                 example, plus its share of the B×B contrastive logits at config.batch_size.
  activations    bytes the backward pass keeps per example: the residuals of `jax.vjp` of
                 the training loss (under the config's remat policy, scan, dtype, patch
                 dropout and locking), counted at batch 2 minus batch 1 so that what does
                 not grow with the batch (parameters, their bf16 copies) cancels. XLA may
                 fuse or rematerialise further, and needs transient buffers on top.
With --json the last line printed is one JSON object (params_total, params_<tower>, ...).
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging

from mmjax.main import parse_flags  # also defines --config
from mmjax.models import build_model, model_vocab_size, towers
from mmjax.objectives import objective as objective_lib
from mmjax.tools import flops

_JSON = flags.DEFINE_bool("json", False, "End with one JSON object on the last line.")


def abstract_inputs(config, batch: int):
    d = config.data
    images = jax.ShapeDtypeStruct((batch, d.image_size, d.image_size, 3), jnp.uint8)
    tokens = jax.ShapeDtypeStruct((batch, d.text_len - 1), jnp.int32)  # the model reads all but the last
    return images, tokens


def abstract_params(model, config):
    images, tokens = abstract_inputs(config, 1)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"])


def params_per_tower(model, params) -> dict[str, int]:
    counts = {tower: 0 for tower in model.towers}
    for name, sub in params.items():
        counts[towers.tower_of(model, name)] += sum(x.size for x in jax.tree.leaves(sub))
    return counts


def activation_bytes_per_example(model, config, params) -> int:
    """Bytes of the training loss's VJP residuals that grow with the batch, per example."""
    # One device, no mesh; the B×B logits are negligible at B ≤ 2.
    objective = objective_lib.build(objective_lib.with_options(config.objective, impl="dense"), mesh=None, pad_id=0)
    locked = towers.locked_towers(config.model)
    mask = towers.locked_mask(model, locked)(params) if locked else None

    def loss(params, images, tokens, rng):
        if mask is not None:
            params = towers.stop_locked_gradients(params, mask)
        outputs = model.apply({"params": params}, images, tokens, train=True, rngs={"dropout": rng})
        batch = {"image": images, "tokens": tokens, "targets": tokens}  # targets: any tokens of the right shape
        return objective_lib.total_loss(objective, outputs, batch)[0]

    def residual_bytes(batch: int) -> int:
        images, tokens = abstract_inputs(config, batch)
        vjp_fn = jax.eval_shape(
            lambda p, i, t, r: jax.vjp(lambda q: loss(q, i, t, r), p)[1], params, images, tokens, jax.random.key(0)
        )
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))

    return residual_bytes(2) - residual_bytes(1)


def summarize(config) -> dict:
    vocab = model_vocab_size(config.model, config.data.vocab_size)
    model = build_model(config.model, vocab, contrastive=objective_lib.contrastive_type(config.objective))
    params = abstract_params(model, config)
    per_tower = params_per_tower(model, params)
    forward = flops.forward_flops(config, vocab, train=True)
    contrastive = flops.contrastive_forward_flops(config.batch_size, config.model.embed_dim) // config.batch_size
    return {
        "model": config.model.name,
        "params_total": sum(per_tower.values()),
        **{f"params_{tower}": n for tower, n in per_tower.items()},
        "forward_flops_per_example": forward,
        "train_flops_per_example": 3 * (forward + contrastive),
        "activation_bytes_per_example": activation_bytes_per_example(model, config, params),
        "image_size": config.data.image_size,
        "patch_size": config.model.vision.patch_size,
        "context_length": config.data.text_len - 1,
        "vocab_size": vocab,
        "batch_size": config.batch_size,
        "dtype": config.model.dtype,
        "remat": config.model.remat,
    }


def millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 10_000 else f"{n:,}"


def tower_counts(s: dict) -> dict[str, int]:
    return {k[len("params_") :]: v for k, v in s.items() if k.startswith("params_") and k != "params_total"}


def report(name: str, s: dict) -> str:
    towers_line = "  ".join(f"{tower} {millions(n)}" for tower, n in tower_counts(s).items())
    return "\n".join(
        [
            f"{name}  ({s['model']}, {s['dtype']} activations, remat={s['remat']})",
            f"  inputs       {s['image_size']} px images, patch {s['patch_size']}; "
            f"text context {s['context_length']}, vocabulary {s['vocab_size']:,}",
            f"  parameters   {towers_line}  total {millions(s['params_total'])}",
            f"  FLOPs        {s['train_flops_per_example'] / 1e9:,.1f} GFLOP per training example "
            f"(forward {s['forward_flops_per_example'] / 1e9:,.1f}; batch {s['batch_size']:,})",
            f"  activations  {s['activation_bytes_per_example'] / 2**20:,.1f} MiB per example saved for the backward pass",
        ]
    )


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # the report only, as mmjax.main keeps its console
        logging.set_verbosity(logging.WARNING)
    config_arg = flags.FLAGS["config"].config_filename
    summary = summarize(flags.FLAGS.config)
    print(report(config_arg, summary))
    if _JSON.value:
        print(json.dumps({"config": config_arg, **summary}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
