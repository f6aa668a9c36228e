"""Import open_clip weights into an mmjax workdir that evaluate, predict and fine-tuning read.

    python -m mmjax.tools.import_openclip --model ViT-B-32 --checkpoint open_clip_model.safetensors --out runs/vit_b32
    python -m mmjax.evaluate --workdir=runs/vit_b32
    python -m mmjax.predict --workdir=runs/vit_b32 --images cat.jpg --labels "a cat,a dog"
    python -m mmjax.main --config=configs/clip.py:vit_b32 --config.data.tokenizer=clip_bpe \\
        --config.init.path=runs/vit_b32 --workdir=runs/finetune ...          # fine-tune from it

Models: ViT-B-32, ViT-B-16, ViT-L-14 (and their -quickgelu forms, for OpenAI's weights),
coca_ViT-B-32, coca_ViT-L-14. Checkpoints: .safetensors (read without torch) or .bin/.pt/.pth
state dicts (torch.load(weights_only=True)). The workdir gets config.json (the configs/
variant, float32, data.tokenizer=clip_bpe), the CLIP BPE vocabulary, the parameters as
checkpoint step 0 (no optimizer state) and imported.json saying where they came from.
The vocabulary is open_clip's bpe_simple_vocab_16e6.txt.gz from an installed open_clip, or
--vocab FILE; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from mmjax import checkpoint, inference, run_record
from mmjax.data import clip_bpe
from mmjax.errors import UserError
from mmjax.interop import openclip, openclip_models
from mmjax.tools import summary

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mmjax.tools.import_openclip", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"open_clip model name: {', '.join(openclip_models.NAMES)}")
    p.add_argument("--checkpoint", required=True, help="open_clip weights: .safetensors, .bin, .pt or .pth")
    p.add_argument("--out", required=True, help="the workdir to write (new or empty)")
    p.add_argument("--vocab", default="", help="open_clip's bpe_simple_vocab_16e6.txt.gz (default: the installed "
                   "open_clip package's)")
    return p.parse_args(argv)


def import_openclip(name: str, checkpoint_file: str, out: str, vocab: str = "") -> str:
    """Write workdir `out` from open_clip checkpoint `checkpoint_file` of model `name`."""
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--out {out} is not empty; give a new directory")
    config = openclip_models.config_for(name, f"{clip_bpe.SPEC}:{vocab}" if vocab else clip_bpe.SPEC)
    tokenizer = clip_bpe.load(config.data.tokenizer)  # a missing vocabulary fails here, before any file is written
    model = inference.model_for(config, tokenizer)
    state = openclip.read_checkpoint(checkpoint_file)
    shapes = summary.abstract_params(model, config)
    openclip.check_state(state, openclip.expected_shapes(shapes, config.model), checkpoint_file, f"open_clip's {name}")
    params = jax.tree.map(jnp.asarray, openclip.to_mmjax(state, config.model))
    os.makedirs(out, exist_ok=True)
    run_record.write(out, config, tokenizer)
    ckpt = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": params}, {})
    finally:
        ckpt.close()
    with open(os.path.join(out, run_record.IMPORTED), "w") as f:
        json.dump({"open_clip_model": name, "checkpoint": os.path.abspath(checkpoint_file)}, f, indent=1)
    return out


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = import_openclip(args.model, args.checkpoint, args.out, args.vocab)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"imported open_clip {args.model} from {args.checkpoint} into {out}")
    print(f"  evaluate:  python -m mmjax.evaluate --workdir={out}")
    print(f"  fine-tune: python -m mmjax.main --config=CONFIG --config.init.path={out} --workdir=NEW_DIR")


if __name__ == "__main__":
    main()
