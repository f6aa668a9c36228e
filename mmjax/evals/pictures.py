"""Small PNG pictures of what an evaluation saw: retrieval results and generated captions.

Pillow only, with its built-in font (`ImageFont.load_default()`), so nothing is downloaded
and no font file is needed. Every thumbnail is scaled to THUMB pixels on its longer side
(NEAREST when enlarging, so tiny test images stay crisp; LANCZOS when shrinking), captions
are wrapped to their cell, and the PNG is written through etils.epath (a workdir may be a URL);
a local one atomically: a temporary file in the same directory, then os.replace, so a crash
never leaves half a picture behind. Pictures are
saved with a 256-colour palette: a 4-query retrieval grid of real photos is ~200 KB, not ~550.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmjax import epath_io

THUMB = 96  # thumbnail side, pixels
FRAME = 3  # outline width around a thumbnail / caption cell
CELL_W = 176  # width of every column (a caption cell, or a framed thumbnail)
ROW_H = THUMB + 2 * FRAME  # height of a retrieval row
GAP = 6  # space between cells and around the picture
TITLE_H = 18  # a section title's band
CAPTION_TEXT_H = 112  # text area under each captioning sample (8 lines)

BACKGROUND = (255, 255, 255)
CELL_FILL = (244, 244, 244)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
GREEN = (0, 160, 0)  # a true match: its caption's text and check mark, its image's frame
RED = (210, 40, 40)  # a retrieved image that is not the text's own
NEUTRAL = (150, 150, 150)  # frame of a query, or of a caption that is not a true one
GENERATED = (20, 60, 170)

_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        try:
            _FONT = ImageFont.load_default(size=11)  # Pillow's bundled FreeType font
        except (TypeError, ImportError, OSError):  # Pillow without FreeType: the bitmap font
            _FONT = ImageFont.load_default()
    return _FONT


def _line_height() -> int:
    box = _font().getbbox("Hgjy")
    return box[3] - min(box[1], 0) + 3


def _as_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # grey [N, H, W]
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _thumbnail(image: np.ndarray) -> Image.Image:
    """A THUMB×THUMB tile: the image scaled to fit (aspect kept), centred on CELL_FILL."""
    h, w = image.shape[:2]
    scale = THUMB / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    picture = Image.fromarray(image).resize(size, resample)
    tile = Image.new("RGB", (THUMB, THUMB), CELL_FILL)
    tile.paste(picture, ((THUMB - size[0]) // 2, (THUMB - size[1]) // 2))
    return tile


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line is cut; overflow ends in '…'."""
    font = _font()
    fits = lambda s: font.getlength(s) <= width
    lines: list[str] = []
    current = ""
    for word in str(text).split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word):  # a single over-long word: cut it where it stops fitting
            cut = max(1, max(i for i in range(1, len(word) + 1) if fits(word[:i]) or i == 1))
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _text(draw: ImageDraw.ImageDraw, xy, text: str, width: int, max_lines: int, fill) -> int:
    """Wrapped text from xy; returns how many lines were drawn."""
    x, y = xy
    lines = _wrap(text, width, max_lines)
    for i, line in enumerate(lines):
        draw.text((x, y + i * _line_height()), line, font=_font(), fill=fill)
    return len(lines)


