"""Tiny real datasets written by the tests themselves: JPEG files with a CSV/JSONL table,
img2dataset-style webdataset tars and parquet files, and class folders."""
from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


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
