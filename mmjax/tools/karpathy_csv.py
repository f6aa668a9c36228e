"""Karpathy's COCO / Flickr30k split file (dataset_coco.json, dataset_flickr30k.json) as a CSV
that `csv:` reads: one `filepath,title` row per caption, the image's absolute path repeated
on each of its rows (evaluation groups them back into one image with five captions).

    python -m mmjax.tools.karpathy_csv --json=dataset_coco.json --images=/data/coco --split=test --out=coco_test.csv

COCO Karpathy test: 5,000 images, 25,010 captions; Flickr30k test: 1,000 images, 5,000 captions.
"""
from __future__ import annotations

import csv
import json
import os
import sys

from absl import app, flags

_JSON = flags.DEFINE_string("json", None, "Karpathy's split file (dataset_coco.json or dataset_flickr30k.json).")
_IMAGES = flags.DEFINE_string("images", None, "Directory holding the images (COCO: the one with val2014/).")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "restval", "val", "test"], "Which split.")
_OUT = flags.DEFINE_string("out", None, "The CSV to write.")


def rows(split_file: dict, images_dir: str, split: str) -> list[dict]:
    """(filepath, title) rows of `split`: COCO images live under their `filepath` (val2014/),
    Flickr30k's directly under the images directory."""
    out = []
    for image in split_file["images"]:
        if image["split"] != split:
            continue
        path = os.path.join(os.path.abspath(images_dir), image.get("filepath", ""), image["filename"])
        out.extend({"filepath": path, "title": sentence["raw"].strip()} for sentence in image["sentences"])
    return out


def main(argv):
    del argv
    try:
        with open(_JSON.value) as f:
            split_file = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: --json {_JSON.value}: {e}")
    selected = rows(split_file, _IMAGES.value, _SPLIT.value)
    if not selected:
        sys.exit(f"error: {_JSON.value} has no images in split {_SPLIT.value!r}")
    with open(_OUT.value, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(selected)
    images = len({r["filepath"] for r in selected})
    print(f"wrote {_OUT.value}: {images} images, {len(selected)} captions ({_SPLIT.value})")


if __name__ == "__main__":
    flags.mark_flags_as_required(["json", "images", "out"])
    app.run(main)
