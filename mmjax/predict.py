"""Try a trained model on your own images: zero-shot labels, captions, embeddings.

    python -m mmjax.predict --workdir=runs/coca --images a.jpg b.png --labels "a cat,a dog"
    python -m mmjax.predict --workdir=runs/coca --images a.jpg --caption [--beam 4]
    python -m mmjax.predict --workdir=runs/clip --images a.jpg --texts "a cat" "a dog" --embed out.npz

Rebuilds the model from the workdir (config.json, the tokenizer's file, the latest or --step
checkpoint; parameters only) and runs on whatever device jax finds, a laptop CPU included.
Zero-shot probabilities follow the run's loss: a softmax over the labels (CLIP loss) or an
independent sigmoid per label (SigLIP). An image that cannot be read is named on stderr and
skipped; the exit status is then 2.
"""
from __future__ import annotations

from mmjax import host_memory

if __name__ == "__main__":  # before jax loads: glibc reads malloc tunables at start-up only
    host_memory.restart_with_kept_buffers("mmjax.predict")

import argparse
import sys

import numpy as np

from mmjax.errors import UserError


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mmjax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--images", nargs="+", required=True, help="image files")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", default="", help='zero-shot labels, comma-separated: "a cat,a dog"')
    labels.add_argument("--labels_file", default="", help="zero-shot labels, one per line")
    p.add_argument("--templates", default="", help="wrap each label in templates (a named set such as imagenet80, "
                   "or a file); default: the labels as written")
    p.add_argument("--caption", action="store_true", help="caption each image (models with a decoder: CoCa)")
    p.add_argument("--beam", type=int, default=0, help="beam search with this many beams (default: greedy)")
    p.add_argument("--method", default="", help="greedy | beam | sample (default: beam with --beam, else greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--texts", nargs="+", default=[], help="texts to embed (with --embed)")
    p.add_argument("--embed", default="", help="write image (and --texts) embeddings to this .npz file")
    args = p.parse_args(argv)
    if not (args.labels or args.labels_file or args.caption or args.embed):
        p.error("nothing to do: pass --labels/--labels_file, --caption or --embed")
    return args


def read_labels(args) -> list[str]:
    if args.labels_file:
        try:
            with open(args.labels_file) as f:
                return [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise UserError(f"--labels_file {args.labels_file}: {e.strerror}") from None
    return [label.strip() for label in args.labels.split(",") if label.strip()]


def read_images(paths, image_size: int, decoder: str):
    """-> (readable paths, uint8 [N, S, S, 3], [(path, why) for the others])."""
    from mmjax.data import preprocess

    ok, images, failed = [], [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                image = preprocess.decode_image(f.read(), min_size=image_size, decoder=decoder)
            images.append(preprocess.eval_image(image, image_size))
            ok.append(path)
        except OSError as e:
            failed.append((path, e.strerror or str(e)))
        except preprocess.Skip as e:
            failed.append((path, f"cannot be decoded as an image ({e})"))
    return ok, (np.stack(images) if images else None), failed


def label_probabilities(predict, image_emb, labels: list[str], templates: list[str] | None, sigmoid: bool):
    """[N, len(labels)]: softmax over the labels (CLIP loss) or a sigmoid per label (SigLIP)."""
    from mmjax.evals import prompts, zeroshot

    if templates:
        emb = predict.embed_texts([prompts.fill(t, label) for label in labels for t in templates])
        label_emb = zeroshot.class_embeddings(emb.reshape(len(labels), len(templates), -1))
    else:
        label_emb = predict.embed_texts(labels)
    logits = np.exp(predict.logit_scale) * (image_emb @ label_emb.T)
    if sigmoid:
        return 1 / (1 + np.exp(-(logits + (predict.logit_bias or 0.0))))
    logits -= logits.max(axis=1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def predict(args) -> int:
    import jax

    from mmjax import inference
    from mmjax.evals import prompts
    from mmjax.evals.predictor import Predictor
    from mmjax.models import decoding
    from mmjax.objectives import objective

    labels = read_labels(args)
    templates = prompts.templates(args.templates) if args.templates else None
    run = inference.load(args.workdir, args.step)
    if args.caption and not run.model.has_decoder:
        raise UserError(f"--caption needs a model with a caption decoder; this run's is {run.config.model.name}")
    paths, images, failed = read_images(args.images, run.config.data.image_size, run.config.data.decoder)
    for path, why in failed:
        print(f"error: {path}: {why}; skipped", file=sys.stderr)
    if images is None:
        raise UserError("none of the --images could be read")
    shardings = jax.tree.map(lambda x: x.sharding, run.params)
    predictor = Predictor(run.model, run.tokenizer, run.config.data.text_len, run.mesh, shardings, batch_size=8)
    p = predictor.bind(run.params)
    image_emb = p.embed_images(images)
    sigmoid = objective.contrastive_type(run.config.objective) == "siglip"
    probs = label_probabilities(p, image_emb, labels, templates, sigmoid) if labels else None
    captions = None
    if args.caption:
        method = args.method or ("beam" if args.beam else "greedy")
        options = decoding.DecodeOptions(method=method, beam_size=max(args.beam, 1), temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p)
        captions = p.caption(images, options, args.seed)
    print(f"{run.workdir}, step {run.step}")
    for i, path in enumerate(paths):
        print(path)
        if probs is not None:
            order = np.argsort(-probs[i])
            print("  " + "  ".join(f"{labels[j]} {probs[i, j]:.3f}" for j in order))
        if captions is not None:
            print(f"  caption: {captions[i]}")
    if args.embed:
        out = dict(images=np.array(paths), image_embeddings=image_emb)
        if args.texts:
            out.update(texts=np.array(args.texts), text_embeddings=p.embed_texts(args.texts))
        np.savez(args.embed, **out)
        print(f"wrote {args.embed}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))
    return 2 if failed else 0


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = predict(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
