"""Entry point: python -m mmjax.main --config=configs/coca.py[:variant] [--workdir=DIR] [--config.key=value ...]

Re-running the same command with the same workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

from mmjax import host_memory

if __name__ == "__main__":  # before jax loads: glibc reads malloc tunables at start-up only
    host_memory.restart_with_kept_buffers("mmjax.main")

import glob
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import configs, distributed, validation
from mmjax.errors import ConfigError, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with a :variant suffix.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config>[_<variant>]).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-process: join a jax.distributed process group first: the three flags below, else JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES, JAX_PROCESS_ID, else the cluster jax detects (SLURM, Cloud TPU, MPI). Implied by those flags."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: how many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process's index, 0..num_processes-1.")


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{variant}" if variant else name)


# The value types ml_collections can parse from a --config.key=value flag.
OVERRIDABLE = (int, float, bool, str, tuple, ml_collections.ConfigDict)


def _bad_override(argv, config_arg: str) -> str | None:
    """Name the first --config.a.b override whose path the config lacks (with the valid keys),
    or whose value ml_collections cannot parse from the command line."""
    path, _, variant = config_arg.partition(":")
    try:
        config = configs.load_config(path, variant)
    except Exception:  # the config itself fails to load: no override is to blame
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "top level"
            if not isinstance(node, ml_collections.ConfigDict):
                return f"unknown config key {key!r} ({where} is a value, not a section); fix the --config.{key} flag"
            if part not in node:
                valid = ", ".join(sorted(node.keys()))
                return f"unknown config key {key!r} ({where} has: {valid}); fix the --config.{key} flag"
            if depth == len(parts) - 1 and not issubclass(node.get_type(part), OVERRIDABLE):
                return (
                    f"--config.{key} cannot be set on the command line: its value is {node[part]!r} and only "
                    f"int, float, bool, str and tuple values can be; set it in {path} instead"
                )
            node = node[part]
    return None


def _one_line_error(exc: Exception, argv) -> str:
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
        return "missing --config; e.g. --config=configs/coca.py"
    path = config_arg.partition(":")[0]
    if not os.path.isfile(path):
        found = sorted(glob.glob("configs/*.py"))
        return f"config file {path!r} not found; valid: {', '.join(found) or 'configs/<name>.py'}"
    # ml_collections reports a misspelt key as AttributeError, KeyError (a repr with a
    # "Did you mean" line) or TypeError depending on its depth: name it ourselves.
    bad_override = _bad_override(argv, config_arg)
    if bad_override:
        return bad_override
    # ml_collections wraps the config's own error (e.g. an unknown variant) in a traceback:
    # its last line is the message meant for the user.
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) is a repr
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else repr(exc)


def _exit_with(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl parsing, then mmjax.validation: failures are one clear line and exit status 2,
    before jax starts or any file is written."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # configs load lazily: touch one to surface their errors here
    except (flags.Error, AttributeError, OSError, ValueError, KeyError, TypeError) as e:
        _exit_with(_one_line_error(e, argv))
    try:
        validation.validate(_CONFIG.value)
    except ConfigError as e:
        _exit_with(str(e))
    if _distributed():
        try:
            distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        except UserError as e:
            _exit_with(str(e))
    return rest


def _distributed() -> bool:
    """--distributed, or any of its three flags: they mean nothing else, so they imply it."""
    return _DISTRIBUTED.value or any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # keep the console to our progress lines
        logging.set_verbosity(logging.WARNING)
    if _distributed():  # before any device query, an import's included
        try:
            print(distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value), flush=True)
        except UserError as e:
            _exit_with(str(e))
    from mmjax import train  # after flag parsing: a bad flag fails fast, before any device work

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    try:
        train.run(config, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started (later ones save and exit 0)
        print("interrupted before the first training step; nothing to save", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
