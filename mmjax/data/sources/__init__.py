"""Data sources behind one spec string: `scheme:argument`, or a weighted mixture of them.

    shapes[:train|eval]          the embedded procedural dataset (mmjax.data.shapes)
    tfds:NAME[/CONFIG]:SPLIT     a prepared TFDS dataset, random access over ArrayRecord
    wds:PATTERN                  img2dataset webdataset tars, brace/glob patterns, streamed
    parquet:PATTERN              img2dataset parquet files (image bytes + caption columns)
    csv:FILE / jsonl:FILE        an image-path column and a caption column
    folder:DIR                   ImageNet-style class folders (label = sorted folder index)

A mixture is "SPEC@WEIGHT,SPEC@WEIGHT" (commas inside {...} belong to the pattern).
"""
from __future__ import annotations

import importlib

from mmjax.errors import UserError

# scheme -> module (imported on first use: tfds and pyarrow take seconds to import)
SCHEMES = {
    "shapes": "mmjax.data.sources.shapes_source",
    "tfds": "mmjax.data.sources.tfds_source",
    "wds": "mmjax.data.sources.webdataset",
    "parquet": "mmjax.data.sources.parquet",
    "csv": "mmjax.data.sources.table",
    "jsonl": "mmjax.data.sources.table",
    "folder": "mmjax.data.sources.folder",
}


def split_spec(spec: str) -> tuple[str, str]:
    """"csv:/a/b.csv" -> ("csv", "/a/b.csv"); "shapes" -> ("shapes", "")."""
    scheme, _, argument = spec.strip().partition(":")
    if scheme not in SCHEMES:
        raise UserError(
            f"unknown data source scheme {scheme!r} in {spec!r}; valid: "
            + ", ".join(f"{s}:" for s in SCHEMES) + " (e.g. csv:/data/train.csv)"
        )
    return scheme, argument


def open_source(spec: str, data_cfg):
    """The RandomAccessSource or StreamSource (mmjax.data.sources.base) that `spec` names."""
    scheme, argument = split_spec(spec)
    module = importlib.import_module(SCHEMES[scheme])
    source = module.open_source(scheme, argument, data_cfg)
    source.name = spec
    return source


def parse_mixture(text: str) -> list[tuple[str, float]]:
    """"a@0.7,b@0.3" -> [("a", 0.7), ("b", 0.3)]; a lone spec has weight 1."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    mixture = []
    for part in (p.strip() for p in parts):
        spec, at, weight = part.rpartition("@")
        if not at:
            spec, weight = part, "1"
        try:
            w = float(weight)
        except ValueError:
            spec, w = part, 1.0  # an "@" that belongs to the path
        if not spec or w <= 0:
            raise UserError(f"bad data mixture entry {part!r} in {text!r}; write SPEC@WEIGHT with a positive weight")
        split_spec(spec)
        mixture.append((spec, w))
    return mixture
