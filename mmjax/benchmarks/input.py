"""Input-pipeline throughput: images/s per CPU core, where the time goes, cores to feed a GPU.

    python -m mmjax.benchmarks.input [--source=SPEC] [--workers=0,1,2] [--batches=40] [--batch_size=64]
        [--image_size=224] [--text_len=77] [--decoder=auto] [--feed_rate=NAME:RATE,...]

Without --source: a temp img2dataset-style set (8 webdataset tars × 128 JPEGs, shorter side 256 px
as `--resize_mode=keep_ratio --image_size=256` writes them, quality 92, ≈ 35 KiB, short captions).
Per worker count, pipeline.train_iterator with a CLIP run's augmentation (random resized crop,
scale 0.9–1, no flip; tokenizer trained on the captions) runs 5 warm-up batches, then `--batches`
are timed. Per core = images/s ÷ busy processes: the workers, or the main process with workers=0
(with workers > 0 the main process's own CPU time is not counted; "CPU cores used", the CPU time
of all of them ÷ wall time, is). Then one core without grain on the first records: µs per image
of each stage, per decoder and decode size ("as pipeline": the decoder and size the pipeline
used). Cores to feed a GPU = ceil(rate / per-core images/s). Prints one JSON object per
measurement, then tables.
"""
from __future__ import annotations

import datetime
import io
import json
import math
import os
import platform
import tarfile
import tempfile
import time

import grain
import jax
import numpy as np
import PIL
import psutil
import sentencepiece
from absl import app, flags
from PIL import Image, ImageDraw

from mmjax.data import pipeline, preprocess, sources

