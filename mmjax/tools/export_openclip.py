"""Export an mmjax run's parameters as an open_clip checkpoint (.safetensors).

    python -m mmjax.tools.export_openclip --workdir=runs/vit_b32_finetune --out model.safetensors
    # in PyTorch:  open_clip.create_model("ViT-B-32", pretrained="model.safetensors")

For runs whose model is one of open_clip's architectures (mmjax.interop.openclip_models:
configs/clip.py:vit_b32/b16/l14, configs/coca.py:openclip_b32/l14, with their numerics) and
that read open_clip's tokenizer (data.tokenizer=clip_bpe). The exporter names the open_clip
model to create; anything else is refused in one line.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from mmjax import inference
from mmjax.data import clip_bpe
from mmjax.errors import UserError
from mmjax.interop import openclip, openclip_models
from mmjax.tools import summary


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mmjax.tools.export_openclip", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="an mmjax run (trained, fine-tuned or imported)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    return p.parse_args(argv)


def export_openclip(workdir: str, out: str, step: int | None = None) -> str:
    """Write `out`; returns the open_clip model name to create it with."""
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out}: give a .safetensors file name")
    run = inference.load(workdir, step, devices=jax.devices("cpu")[:1])  # one host copy, whatever the accelerators
    if not clip_bpe.is_spec(run.config.data.tokenizer):
        raise UserError(f"{workdir} was trained with data.tokenizer={run.config.data.tokenizer!r}; open_clip's text "
                        "towers read CLIP BPE ids (data.tokenizer=clip_bpe)")
    name = openclip_models.name_for(run.config.model)
    state = openclip.from_mmjax(jax.device_get(run.params), run.config.model)
    canonical = openclip_models.config_for(name)
    model = inference.model_for(canonical, run.tokenizer)
    expected = openclip.expected_shapes(summary.abstract_params(model, canonical), canonical.model)
    openclip.check_state({k: np.asarray(v) for k, v in state.items()}, expected, workdir, f"open_clip's {name}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    openclip.write_safetensors(state, out)
    return name


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        name = export_openclip(args.workdir, args.out, args.step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"wrote {args.out}: open_clip.create_model({name!r}, pretrained={os.path.abspath(args.out)!r})")


if __name__ == "__main__":
    main()
