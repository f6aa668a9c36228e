"""An evaluation split, read once from a source spec into memory: images and every caption.

Records that name the same image (a COCO-style CSV repeats an image path on five rows) become
one image with all their captions, so retrieval counts positives by image, not by string.
Unusable records (an undecodable image, a missing file) are skipped and counted, as in
training. The decoded split is held in memory (N × S² × 3 bytes: 5k COCO images at 224 px
take 750 MB, ImageNet's 50k validation images 7.5 GB; an evaluator's `limit` caps it).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools

import numpy as np

from mmjax.data import pipeline, preprocess, sources
from mmjax.errors import UserError


@dataclasses.dataclass
class EvalSet:
    name: str  # the spec it was read from
    images: np.ndarray  # uint8 [N, S, S, 3], centre-cropped as in evaluation
    labels: np.ndarray  # int32 [N]; -1 when the source has no classes
    texts: list[str]  # every caption of every image, image by image
    text_image: np.ndarray  # int32 [len(texts)]: the image each text describes
    class_names: list[str] | None  # the source's, for classification sets
    prompts: list[list[str]] | None  # the source's own zero-shot prompts per class (shapes)
    skipped: dict[str, int]  # reason -> records dropped

    def references(self) -> list[list[str]]:
        """The captions of each image."""
        refs = [[] for _ in range(len(self.images))]
        for text, image in zip(self.texts, self.text_image):
            refs[image].append(text)
        return refs


def _read(raw: dict, image_size: int, data_cfg):
    """-> (key, image, captions, label) or (key, None, skip reason, label)."""
    if raw["skip"]:
        return raw["key"], None, raw["skip"], raw["label"]
    try:
        image = preprocess.decode_image(raw["image"], min_size=image_size, decoder=data_cfg.decoder,
                                        max_pixels=data_cfg.max_image_pixels)
        image = preprocess.eval_image(image, image_size)
    except preprocess.Skip as e:
        return raw["key"], None, e.reason, raw["label"]
    captions = []
    for caption in raw["captions"]:
        try:
            captions.append(preprocess.caption_text([caption], None))
        except preprocess.Skip:
            pass
    return raw["key"], image, captions, raw["label"]


def _chunks(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def load(spec: str, data_cfg, limit: int = 0) -> EvalSet:
    """The first `limit` records (0: all) of `spec`, decoded at data_cfg.image_size."""
    source = sources.open_source(spec, data_cfg)
    count = limit if limit > 0 else 1 << 62
    read = functools.partial(_read, image_size=data_cfg.image_size, data_cfg=data_cfg)
    by_key: dict[str, int] = {}
    images, labels, texts, text_image = [], [], [], []
    skipped = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # Chunks bound the encoded bytes in flight; decoded images are kept (see module doc).
        for chunk in _chunks(pipeline.first_records(source, count), 256):
            for key, image, captions, label in pool.map(read, chunk):
                if image is None:
                    skipped[captions] += 1
                    continue
                if key not in by_key:
                    by_key[key] = len(images)
                    images.append(image)
                    labels.append(label)
                for caption in captions:
                    texts.append(caption)
                    text_image.append(by_key[key])
    if not images:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.items()) or "it is empty"
        raise UserError(f"evaluation data {spec!r} has no usable records ({reasons}); point the evaluator's data "
                        "at a held-out split")
    return EvalSet(
        name=spec,
        images=np.stack(images),
        labels=np.asarray(labels, np.int32),
        texts=texts,
        text_image=np.asarray(text_image, np.int32),
        class_names=list(source.class_names) if getattr(source, "class_names", None) else None,
        prompts=getattr(source, "zeroshot_prompts", None),
        skipped=dict(skipped),
    )