_SOURCE = flags.DEFINE_string("source", "", "A source spec (or mixture); empty = a synthetic img2dataset-style set.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to time.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches per worker count, after 5 warm-up batches.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Side of the training crop.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 77, "Tokens per caption row.")
_DECODER = flags.DEFINE_enum("decoder", "auto", preprocess.DECODERS, "data.decoder of the pipeline runs.")
_FEED_RATE = flags.DEFINE_list("feed_rate", ["mmjax_h200:1797", "open_clip_compile_h200:2678"],
                               "NAME:SAMPLES_PER_SEC training rates of one GPU (CLIP ViT-B/16) to feed.")
_WARMUP, _STAGE_IMAGES = 5, 512
_WORDS = ("a photo of a", "a close-up of the", "an old", "my new", "two small", "the red", "a blue", "green")
_NOUNS = ("dog", "cat", "bicycle", "kitchen", "mountain lake", "street at night", "birthday cake", "wooden chair")
_PLACES = ("on the beach", "in the snow", "next to a window", "at the market", "in a park", "for sale", "", "")


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth colour field + mid-frequency texture + a few shapes + pixel noise, quality 92."""
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).resize((width, height), Image.BICUBIC)
    texture = Image.fromarray(rng.normal(0, 30, (height // 8, width // 8)).astype(np.float32), mode="F")
    texture = np.asarray(texture.resize((width, height), Image.BICUBIC))[:, :, None]
    image = Image.fromarray(np.clip(np.asarray(field, np.float32) + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        box = (x, y, x + int(rng.integers(30, 120)), y + int(rng.integers(30, 120)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.integers(0, 256, 3).tolist()))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 10, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=92)
    return out.getvalue()


def write_synthetic(directory: str, shards: int = 8, per_shard: int = 128) -> str:
    """img2dataset-style tars (jpg, txt, json per key), images 256×256, 341×256, 256×341; returns a wds: spec."""
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(f"{directory}/{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = f"{rng.choice(_WORDS)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)}".strip()
                size = [(256, 256), (341, 256), (256, 341)][i % 3]
                for ext, data in (("jpg", _jpeg(rng, *size)), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"wds:{directory}/{{00000..{shards - 1:05d}}}.tar"


def _environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "grain": grain.__version__, "pillow": PIL.__version__, "sentencepiece": sentencepiece.__version__,
            "simplejpeg": preprocess.simplejpeg and preprocess.simplejpeg.__version__,
            "date": datetime.date.today().isoformat()}


def _cores_for(per_core: float) -> dict:
    rates = {name: float(rate) for name, _, rate in (r.rpartition(":") for r in _FEED_RATE.value)}
    return {f"cores_for_{name}": math.ceil(rate / per_core) for name, rate in rates.items()}


def time_pipeline(data_cfg, tokenizer, workers: int) -> dict:
    data_cfg.worker_count = workers
    iterator = pipeline.train_iterator(data_cfg, tokenizer, _BATCH_SIZE.value, seed=0)
    try:
        for _ in range(_WARMUP):
            next(iterator)
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]  # the workers now exist
        cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in processes)  # user + system, all threads
        start, cpu_start = time.perf_counter(), cpu()
        images = sum(len(next(iterator)["image"]) for _ in range(_BATCHES.value))
        seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    finally:
        iterator.close()
    busy = max(workers, 1)
    return {"name": "pipeline", "workers": workers, "busy_processes": busy, "images": images, "seconds": seconds,
            "images_per_sec": images / seconds, "images_per_sec_per_core": images / seconds / busy,
            "per_core": "images_per_sec / busy_processes (the workers, or 1 with workers=0)",
            "cores_used": cpu_seconds / seconds,  # CPU time is counted in clock ticks: none on a tiny run
            "images_per_cpu_second": images / cpu_seconds if cpu_seconds else None,
            **_cores_for(images / seconds / busy), "load_1min": os.getloadavg()[0]}


def _timed(fn, items) -> tuple[list, float]:
    """[fn(x)], None where it raises preprocess.Skip, and µs per item of a second pass: the first
    warms caches and the allocator (a first pass ran Pillow's decode up to a third slower)."""
    def one(x):
        try:
            return fn(x)
        except preprocess.Skip:
            return None
    [one(x) for x in items]
    start = time.perf_counter()
    return [one(x) for x in items], (time.perf_counter() - start) / len(items) * 1e6


def stage_breakdown(data_cfg, tokenizer) -> list[dict]:
    """One core, no grain: µs per image of each stage, for each decoder available, decoding at
    the pipeline's min_size, at the crop size and at full size (min_size None)."""
    opened = [sources.open_source(spec, data_cfg) for spec, _ in sources.parse_mixture(data_cfg.train)]
    start = time.perf_counter()
    records = [r for source in opened for r in pipeline.first_records(source, _STAGE_IMAGES) if not r["skip"]]
    read_us = (time.perf_counter() - start) / len(records) * 1e6
    rng = np.random.default_rng(0)
    _, tokenize_us = _timed(
        lambda r: tokenizer.encode([preprocess.caption_text(r["captions"], rng)], data_cfg.text_len), records)
    aug, size = data_cfg.augment, data_cfg.image_size
    # What the pipeline does: data.decoder ("auto": simplejpeg when installed) at its decode size.
    pipeline_size = pipeline.train_decode_size(data_cfg)
    auto = "simplejpeg" if preprocess.simplejpeg else "pillow"
    as_pipeline = (auto if data_cfg.decoder == "auto" else data_cfg.decoder, pipeline_size)
    rows = []
    for decoder in ("pillow",) + (("simplejpeg",) if preprocess.simplejpeg else ()):
        for min_size in dict.fromkeys((pipeline_size, size, None)):
            images, decode_us = _timed(lambda r: preprocess.decode_image(
                r["image"], min_size=min_size, decoder=decoder, max_pixels=data_cfg.max_image_pixels), records)
            images = [im for im in images if im is not None]
            _, crop_us = _timed(lambda im: preprocess.train_image(
                im, size, rng, crop=aug.crop, scale=tuple(aug.scale), ratio=tuple(aug.ratio), flip=aug.flip), images)
            total = read_us + decode_us + crop_us + tokenize_us
            rows.append({"name": "stages", "decoder": decoder, "decode_min_size": min_size,
                         "as_pipeline": (decoder, min_size) == as_pipeline, "images": len(records),
                         "decoded_shorter_side": int(np.median([min(im.shape[:2]) for im in images])),
                         "read_us": read_us, "decode_us": decode_us, "crop_us": crop_us, "tokenize_us": tokenize_us,
                         "decode_crop_images_per_sec": 1e6 / (decode_us + crop_us),
                         "images_per_sec_per_core": 1e6 / total, **_cores_for(1e6 / total),
                         "load_1min": os.getloadavg()[0]})
    return rows


def main(argv):
    del argv
    env = _environment()
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = pipeline.default_data_config()
        data_cfg.train = _SOURCE.value or write_synthetic(tmp)
        data_cfg.image_size, data_cfg.text_len, data_cfg.decoder = _IMAGE_SIZE.value, _TEXT_LEN.value, _DECODER.value
        data_cfg.augment.update(crop="random_resized", scale=(0.9, 1.0), flip=False)
        tokenizer = pipeline.make_tokenizer(data_cfg, f"{tmp}/tokenizer.model")
        rows = [time_pipeline(data_cfg, tokenizer, int(w)) for w in _WORKERS.value]
        rows += stage_breakdown(data_cfg, tokenizer)
    setup = {"source": data_cfg.train, "batch_size": _BATCH_SIZE.value, "image_size": _IMAGE_SIZE.value,
             "text_len": _TEXT_LEN.value, **env}
    for row in rows:
        print(json.dumps({"decoder": _DECODER.value, **row, **setup}))
    feeds = {k: k for k in rows[0] if k.startswith("cores_for_")}
    print(f"\n{env['cpu']}, {env['cpu_count']} cores; grain {env['grain']}, Pillow {env['pillow']}, simplejpeg "
          f"{env['simplejpeg']}; {env['date']}\n")
    _table([r for r in rows if r["name"] == "pipeline"], {
        "workers": "workers", "busy processes": "busy_processes", "images/s": "images_per_sec",
        "images/s per core (÷ busy processes)": "images_per_sec_per_core", "CPU cores used": "cores_used",
        "images per CPU-second": "images_per_cpu_second", "load": "load_1min", **feeds})
    _table([r for r in rows if r["name"] == "stages"], {
        "one core, no grain: decoder": "decoder", "decode min_size": "decode_min_size", "as pipeline": "as_pipeline",
        "decoded shorter side": "decoded_shorter_side", "read µs": "read_us", "decode µs": "decode_us",
        "crop µs": "crop_us", "tokenize µs": "tokenize_us", "decode+crop images/s": "decode_crop_images_per_sec",
        "all stages images/s": "images_per_sec_per_core", **feeds})


def _table(rows: list[dict], columns: dict) -> None:
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    show = lambda v: "-" if v is None else (f"{v:.0f}" if v >= 10 else f"{v:.2f}") if isinstance(v, float) else str(v)
    for r in rows:
        print("| " + " | ".join(show(r[key]) for key in columns.values()) + " |")
    print()


if __name__ == "__main__":
    app.run(main)
