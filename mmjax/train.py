"""The one trainer: `run(config, workdir)` trains whatever the config describes.

config -> mesh -> tokenizer, model, optimizer -> sharded state (restored if a checkpoint
exists) -> grain batches -> jitted step -> metrics, evaluation, checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from mmjax import (checkpoint, compilation_cache, epath_io, evals, inference, init_from, metrics, nonfinite, optim,
                   profiling, remat_auto, run_record, throughput, train_step, validation)
from mmjax.data import pipeline, skips, tokenizer as tokenizer_lib
from mmjax.errors import ConfigError, RunStopped, UserError
from mmjax.evals.predictor import Predictor
from mmjax.models import layers
from mmjax.parallel import sharding
from mmjax.tools import flops


def prepare_workdir(workdir: str) -> str:
    workdir = epath_io.absolute(workdir)
    epath_io.check_filesystem(workdir)
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        probe = epath.Path(workdir) / f".write_test.{jax.process_index()}"  # processes may share the workdir
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {workdir} is not writable ({e.strerror or e}); pass --workdir=<a writable directory>")
    return workdir


def check_config(config, mesh) -> None:
    """What validation.validate cannot know without the devices."""
    shards = sharding.num_batch_shards(mesh)
    if config.batch_size % shards:
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by the {shards} batch shards of the mesh "
            f"{dict(mesh.shape)}; set --config.batch_size to a multiple of {shards}"
        )
    train_step.check_accumulation(config, mesh)


def _init_fn(model, tx, config):
    d = config.data
    images = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.uint8)
    tokens = jnp.zeros((1, d.text_len - 1), jnp.int32)

    def init(rng):
        params = model.init(rng, images, tokens)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return init


def _sharded_init(model, tx, config, mesh, rules):
    """-> (jitted rng -> train state, laid out as the logical rules say; its shardings)."""
    init = _init_fn(model, tx, config)
    boxed = jax.eval_shape(init, jax.random.key(config.seed))
    shardings = sharding.logical_to_sharding(boxed, mesh, rules)
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings), shardings


def abstract_state(model, tx, config, mesh, rules):
    """The train state's shapes, dtypes and shardings, with no array allocated (a restore
    target): -> (tree of ShapeDtypeStruct carrying their shardings, tree of shardings)."""
    init, shardings = _sharded_init(model, tx, config, mesh, rules)
    return jax.eval_shape(init, jax.random.key(config.seed)), shardings


def build_state(model, tx, config, mesh, rules):
    """Initialise the train state directly into its shardings; returns (state, shardings)."""
    init, shardings = _sharded_init(model, tx, config, mesh, rules)
    return init(jax.random.key(config.seed)), shardings


class _Interrupts:
    """SIGTERM (a preempted VM, `kill`) and a first Ctrl-C ask the loop to checkpoint the
    current step and exit cleanly. A second Ctrl-C kills the process at once (the OS
    default for SIGINT, which works even inside a long compile), saving nothing more.

    Under jax.distributed the processes must agree on the step to save, or the collective
    save hangs: SIGTERM is left to jax's preemption notifier, which tells every process, and
    `ckpt.reached_preemption(step)` turns true at the same step on all of them. A first
    Ctrl-C takes the same road by sending this process a SIGTERM."""

    def __init__(self, collective: bool):
        self.collective = collective
        self.requested = None  # "SIGTERM" or "SIGINT" once asked (collective: only ever "SIGINT")
        self._previous = {}
        for sig in (signal.SIGINT,) if collective else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. run() called from a worker): no handler
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("\nCtrl-C: saving a checkpoint after this step; press Ctrl-C again to abort without saving",
                  flush=True)
        self.requested = signal.Signals(signum).name
        if self.collective:
            os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption notifier: every process saves one step

    def stop_now(self, ckpt, step: int) -> str | None:
        """Why the loop stops after `step` ("SIGINT", "SIGTERM" or "preemption"), or None.
        Collective: the same answer on every process (jax's preemption sync point)."""
        if self.collective:
            return (self.requested or "preemption") if ckpt.reached_preemption(step) else None
        return self.requested or (ckpt.reached_preemption(step) and "preemption") or None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        return train_step.make_train_step(self.model, self.tx, self.schedule, config, self.mesh, self.tokenizer.pad_id)


def build_components(config, tokenizer_path: str, devices=None) -> Components:
    mesh = sharding.make_mesh(config.mesh, devices)
    check_config(config, mesh)
    tok = pipeline.make_tokenizer(config.data, tokenizer_path)
    model = inference.model_for(config, tok)
    return Components(
        mesh=mesh,
        rules=sharding.rules_from_config(config.mesh),
        tokenizer=tok,
        model=model,
        tx=optim.make_optimizer(config.optimizer, config.total_steps, train_step.locked_mask(model, config.model)),
        schedule=optim.learning_rate_schedule(config.optimizer, config.total_steps),
    )


def run(config, workdir: str) -> dict[str, float] | None:
    """Train (resuming from `workdir` if it holds a checkpoint); returns the final evaluation
    (None when interrupted)."""
    validation.validate(config)  # before any file is written or array allocated
    with _console_on_primary_only():
        return _run_checked(config, workdir)


@contextlib.contextmanager
def _console_on_primary_only():
    """Progress (stdout) from process 0 only; every process keeps stderr for its own warnings
    and errors. Under one process, nothing changes."""
    if jax.process_index() == 0:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _run_checked(config, workdir: str) -> dict[str, float] | None:
    mesh = sharding.make_mesh(config.mesh)
    check_config(config, mesh)
    pipeline.check_sources(config.data)
    evals.check_sources(config)
    epath_io.check_filesystem(workdir)  # before the first look into it
    run_record.refuse_imported(workdir)
    init_from.check_source(config.init, workdir)
    workdir = prepare_workdir(workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
    opened = []  # the data iterator, once there is one
    try:
        with compilation_cache.use(_cache_setting(config, mesh), workdir) as cache_dir:
            results = _run(config, workdir, mesh, ckpt, opened, cache_dir)
    except BaseException as e:
        # Shut the data workers and async checkpoint threads down first, so their own errors
        # do not bury this one. A stop we chose (bad data, divergence, a failed save) lets
        # pending saves land; an unexpected error abandons them.
        _shut_down(opened, ckpt, keep_pending_saves=isinstance(e, UserError), quiet=True)
        raise
    _shut_down(opened, ckpt, keep_pending_saves=True, quiet=False)
    return results


def _cache_setting(config, mesh) -> str:
    """config.compilation_cache, or "off" (with a note) where the devices cannot use it."""
    setting = config.get("compilation_cache", "user")
    if setting != "off" and (reason := compilation_cache.unsupported(mesh.devices.flat)):
        print(f"note: compilation cache off: {reason}", flush=True)
        return "off"
    return setting


def _run(config, workdir, mesh, ckpt, opened, cache_dir):
    saved_step = ckpt.latest_step()
    record = run_record.read(workdir)
    notes = run_record.check_resume(record, config, saved_step) if saved_step and record else []
    if saved_step and record is None:
        notes.append("this workdir has no config.json (an older mmjax wrote it): the config cannot be "
                     "checked against its checkpoint")
    print(f"workdir {workdir}: " + (f"checkpoint at step {saved_step}, resuming" if saved_step else "new run"),
          flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"devices: {_describe_devices(mesh)}", flush=True)
    if config.data.eval.startswith("shapes") and not config.data.train.startswith("shapes"):
        print(f"note: training on {config.data.train} but evaluating on the embedded {config.data.eval}; "
              "point --config.data.eval at your held-out split", flush=True)
    parts = build_components(config, os.path.join(workdir, "tokenizer.model"), mesh.devices.flat)
    model, tok = parts.model, parts.tokenizer

    with jax.set_mesh(mesh), nn.logical_axis_rules(parts.rules):
        shapes, state_shardings = abstract_state(model, parts.tx, config, mesh, parts.rules)
        print(f"model: {config.model.name}, {_count(shapes['params'])} parameters; "
              f"batch {config.batch_size}, {config.total_steps} steps", flush=True)
        speed = _log_window(config, mesh, tok)
        data_iter = pipeline.train_iterator(config.data, tok, config.batch_size, config.seed)
        opened.append(data_iter)
        data_fingerprint = pipeline.fingerprint(config.data, config.batch_size, config.seed)
        restored = ckpt.restore_latest(shapes) if saved_step else None
        if restored:
            start_step, state, data_state = restored
            resplit = pipeline.restore_data_state(data_iter, data_state, data_fingerprint)
            print(f"Resumed from step {start_step} in {workdir}" + _resharded(data_state.get("layout"), mesh), flush=True)
            if resplit:
                print(f"note: {resplit}", flush=True)
        else:
            start_step = 0
            state, _ = build_state(model, parts.tx, config, mesh, parts.rules)
            state["params"] = init_from.apply(config, state["params"], mesh.devices.flat)
        if jax.process_index() == 0:  # after the restore: a record never describes a checkpoint it cannot load
            run_record.write(workdir, config, tok)
        batch_shardings = {"image": sharding.batch_sharding(mesh), "tokens": sharding.batch_sharding(mesh)}
        def jit_step(remat: str):
            """The train step of the config's model under `remat` (model.remat=auto tries several)."""
            remat_model = model if remat == config.model.remat else inference.model_for(_with_remat(config, remat), tok)
            return jax.jit(
                train_step.make_train_step(remat_model, parts.tx, parts.schedule, config, mesh, tok.pad_id),
                in_shardings=(state_shardings, batch_shardings),
                out_shardings=(state_shardings, sharding.replicated(mesh)),
                donate_argnums=0,
            )

        compile_step = functools.partial(_compile, jit_step, config.model.remat, cache_dir=cache_dir,
                                         device=mesh.devices.flat[0])
        evaluator = _Evaluation(config, model, tok, mesh, state_shardings["params"], workdir)
        writer = metrics.MetricsWriter(workdir, start_step, primary=jax.process_index() == 0)
        data = _Data(data_iter, data_fingerprint, skips.SkipMonitor(config.data.max_bad_fraction), _layout(mesh))
        try:
            results = _loop(config, state, start_step, compile_step, data, batch_shardings, ckpt, evaluator, writer,
                            speed, workdir)
        finally:
            writer.plot()  # also when the run stopped itself: the curves show why
            writer.close()
    if results is not None:
        print_results(results, evals.chance(evaluator.scheduled), evals.samples(evaluator.scheduled))
    return results


class _Evaluation:
    """config.evals on the model being trained: the evaluators due at a step, run on the
    current parameters; pictures go to the workdir."""

    def __init__(self, config, model, tokenizer, mesh, param_shardings, workdir):
        self.scheduled = evals.build(config, model.has_decoder, log=lambda note: print(note, flush=True))
        self.predictor = Predictor(model, tokenizer, config.data.text_len, mesh, param_shardings,
                                   config.eval.batch_size)
        self.workdir = workdir if jax.process_index() == 0 else None  # pictures: one writer

    def due(self, step: int, final: bool) -> bool:
        return any(s.due(step, final) for s in self.scheduled)

    def __call__(self, params, step: int, final: bool) -> dict[str, float]:
        return evals.run(self.scheduled, self.predictor.bind(params), step, final, self.workdir)


def _shut_down(opened, ckpt, keep_pending_saves: bool, quiet: bool) -> None:
    """Close the data iterator and the checkpointer (pending saves land unless abandoned).
    `quiet`: an error is already on its way out, so errors from closing are dropped."""
    errors = []
    for close in [it.close for it in opened] + [lambda: ckpt.close(abandon=not keep_pending_saves)]:
        try:
            close()
        except Exception as e:
            errors.append(e)
    if errors and not quiet:
        raise errors[0]


def _describe_devices(mesh) -> str:
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return f"{mesh.devices.size} × {'/'.join(kinds)} ({jax.default_backend()}) in {_processes()}; mesh {_axes(mesh)}"


def _count(params) -> str:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@dataclasses.dataclass
class _Data:
    iterator: object
    fingerprint: dict
    skips: skips.SkipMonitor
    layout: str  # the devices the state is laid out on, saved beside it (_layout)


def _layout(mesh) -> str:
    return f"mesh {_axes(mesh)} in {_processes()}"


def _axes(mesh) -> str:
    return " × ".join(f"{name}={size}" for name, size in mesh.shape.items())


def _processes() -> str:
    n = jax.process_count()
    return f"{n} process{'es' if n > 1 else ''}"


def _resharded(saved_layout: str | None, mesh) -> str:
    """Where the restored state came from, when that differs from where it now lives: orbax
    reads each array straight into this mesh's shardings, whatever mesh wrote it."""
    now = _layout(mesh)
    if saved_layout is None or saved_layout == now:
        return ""
    return f", resharded: saved on {saved_layout}, restored onto {now}"


def _log_window(config, mesh, tokenizer) -> throughput.LogWindow:
    """Says what a step costs and what the chip can do; measures steps against both."""
    step_flops = flops.train_step_flops(config, tokenizer.vocab_size)
    kind = mesh.devices.flat[0].device_kind
    peak = throughput.peak_tflops(kind, config.get("peak_tflops"))
    print(f"train step: {step_flops / 1e9:.4g} GFLOP (analytic); "
          + (f"peak {peak:g} TFLOP/s per device ({kind})" if peak else
             f"no peak TFLOP/s known for {kind}: no MFU (set --config.peak_tflops)"), flush=True)
    return throughput.LogWindow(config.batch_size, step_flops, mesh.devices.size, peak)


def _with_remat(config, remat: str):
    config = config.copy_and_resolve_references()
    config.model.remat = remat
    return config


def _compile(jit_step, remat, state, batch, cache_dir, device):
    """Compile the step ahead of its first call, so the console can say how long it took,
    whether the persistent cache had it, and what it holds in memory. model.remat=auto:
    the least rematerialisation that fits the device (mmjax.remat_auto)."""
    print("compiling the train step...", flush=True)
    start = time.perf_counter()
    with compilation_cache.Watch() as cache:
        if remat == layers.REMAT_AUTO:
            remat, compiled, notes = remat_auto.choose(lambda r: jit_step(r).lower(state, batch).compile(),
                                                       remat_auto.device_memory(device))
            print(f"model.remat=auto chose {remat}: " + "; ".join(notes), flush=True)
        else:
            compiled = jit_step(remat).lower(state, batch).compile()
    seconds = time.perf_counter() - start
    if cache.hit:
        print(f"loaded from the compilation cache {cache_dir} in {seconds:.1f} s", flush=True)
    else:
        print(f"compiled in {seconds:.1f} s" + (f"; saved to the compilation cache {cache_dir}" if cache.written else ""),
              flush=True)
    memory = throughput.memory_per_device(compiled)
    if memory:
        print(f"memory per device: {throughput.describe_memory(memory)}", flush=True)
    return compiled


def _save(ckpt, step, state, data) -> None:
    """A checkpoint never holds non-finite numbers: the guard keeps them out of the state,
    and this check makes sure (e.g. finite updates that overflowed the parameters)."""
    if not bool(nonfinite.all_finite((state["params"], state["opt_state"]))):
        raise RunStopped(
            f"the parameters at step {step} are not finite; not saving them (the last checkpoint, step "
            f"{ckpt.latest_step() or 'none'}, is intact); lower --config.optimizer.learning_rate"
        )
    ckpt.save(step, state, {**pipeline.data_state(data.iterator, data.fingerprint), "layout": data.layout})


def _loop(config, state, step, compile_step, data, batch_shardings, ckpt, evaluator, writer, speed, workdir):
    trace = profiling.StepTrace(config.get("profile_steps", ""), workdir)
    try:
        with _Interrupts(collective=jax.distributed.is_initialized()) as interrupts:
            return _train(config, state, step, compile_step, data, batch_shardings, ckpt, evaluator, writer, speed,
                          interrupts, trace)
    finally:
        trace.stop()  # a run that ended or stopped inside the traced steps still leaves its trace


def _train(config, state, step, compile_step, data, batch_shardings, ckpt, evaluator, writer, speed, interrupts,
           trace):
    guard = nonfinite.NonFiniteMonitor(
        config.max_nonfinite_steps,
        f"lower --config.optimizer.learning_rate (now {config.optimizer.learning_rate:g})"
        + ("" if config.optimizer.grad_clip_norm else ", set --config.optimizer.grad_clip_norm=1")
        + " or check the data",
    )
    step_fn = None  # compiled at the first batch
    # A finished run re-launched: nothing to train, report the final checkpoint again.
    results = evaluator(state["params"], step, final=True) if step >= config.total_steps else None
    while step < config.total_steps:
        asked = time.perf_counter()
        batch = next(data.iterator)
        speed.add_data_wait(time.perf_counter() - asked)
        data.skips.update(batch)
        batch = pipeline.to_global({k: batch[k] for k in batch_shardings}, batch_shardings["image"])
        if step_fn is None:
            step_fn = compile_step(state, batch)
        trace.before(step + 1)
        state, logs = step_fn(state, batch)
        step += 1
        trace.after(step, logs)
        guard.push(step, logs["nonfinite"])
        ckpt.check_for_errors()  # a failed async save stops the run now, not at the next save
        if not speed.started:  # time from after the first step
            jax.block_until_ready(logs)
            speed.restart(step, time.perf_counter())
        if step % config.log_every == 0 or step == config.total_steps:
            guard.flush()
            logs = jax.device_get(logs)
            del logs["nonfinite"]
            rates = speed.measure(step, time.perf_counter())  # {} right after compiling or evaluating
            logs.update(rates)
            logs["train/skipped_nonfinite"] = guard.total
            logs.update(data.skips.metrics())
            skipped_note = data.skips.end_window()  # stops the run when too much data is bad
            notes = [n for n in (skipped_note, f"{guard.total} non-finite steps skipped" if guard.total else "") if n]
            writer.write(step, logs)
            pace = (f"  {throughput.describe(rates)}  ETA {(config.total_steps - step) * rates['step_seconds']:.0f}s"
                    if rates else "")
            print(
                f"step {step:6d}/{config.total_steps}  loss {logs['loss']:.4f}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k.endswith("_loss"))
                + pace
                + "".join(f"  [{n}]" for n in notes),
                flush=True,
            )
            speed.restart(step, time.perf_counter())
        final = step == config.total_steps
        if evaluator.due(step, final):
            results = evaluator(state["params"], step, final)
            writer.write(step, results)
            print(f"eval @ {step}: " + "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in results.items()),
                  flush=True)
            speed.restart(step, time.perf_counter())
        interrupted = interrupts.stop_now(ckpt, step)
        if step % config.checkpoint_every == 0 or final or interrupted:
            guard.flush()
            _save(ckpt, step, state, data)
        if interrupted:
            why = "Interrupted (Ctrl-C)" if interrupted == "SIGINT" else "Preempted"
            print(f"{why}: saved step {step}; re-run the same command to resume.", flush=True)
            return None
    guard.flush()
    return results


def print_results(results: dict, chance: dict, samples) -> None:
    print("\nFinal held-out results")
    print(evals.table(results, chance))
    if samples:  # a captioner's (CoCa); two-tower models make none
        print("\nSample captions (reference -> generated):")
    for ref, pred in samples[:5]:
        print(f"  {ref!r:<32} -> {pred!r}")
