"""The one trainer: `run(config, workdir)` trains whatever the config describes.

config -> mesh -> tokenizer, model, optimizer -> sharded state (restored if a checkpoint
exists) -> grain batches -> jitted step -> metrics, evaluation, checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmjax import checkpoint, metrics, optim
from mmjax.data import pipeline, skips, tokenizer as tokenizer_lib
from mmjax.errors import ConfigError, RunStopped, UserError
from mmjax.evals.evaluator import Evaluator
from mmjax.models import build_model, towers
from mmjax.objectives import multimodal
from mmjax.parallel import sharding


def prepare_workdir(workdir: str) -> str:
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror}); pass --workdir=<a writable directory>")
    return workdir


def check_config(config, mesh) -> None:
    shards = sharding.num_batch_shards(mesh)
    if config.batch_size % shards:
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by the {shards} batch shards of the mesh "
            f"{dict(mesh.shape)}; set --config.batch_size to a multiple of {shards}"
        )
    for key in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {config[key]}; set --config.{key}=<positive int>")


def build_state(model, tx, config, mesh, rules):
    """Initialise the train state directly into its shardings; returns (state, shardings)."""
    d = config.data
    images = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.uint8)
    tokens = jnp.zeros((1, d.text_len - 1), jnp.int32)

    def init(rng):
        params = model.init(rng, images, tokens)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    shardings = sharding.logical_to_sharding(abstract, mesh, rules)
    state = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.key(config.seed))
    return state, shardings


def locked_mask(model, model_cfg):
    """LiT: fn(params) -> True for the locked towers' parameters, or None if nothing is locked."""
    locked = towers.locked_towers(model_cfg)
    return towers.locked_mask(model, locked) if locked else None


def make_train_step(model, tx, schedule, config, mesh, pad_id):
    locked = locked_mask(model, config.model)

    def train_step(state, batch):
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        # Training-only randomness (FLIP patch dropout) from (seed, step): a resumed run
        # draws exactly what the uninterrupted one did.
        dropout_rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])

        def loss_fn(params):
            if locked is not None:
                params = towers.stop_locked_gradients(params, locked(params))
            outputs = model.apply(
                {"params": params}, batch["image"], inputs, train=True, rngs={"dropout": dropout_rng}
            )
            loss, components = multimodal.total_loss(outputs, targets, config.objective, pad_id, mesh)
            scalars = {k: outputs[k] for k in ("logit_scale", "logit_bias") if k in outputs}
            return loss, {**components, **scalars}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        logs = {"loss": loss, **aux, "lr": schedule(state["step"]), "grad_norm": optax.tree.norm(grads)}
        return new_state, logs

    return train_step