def _check_mark(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    """A green ✓ drawn with lines (the default font may have no such glyph), 10 px wide."""
    draw.line([(x, y + 5), (x + 3, y + 9), (x + 10, y)], fill=GREEN, width=2)


def _save(image: Image.Image, path) -> None:
    """Write the PNG; a local one atomically (epath_io.write_atomic)."""
    # 256 colours (octree, no dithering): photos compress ~3x smaller than as RGB, and the
    # few flat marking colours come through exactly.
    small = image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    png = io.BytesIO()
    small.save(png, format="PNG", compress_level=9)
    epath_io.write_atomic(path, png.getvalue())


def _column_x(col: int) -> int:
    return GAP + col * (CELL_W + GAP)


def retrieval_boxes(num_image_queries: int, num_text_queries: int, k: int) -> dict:
    """Where retrieval_grid draws each cell, as (left, top, right, bottom) boxes (right/bottom
    exclusive): {"size": (width, height), "image_to_text": [[box per column] per row],
    "text_to_image": [...], and each section's title's top, "image_to_text_title" ...}. Column 0 is the query; columns 1..k its results, best first.
    A thumbnail's FRAME-wide outline runs along the edge of its box."""
    width = _column_x(k + 1)
    y = GAP
    layout: dict = {}
    for section, rows in (("image_to_text", num_image_queries), ("text_to_image", num_text_queries)):
        layout[section + "_title"] = y + 2
        y += TITLE_H
        layout[section] = []
        for _ in range(rows):
            boxes = []
            for col in range(k + 1):
                # Thumbnails are ROW_H wide, centred in their column; caption cells fill the column.
                is_thumb = (section == "image_to_text") == (col == 0)
                left = _column_x(col) + ((CELL_W - ROW_H) // 2 if is_thumb else 0)
                boxes.append((left, y, left + (ROW_H if is_thumb else CELL_W), y + ROW_H))
            layout[section].append(boxes)
            y += ROW_H + GAP
        y += GAP
    layout["size"] = (width, y)
    return layout


def _framed_thumb(canvas: Image.Image, draw: ImageDraw.ImageDraw, box, image: np.ndarray, colour) -> None:
    left, top, right, bottom = box
    draw.rectangle([left, top, right - 1, bottom - 1], fill=colour)
    canvas.paste(_thumbnail(image), (left + FRAME, top + FRAME))


def _caption_cell(draw: ImageDraw.ImageDraw, box, text: str, *, frame, fill, rank: str = "", check: bool = False):
    left, top, right, bottom = box
    draw.rectangle([left, top, right - 1, bottom - 1], fill=CELL_FILL, outline=frame, width=FRAME if check else 1)
    x = left + FRAME + 3
    if rank:
        draw.text((x, top + FRAME + 2), rank, font=_font(), fill=MUTED)
        x += 14
    if check:
        _check_mark(draw, x, top + FRAME + 3)
        x += 14
    max_lines = max(1, (bottom - top - 2 * FRAME - 4) // _line_height())
    _text(draw, (x, top + FRAME + 2), text, right - x - FRAME - 3, max_lines, fill)


def retrieval_grid(path: str, images: np.ndarray, texts: list[str], image_to_text: np.ndarray,
                   text_to_image: np.ndarray, text_image: np.ndarray, *, queries: int = 4, k: int = 5) -> None:
    """images uint8 [N_i, H, W, 3]; texts [N_t]; image_to_text int [≥queries, ≥k]: the best texts
    of the first images; text_to_image int [≥queries, ≥k]: the best images of the first texts;
    text_image int [N_t]: the image each text describes. Draws the first `queries` queries of each direction: image→text rows (the query
    image, then its top-k captions, best first; a true caption is in green with a check mark
    and a green frame) and text→image rows (the query caption, then its top-k images; the true
    image framed in green, the others in red). Fewer items than `queries` or `k`: fewer rows or
    columns."""
    images = _as_images(images)
    texts = [str(t) for t in texts]
    image_to_text = np.asarray(image_to_text).reshape(min(len(images), len(image_to_text)), -1)
    text_to_image = np.asarray(text_to_image).reshape(min(len(texts), len(text_to_image)), -1)
    text_image = np.asarray(text_image).reshape(-1)
    if len(text_image) != len(texts):
        raise ValueError(f"text_image has {len(text_image)} entries for {len(texts)} texts")
    n_i2t = max(0, min(queries, len(image_to_text)))
    n_t2i = max(0, min(queries, len(text_to_image)))
    k = max(0, min(k, image_to_text.shape[1], text_to_image.shape[1]))
    layout = retrieval_boxes(n_i2t, n_t2i, k)
    canvas = Image.new("RGB", layout["size"], BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    titles = {
        "image_to_text": f"image -> text: query image, then its top-{k} captions (green, checked: a true caption)",
        "text_to_image": f"text -> image: query caption, then its top-{k} images (green frame: its image; red: another)",
    }
    for section, title in titles.items():
        draw.text((GAP, layout[section + "_title"]), title, font=_font(), fill=TEXT)

    for q, boxes in enumerate(layout["image_to_text"]):
        _framed_thumb(canvas, draw, boxes[0], images[q], NEUTRAL)
        for rank, box in enumerate(boxes[1:]):
            t = int(image_to_text[q, rank])
            true = int(text_image[t]) == q
            _caption_cell(draw, box, texts[t], frame=GREEN if true else NEUTRAL, fill=GREEN if true else MUTED,
                          rank=f"{rank + 1}.", check=true)
    for q, boxes in enumerate(layout["text_to_image"]):
        _caption_cell(draw, boxes[0], texts[q], frame=NEUTRAL, fill=TEXT)
        for rank, box in enumerate(boxes[1:]):
            i = int(text_to_image[q, rank])
            _framed_thumb(canvas, draw, box, images[i], GREEN if i == int(text_image[q]) else RED)
    _save(canvas, path)


def caption_boxes(num_images: int, count: int) -> dict:
    """Where caption_samples draws each sample: {"size": (width, height), "cells": [(left, top,
    right, bottom) per sample]}: at most 4 samples a row, the thumbnail centred at the top of
    its cell and the captions under it."""
    n = max(0, min(count, num_images))
    cols = max(1, min(4, n))
    rows = math.ceil(n / cols)
    cell_h = ROW_H + CAPTION_TEXT_H
    cells = []
    for i in range(n):
        left = _column_x(i % cols)
        top = GAP + (i // cols) * (cell_h + GAP)
        cells.append((left, top, left + CELL_W, top + cell_h))
    return {"size": (_column_x(cols), GAP + max(rows, 1) * (cell_h + GAP)), "cells": cells}


def caption_samples(path: str, images: np.ndarray, references: list[list[str]], generated: list[str],
                    *, count: int = 8) -> None:
    """A grid of the first `count` images, each with its reference caption(s) (the first two,
    in grey, marked 'ref:') and the generated caption (in blue, marked 'gen:') under it."""
    images = _as_images(images)
    n = min(count, len(images), len(references), len(generated))
    layout = caption_boxes(n, count)
    canvas = Image.new("RGB", layout["size"], BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    line = _line_height()
    for i, (left, top, right, bottom) in enumerate(layout["cells"]):
        _framed_thumb(canvas, draw, (left + (CELL_W - ROW_H) // 2, top, left + (CELL_W + ROW_H) // 2, top + ROW_H),
                      images[i], NEUTRAL)
        refs = references[i]
        refs = [refs] if isinstance(refs, str) else list(refs)
        y = top + ROW_H + 3
        width = CELL_W - 4
        for ref in refs[:2]:
            y += line * _text(draw, (left + 2, y), f"ref: {ref}", width, 2, MUTED)
        lines_left = max(1, (bottom - y) // line)
        _text(draw, (left + 2, y + 2), f"gen: {generated[i]}", width, min(3, lines_left), GENERATED)
    _save(canvas, path)
