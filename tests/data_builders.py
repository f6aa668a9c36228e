"""Tiny real datasets written by the tests themselves: JPEG files with a CSV/JSONL table,
img2dataset-style webdataset tars and parquet files, and class folders."""
from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def encoded(value: int, fmt: str = "PNG", size=(6, 5), mode="RGB") -> bytes:
    """A flat image of one grey value."""
    buffer = io.BytesIO()
    Image.new(mode, size, (value,) * len(mode)).save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg_bytes(rgb, size=(40, 48), seed=0) -> bytes:
    """A noisy image of one colour, JPEG-encoded."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb, np.float32) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def examples(n: int, offset: int = 0):
    """(key, jpeg bytes, caption, label) of n colour images; the caption names the colour."""
    names = list(COLORS)
    for i in range(offset, offset + n):
        name = names[i % len(names)]
        yield f"{i:06d}", jpeg_bytes(COLORS[name], seed=i), f"a {name} picture number {i}", i % len(names)


def write_table(directory, n: int, kind: str = "csv", offset: int = 0, columns=("filepath", "title")) -> str:
    """Images under directory/images and a table of relative paths and captions."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for key, data, caption, _ in examples(n, offset):
        (directory / "images" / f"{key}.jpg").write_bytes(data)
        rows.append({columns[0]: f"images/{key}.jpg", columns[1]: caption})
    path = directory / f"table_{offset}.{kind}"
    with open(path, "w", newline="") as f:
        if kind == "csv":
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(directory, shards: int, per_shard: int) -> str:
    """img2dataset-style shards directory/00000.tar ...; returns a brace pattern over them."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = examples(shards * per_shard)
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                key, data, caption, _ = next(stream)
                add_member(tar, f"{key}.jpg", data)
                add_member(tar, f"{key}.txt", caption.encode())
                add_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return f"{directory}/{{{0:05d}..{shards - 1:05d}}}.tar"


def write_parquet(directory, files: int, per_file: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    stream = examples(files * per_file)
    for f in range(files):
        rows = [next(stream) for _ in range(per_file)]
        table = pa.table({"key": [r[0] for r in rows], "jpg": [r[1] for r in rows], "caption": [r[2] for r in rows]})
        pq.write_table(table, directory / f"{f:05d}.parquet", row_group_size=max(1, per_file // 2))
    return f"{directory}/*.parquet"


def write_folders(directory, per_class: int) -> str:
    for key, data, _, label in examples(per_class * len(COLORS)):
        cls = directory / list(COLORS)[label]
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{key}.jpg").write_bytes(data)
    return str(directory)


def png_bytes(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


# What write_bad_tars puts in one pass over its shards (a bomb needs data.max_image_pixels < 40,000).
BAD_TAR_SKIPS = {
    "not_an_image": 1, "undecodable_image": 1, "split_key": 2, "missing_caption": 1, "missing_image": 1,
    "empty_caption": 1, "bad_utf8": 1, "decompression_bomb": 1, "truncated_shard": 1,
}


def write_bad_tars(directory, good_per_shard: int = 4) -> tuple[str, int]:
    """Three shards holding every kind of bad record of BAD_TAR_SKIPS among good ones;
    returns (pattern, good records per pass)."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = examples(10_000)

    def good(tar, n):
        for _ in range(n):
            key, data, caption, _ = next(stream)
            add_member(tar, f"{key}.jpg", data)
            add_member(tar, f"{key}.txt", caption.encode())

    _, jpeg, _, _ = next(stream)
    with tarfile.open(directory / "00000.tar", "w") as tar:
        good(tar, good_per_shard)
        add_member(tar, "html.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
        add_member(tar, "html.txt", b"an error page")
        add_member(tar, "cut.jpg", jpeg[: len(jpeg) // 2])
        add_member(tar, "cut.txt", b"a truncated jpeg")
        add_member(tar, "split.jpg", jpeg)  # its caption is the first member of the next shard
    with tarfile.open(directory / "00001.tar", "w") as tar:
        add_member(tar, "split.txt", b"a caption whose image is in the previous shard")
        good(tar, good_per_shard)
        add_member(tar, "nocaption.jpg", jpeg)
        add_member(tar, "noimage.txt", b"a caption without an image")
        add_member(tar, "empty.jpg", jpeg)
        add_member(tar, "empty.txt", b"   ")
        add_member(tar, "latin1.jpg", jpeg)
        add_member(tar, "latin1.txt", "caf\xe9 au lait".encode("latin-1"))
        good(tar, 1)
    with tarfile.open(directory / "00002.tar", "w") as tar:
        good(tar, good_per_shard)
        add_member(tar, "bomb.png", png_bytes((200, 200)))
        add_member(tar, "bomb.txt", b"too many pixels")
        good(tar, 1)
        add_member(tar, "last.jpg", jpeg)
        add_member(tar, "last.txt", b"the tar ends inside this member")
    path = directory / "00002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"the tar ends") + 5])  # cut inside the last member's data
    return f"{directory}/{{00000..00002}}.tar", 3 * good_per_shard + 2


def write_mostly_bad_tars(directory, shards: int = 2) -> str:
    """90% HTML error pages saved as .jpg."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = examples(1000)
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for i in range(20):
                key, data, caption, _ = next(stream)
                add_member(tar, f"{key}.jpg", data if i % 10 == 0 else b"<html>Forbidden</html>")
                add_member(tar, f"{key}.txt", caption.encode())
    return f"{directory}/*.tar"


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # No code directory, so no checksums file to look up (finding one for a module inside the
    # `tests` namespace package would need importlib_resources).
    code_path = None


# --- tfds: tiny real datasets, prepared as ArrayRecord without TensorFlow. ------------------
# Images are given to the builder as encoded PNG bytes: encoding a numpy array would call
# tf.image.encode_png. skip_registration keeps the catalog's coco_captions / cifar10 names
# pointing at the real builders, as in a user's process.

class CocoCaptions(_LocalBuilder, skip_registration=True):
    """coco_captions' layout: a config, image/id, and 5 captions as a sequence of dicts."""
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]  # the catalog's default config

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/id": tfds.features.Scalar(np.int64),
            "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "val": self._generate_examples(3, first_id=1000)}

    def _generate_examples(self, n, first_id=100):
        for i in range(n):
            yield i, {"image": encoded(10 * i, "JPEG"), "image/id": first_id + i,
                      "captions": {"id": list(range(5)),
                                   "text": [f"photo {first_id + i} caption {j}" for j in range(5)]}}


class Cifar10(_LocalBuilder, skip_registration=True):
    """cifar10's layout: a text id, an image and a ClassLabel; no captions."""
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(5, 6, 3)),
            "label": tfds.features.ClassLabel(names=["airplane", "automobile", "bird"]),
        }))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(5)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"id": f"test_{i:05d}", "image": encoded(i), "label": i % 3}


class GrayDigits(_LocalBuilder, skip_registration=True):
    """A grayscale image under `img`, a caption under `text`, a label that is a plain integer."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "img": tfds.features.Image(shape=(5, 6, 1)),
            "text": tfds.features.Text(),
            "label": np.int64,
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"img": encoded(i, mode="L"), "text": f"digit {i}", "label": 7}


def prepare_tfds(data_dir: str) -> None:
    """coco_captions, cifar10 and gray_digits look-alikes, prepared as ArrayRecord under data_dir."""
    for builder in (CocoCaptions, Cifar10, GrayDigits):
        builder(data_dir=data_dir).download_and_prepare(file_format="array_record")
