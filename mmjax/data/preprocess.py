"""Host-side preprocessing of raw records: decode, crop and resize images, pick a caption.

Pure functions on numpy uint8 arrays (Pillow does the pixel work); mean/std normalisation
happens on the accelerator. Randomness comes only from the `rng` argument, so the same
Generator state gives the same numbers. A record that cannot be used raises `Skip`, whose
reason is one of base.SKIP_REASONS. Arrays that come from Pillow are read-only views of its
buffers; copy before writing into them.

Importing this module sets `PIL.Image.MAX_IMAGE_PIXELS = None`: `decode_image(max_pixels=)`
is the pixel limit instead. Pillow's own check warns through the process-wide warnings
filters (which reader threads cannot change safely) and refuses anything over twice its
limit whatever max_pixels says.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from mmjax.data.sources.base import SKIP_REASONS

try:
    import simplejpeg
except ImportError:
    simplejpeg = None

Image.MAX_IMAGE_PIXELS = None

DECODERS = ("auto", "pillow", "simplejpeg")
CROPS = ("random_resized", "center")
_JPEG_MAGIC = b"\xff\xd8\xff"
# Bytes that occur in text (UTF-8 included); anything left after deleting them is binary.
_TEXT_BYTES = bytes(range(0x20, 0x100)) + b"\t\n\r\f\v"


class Skip(Exception):
    """A record the pipeline drops and counts under data/skipped/<reason>."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; valid: {SKIP_REASONS}")
        super().__init__(reason, detail)  # args hold both, so it pickles across grain workers
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def decode_image(data, *, min_size: int | None = None, decoder: str = "auto",
                 max_pixels: int = 89_478_485) -> np.ndarray:
    """Encoded bytes (or an already decoded uint8 array) → RGB uint8 [H, W, 3].

    min_size: decode JPEGs at a reduced scale whose shorter side is still >= min_size
      (Pillow draft: 1/2, 1/4, 1/8; simplejpeg: n/8); other formats decode at full size.
    decoder: "pillow"; "simplejpeg" for JPEGs, Pillow for other formats; "auto" is
      simplejpeg when installed. JPEGs that strict libjpeg-turbo refuses (truncated, but
      also recoverable glitches such as extraneous bytes before a marker) go to Pillow,
      which decodes the recoverable ones and refuses truncated ones.
    Alpha is dropped, not composited (as PIL's convert("RGB") and open_clip do); grey is
    replicated; 16-bit grey is scaled to 8 bits. EXIF orientation is not applied.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {DECODERS}")
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ValueError('decoder="simplejpeg" needs the simplejpeg package: pip install simplejpeg')
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)
    if data is None or len(data) == 0:
        raise Skip("missing_image")
    if decoder != "pillow" and simplejpeg is not None and data[:3] == _JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            _check_pixels(width, height, max_pixels)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_size or 0,
                                          min_width=min_size or 0)
        except ValueError:
            pass  # Pillow decides, see the docstring
    return _decode_pillow(data, min_size, max_pixels)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected uint8 [H, W], [H, W, 1|3|4], got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3] if image.shape[2] == 4 else image


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise Skip("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")


def _decode_pillow(data: bytes, min_size: int | None, max_pixels: int) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        # An HTML error page or other text saved under an image name is not an image at all.
        is_text = not data[:512].translate(None, _TEXT_BYTES)
        raise Skip("not_an_image" if is_text else "undecodable_image", "unknown format") from None
    except Exception as e:  # a recognised header that is corrupt
        raise Skip("undecodable_image", f"{type(e).__name__}: {e}") from None
    _check_pixels(*im.size, max_pixels)
    try:
        if min_size:
            im.draft("RGB", (min_size, min_size))  # JPEG only; picks the largest fitting 1/2^k
        return _pil_to_rgb(im)
    except Exception as e:  # truncated or corrupt data (ImageFile.LOAD_TRUNCATED_IMAGES is off)
        raise Skip("undecodable_image", f"{type(e).__name__}: {e}") from None


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I"):  # I;16* and I: 16-bit grey, which convert("RGB") clips at 255
        grey = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[:, :, None], 3, axis=2)
    if "transparency" in im.info:  # P/L/RGB + tRNS: straight to RGB warns, via RGBA it does not
        im = im.convert("RGBA")
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def caption_text(captions, rng: np.random.Generator | None) -> str:
    """One caption: uniform over the list with rng (COCO has 5), the first with rng=None."""
    if len(captions) == 0:
        raise Skip("missing_caption")
    text = captions[0] if rng is None else captions[int(rng.integers(len(captions)))]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("bad_utf8", str(e)) from None
    text = text.strip()
    if not text:
        raise Skip("empty_caption")
    return text


def _sample_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Centre crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A random box (torchvision's RandomResizedCrop) resized to size x size, bicubic."""
    top, left, h, w = _sample_box(image.shape[0], image.shape[1], rng, scale, ratio)
    # One call: Pillow resamples only the box, without materialising the crop.
    out = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC,
                                        box=(left, top, left + w, top + h))
    return np.asarray(out)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """open_clip's eval transform: shorter side to size (bicubic), then the centre square."""
    height, width = image.shape[:2]
    if height == width == size:
        return image  # exact identity: pre-sized datasets must come through unchanged
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def maybe_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability p (always draws once, so later draws do not shift)."""
    return np.ascontiguousarray(image[:, ::-1]) if rng.random() < p else image


def train_image(image: np.ndarray, size: int, rng: np.random.Generator, *,
                crop: str = "random_resized", scale: tuple[float, float] = (0.9, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False) -> np.ndarray:
    """Decoded RGB uint8 [H, W, 3] → training crop uint8 [size, size, 3]."""
    if crop == "random_resized":
        image = random_resized_crop(image, size, rng, scale, ratio)
    elif crop == "center":
        image = center_crop(image, size)
    else:
        raise ValueError(f"unknown crop {crop!r}; valid: {CROPS}")
    return maybe_flip(image, rng) if flip else image


def eval_image(image: np.ndarray, size: int) -> np.ndarray:
    """Decoded RGB uint8 [H, W, 3] → evaluation crop uint8 [size, size, 3]."""
    return center_crop(image, size)
