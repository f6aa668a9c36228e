"""Run a training run's evaluators on one of its checkpoints, outside the trainer.

    python -m mmjax.evaluate --workdir=DIR [--step=N] [--evals=name,...] [--config.evals.X...]

Rebuilds the model from the workdir alone (config.json, the tokenizer's file, checkpoints/; only
the parameters are read), runs config.evals (or the ones named), prints a table and adds the
results to DIR/eval_<step>.json. On the same checkpoint and data the numbers are the trainer's.

Options of an entry are changed like the trainer's: --config.evals.zeroshot.options.templates=imagenet80.
A new entry is made by giving its type first, then its fields:
    --config.evals.cifar10.type=zeroshot --config.evals.cifar10.data=tfds:cifar10:test
    --config.evals.cifar10.options.class_names=cifar10 --config.evals.cifar10.options.templates=cifar
"""
from __future__ import annotations

from mmjax import host_memory

if __name__ == "__main__":  # before jax loads: glibc reads malloc tunables at start-up only
    host_memory.restart_with_kept_buffers("mmjax.evaluate")

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import epath_io, evals, run_record, validation
from mmjax.evals import standalone
from mmjax.errors import ConfigError, UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EVALS = flags.DEFINE_list("evals", [], "Evaluator names from config.evals (default: all).")


def _exit_with(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _flag_value(argv, name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv):
    """The workdir's recorded config becomes --config, so --config.X overrides it; errors are
    one line, exit status 2."""
    workdir = _flag_value(argv, "workdir")
    if not workdir:
        _exit_with("missing --workdir; pass a training run's output directory, e.g. --workdir=runs/coca")
    try:
        config, _ = run_record.load(workdir)
        if "evals" not in config:  # a record from before config.evals
            config.evals = evals.embedded_entries(config.model.name == "coca")
        standalone.add_entries_named_in(config, argv)
    except UserError as e:
        _exit_with(str(e))
    config_flags.DEFINE_config_dict("config", config, "The run's config (config.json); override with --config.X=...")
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, ValueError, KeyError, TypeError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        _exit_with(lines[-1] if lines else repr(e))
    try:
        validation.validate(flags.FLAGS.config)
    except ConfigError as e:
        _exit_with(str(e))
    return rest


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir = epath_io.absolute(_WORKDIR.value)
    try:
        step, results, chance = standalone.evaluate(workdir, flags.FLAGS.config, _STEP.value, _EVALS.value)
    except UserError as e:
        _exit_with(str(e), e.exit_code)
    print(f"{workdir}, step {step}")
    print(evals.table(results, chance))
    path = os.path.join(workdir, f"eval_{step}.json")
    print(f"wrote {standalone.write_results(path, step, results)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
