"""Entry point: python -m mmjax.main --config=configs/coca.py[:variant] [--workdir=DIR] [--config.key=value ...]

Re-running the same command with the same workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import glob
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import configs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with a :variant suffix.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config>[_<variant>]).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (TPU pods, SLURM, env-var clusters)."
)


def default_workdir(config_arg: str) -> str:
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _bad_override(argv, config_arg: str) -> str | None:
    """Name the first --config.a.b override whose path the config lacks, with the valid keys."""
    path, _, variant = config_arg.partition(":")
    config = configs.load_config(path, variant)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node = config
        for depth, part in enumerate(key.split(".")):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(key.split(".")[:depth]) or "top level"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"unknown config key {key!r} ({where} has: {', '.join(valid)}); fix the --config.{key} flag"
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
    if isinstance(exc, AttributeError):
        return _bad_override(argv, config_arg) or str(exc)
    # ml_collections wraps the config's own error (e.g. an unknown variant) in a traceback:
    # its last line is the message meant for the user.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else repr(exc)


def parse_flags(argv):
    """absl parsing whose failures are one clear line and exit status 2."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # configs load lazily: touch one to surface their errors here
        return rest
    except (flags.Error, AttributeError, OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {_one_line_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # keep the console to our progress lines
        logging.set_verbosity(logging.WARNING)
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()  # auto-detects the cluster; must precede any device query
    from mmjax import train  # after flag parsing: a bad flag fails fast, before any device work

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    from mmjax.errors import UserError

    try:
        train.run(config, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
