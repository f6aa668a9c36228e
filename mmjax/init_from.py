"""A new run's initial parameters from other weights (config.init): fine-tuning.

`init.path` names a run's workdir (its latest checkpoint, as `mmjax.inference.load` reads
it) or an OpenCLIP checkpoint file (converted by `mmjax.interop.openclip`). Only parameters
are taken: the step and the optimizer state start fresh. `init.include` / `init.exclude`
are regular expressions over parameter paths in the unrolled layout
("image_encoder/encoder/block3/attn/query_kernel"), so a scanned run and an unrolled one name
the same weights alike. A path is taken when include matches it (empty: every path) and
exclude does not (empty: none); the others keep their fresh initialisation. The trainer
applies init only to a run with no checkpoint: a resumed run restores its own.
"""
from __future__ import annotations

import math
import os
import re

import jax
from flax import traverse_util

from etils import epath

from mmjax import checkpoint, epath_io, inference, run_record
from mmjax.errors import UserError
from mmjax.models import scan_layout

OPENCLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SHOWN = 3  # mismatches named in the error line


def check_source(init_cfg, workdir: str) -> None:
    """UserError in one line when a new run in `workdir` would read an `init.path` that names
    nothing this module can read. A workdir with a checkpoint resumes and never reads it."""
    if init_cfg.path and not _has_checkpoint(workdir):
        _source_kind(init_cfg.path)


def _has_checkpoint(workdir: str) -> bool:
    """Whether the trainer would resume in `workdir` (a step above 0; an import's step 0 is no run)."""
    # Read-only: creates nothing, so a typo in init.path leaves no workdir behind.
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False, read_only=True)
    try:
        return bool(ckpt.latest_step())
    finally:
        ckpt.close()


def _source_kind(path: str) -> str:
    """"workdir" or "openclip"; UserError naming the problem and the fix otherwise."""
    what = "a run's workdir (with config.json and checkpoints/) or an OpenCLIP checkpoint (" + ", ".join(
        OPENCLIP_SUFFIXES) + ")"
    path = epath_io.absolute(path)  # the message says where it looked
    if epath.Path(path).is_dir():
        if not epath.Path(run_record.path(path)).is_file():
            raise UserError(f"init.path {path} is a directory without config.json, so no mmjax workdir; "
                            f"set --config.init.path to {what}")
        return "workdir"
    if epath.Path(path).is_file():
        if not path.endswith(OPENCLIP_SUFFIXES):
            raise UserError(f"init.path {path} is a file of unknown kind; set --config.init.path to {what}")
        return "openclip"
    raise UserError(f"init.path {path} does not exist; set --config.init.path to {what}")


def apply(config, params, devices):
    """`params` (a fresh train state's) with the parameters config.init selects replaced by the
    source's, each placed with its target's sharding and dtype; `params` itself when init.path is ""."""
    init_cfg = config.init
    if not init_cfg.path:
        return params
    source = _unrolled_source(init_cfg.path, config.model, devices, params)
    target = traverse_util.flatten_dict(scan_layout.unroll_blocks(params), sep="/")
    selected = [p for p in target if _selected(p, init_cfg)]
    _check_fits(selected, source, target, init_cfg)
    merged = {p: _place(source[p], like) if p in selected else like for p, like in target.items()}
    merged = traverse_util.unflatten_dict(merged, sep="/")
    if config.model.scan_layers:
        merged = scan_layout.stack_blocks(merged)
    print(_summary(selected, target, init_cfg), flush=True)
    return jax.tree.map(_place, merged, params)


def _unrolled_source(path: str, model_cfg, devices, target_params) -> dict:
    """The source's parameters in the unrolled layout, flat by "/"-joined path."""
    if _source_kind(path) == "workdir":
        params = inference.load(path, devices=devices).params
    else:
        from mmjax.interop import openclip  # torch-free, but only fine-tunes from OpenCLIP need it

        state = openclip.read_checkpoint(os.path.expanduser(path))
        # open_clip's keys are converted for this run's model: they must be all of its keys, shaped alike.
        openclip.check_state(state, openclip.expected_shapes(target_params, model_cfg), path,
                             f"this config's {model_cfg.name}", "give a checkpoint of this config's architecture, or "
                             "import it (mmjax.tools.import_openclip) and pick parts with --config.init.include")
        params = openclip.to_mmjax(state, model_cfg)
    return traverse_util.flatten_dict(scan_layout.unroll_blocks(params), sep="/")


def _selected(path: str, init_cfg) -> bool:
    included = not init_cfg.include or re.search(init_cfg.include, path)
    return bool(included) and not (init_cfg.exclude and re.search(init_cfg.exclude, path))


def _check_fits(selected, source, target, init_cfg) -> None:
    if not selected:
        raise UserError(f"init.include {init_cfg.include!r} with init.exclude {init_cfg.exclude!r} selects none of "
                        f"this model's parameters (e.g. {next(iter(target))}); fix --config.init.include/exclude")
    bad = {}
    for p in selected:
        if p not in source:
            bad[p] = "missing in source"
        elif source[p].shape != target[p].shape:
            bad[p] = f"source {tuple(source[p].shape)} vs target {tuple(target[p].shape)}"
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in list(bad.items())[:_SHOWN])
        towers = "^(" + "|".join(sorted({p.split("/")[0] for p in bad})) + ")/"
        suggestion = f"{init_cfg.exclude}|{towers}" if init_cfg.exclude else towers
        raise UserError(f"init: {len(bad)} selected parameter arrays do not fit {init_cfg.path} ({shown}"
                        f"{'; ...' if len(bad) > _SHOWN else ''}); leave them out of the init, e.g. "
                        f"--config.init.exclude='{suggestion}', or pick a source of this model's shape")


def _place(x, like):
    """x with `like`'s sharding and dtype."""
    x = jax.device_put(x, like.sharding)
    return x if x.dtype == like.dtype else x.astype(like.dtype)


def _summary(selected, target, init_cfg) -> str:
    size = lambda paths: sum(math.prod(target[p].shape) for p in paths)
    filters = [f"{name} {init_cfg[name]!r}" for name in ("include", "exclude") if init_cfg[name]]
    rest = "; the rest keep their fresh initialisation" if len(selected) < len(target) else ""
    return (f"init: {len(selected)} of {len(target)} parameter arrays ({_values(size(selected))} of "
            f"{_values(size(target))} values) from {init_cfg.path}"
            + (f" ({', '.join(filters)})" if filters else "") + rest)


def _values(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"