class _Preemption:
    """SIGTERM (a preempted VM, `kill`) asks the loop to checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. run() called from a worker): no handler
            pass

    def _handle(self, signum, frame):
        self.requested = True


@dataclasses.dataclass(frozen=True)
class Components:
    """What a config builds before any array exists; shared by run(), benchmarks and tests."""

    mesh: jax.sharding.Mesh
    rules: tuple
    tokenizer: tokenizer_lib.Tokenizer
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    def train_step(self, config):
        return make_train_step(self.model, self.tx, self.schedule, config, self.mesh, self.tokenizer.pad_id)


def build_components(config, tokenizer_path: str, devices=None) -> Components:
    mesh = sharding.make_mesh(config.mesh, devices)
    check_config(config, mesh)
    tok = pipeline.make_tokenizer(config.data, tokenizer_path)
    model = build_model(config.model, tok.vocab_size, tok.pad_id, contrastive=config.objective.contrastive)
    return Components(
        mesh=mesh,
        rules=sharding.rules_from_config(config.mesh),
        tokenizer=tok,
        model=model,
        tx=optim.make_optimizer(config.optimizer, config.total_steps, locked_mask(model, config.model)),
        schedule=optim.learning_rate_schedule(config.optimizer, config.total_steps),
    )


def run(config, workdir: str) -> dict[str, float]:
    """Train (resuming from `workdir` if it holds a checkpoint); returns the final evaluation."""
    workdir = prepare_workdir(workdir)
    if config.data.eval.startswith("shapes") and not config.data.train.startswith("shapes"):
        print(f"note: training on {config.data.train} but evaluating on the embedded {config.data.eval}; "
              "point --config.data.eval at your held-out split", flush=True)
    parts = build_components(config, os.path.join(workdir, "tokenizer.model"))
    mesh, model, tok = parts.mesh, parts.model, parts.tokenizer

    with jax.set_mesh(mesh), nn.logical_axis_rules(parts.rules):
        state, state_shardings = build_state(model, parts.tx, config, mesh, parts.rules)
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
        data_iter = pipeline.train_iterator(config.data, tok, config.batch_size, config.seed)
        data_fingerprint = pipeline.fingerprint(config.data, config.batch_size, config.seed)
        start_step = ckpt.latest_step() or 0
        if start_step:
            state, data_state = ckpt.restore(start_step, state)
            pipeline.restore_data_state(data_iter, data_state, data_fingerprint)
            print(f"Resumed from step {start_step} in {workdir}", flush=True)
        batch_shardings = {"image": sharding.batch_sharding(mesh), "tokens": sharding.batch_sharding(mesh)}
        train_step = jax.jit(
            parts.train_step(config),
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        evaluator = Evaluator(model, tok, config.data, config.eval, mesh, state_shardings["params"])
        writer = metrics.MetricsWriter(workdir, start_step)
        data = _Data(data_iter, data_fingerprint, skips.SkipMonitor(config.data.max_bad_fraction))
        try:
            results = _loop(config, state, start_step, train_step, data, batch_shardings, ckpt, evaluator, writer)
        finally:  # also when bad data stops the run: pending saves land, workers exit
            data_iter.close()
            ckpt.close()
        writer.plot()
        writer.close()
    if results is not None:
        print_results(results, evaluator.chance(), evaluator.last_predictions)
    return results


@dataclasses.dataclass
class _Data:
    iterator: object
    fingerprint: dict
    skips: skips.SkipMonitor


def _loop(config, state, step, train_step, data, batch_shardings, ckpt, evaluator, writer):
    preemption = _Preemption()
    window_start, window_step = None, step
    # A finished run re-launched: nothing to train, report the final checkpoint again.
    results = evaluator(state["params"]) if step >= config.total_steps else None
    while step < config.total_steps:
        batch = next(data.iterator)
        data.skips.update(batch)
        batch = pipeline.to_global({k: batch[k] for k in batch_shardings}, batch_shardings["image"])
        state, logs = train_step(state, batch)
        step += 1
        if window_start is None:  # the first step compiles: time from after it
            jax.block_until_ready(logs)
            window_start, window_step = time.perf_counter(), step
        if step % config.log_every == 0 or step == config.total_steps:
            logs = jax.device_get(logs)
            elapsed = time.perf_counter() - window_start
            rate = (step - window_step) / elapsed if step > window_step else float("nan")
            if rate == rate:  # unknown right after compiling or evaluating
                logs["examples_per_sec"] = rate * config.batch_size
            logs.update(data.skips.metrics())
            skipped_note = data.skips.end_window()  # stops the run when too much data is bad
            writer.write(step, logs)
            eta = (config.total_steps - step) / rate if rate == rate and rate > 0 else float("nan")
            print(
                f"step {step:6d}/{config.total_steps}  loss {logs['loss']:.4f}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k.endswith("_loss"))
                + f"  {rate * config.batch_size:.0f} ex/s  ETA {eta:.0f}s"
                + (f"  [{skipped_note}]" if skipped_note else ""),
                flush=True,
            )
            window_start, window_step = time.perf_counter(), step
        final = step == config.total_steps
        if step % config.eval_every == 0 or final:
            results = evaluator(state["params"])
            writer.write(step, {f"eval/{k}": v for k, v in results.items()})
            print(f"eval @ {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in results.items()), flush=True)
            window_start, window_step = time.perf_counter(), step
        preempted = preemption.requested or ckpt.reached_preemption(step)
        if step % config.checkpoint_every == 0 or final or preempted:
            ckpt.save(step, state, pipeline.data_state(data.iterator, data.fingerprint))
        if preempted:
            print(f"Preempted: saved step {step}; re-run the same command to resume.", flush=True)
            return None
    return results


def print_results(results: dict, chance: dict, predictions) -> None:
    print("\nFinal held-out results")
    print(f"  {'metric':<24}{'value':>8}{'chance':>9}")
    for key, value in results.items():
        ch = f"{chance[key]:.3f}" if key in chance else "-"
        print(f"  {key:<24}{value:>8.3f}{ch:>9}")
    if predictions:  # a captioner's (CoCa); two-tower models make none
        print("\nSample captions (reference -> greedy):")
    for ref, pred in predictions[:5]:
        print(f"  {ref!r:<32} -> {pred!r}")
