"""mmjax.data.preprocess: decoding every mode and failure, reduced decodes, crops, captions."""
import io
import math
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmjax.data import preprocess as pp
from mmjax.data.preprocess import Skip

# Every decoding test runs with both decoders; simplejpeg is optional.
DECODERS = ["pillow", pytest.param("simplejpeg", marks=pytest.mark.skipif(
    pp.simplejpeg is None, reason="simplejpeg not installed"))]

# Pillow must not warn (bombs, palette transparency): warnings are errors in this file.
pytestmark = pytest.mark.filterwarnings("error")


def natural(height, width, seed=0):
    """Smooth colour gradients plus noise: compresses and decodes like a photo, unlike flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def encode(image, fmt, **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png(width, height, bit_depth, color_type, rows=None) -> bytes:
    """A PNG written by hand: 16-bit colour Pillow cannot save, or a header with no real pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = b"".join(b"\x00" + row.tobytes() for row in rows) if rows is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels))
            + chunk(b"IEND", b""))


# ---- modes → RGB


@pytest.mark.parametrize("decoder", DECODERS)
def test_rgb_and_grey_jpeg(decoder):
    image = natural(48, 64)
    out = pp.decode_image(encode(image, "JPEG", quality=95, subsampling=0), decoder=decoder)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.abs(out.astype(int) - image).mean() < 5
    grey = pp.decode_image(encode(Image.new("L", (8, 6), 77), "JPEG", quality=95), decoder=decoder)
    assert grey.shape == (6, 8, 3) and np.all(np.abs(grey.astype(int) - 77) <= 1)


@pytest.mark.parametrize("decoder", DECODERS)
def test_cmyk_jpeg(decoder):
    cyan = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    out = pp.decode_image(cyan, decoder=decoder)
    assert out.shape == (16, 16, 3)
    assert np.all(np.abs(out.astype(int) - (0, 255, 255)) <= 2)


@pytest.mark.parametrize("mode, fill, fmt, want", [
    ("L", 77, "PNG", (77, 77, 77)),
    ("LA", (77, 10), "PNG", (77, 77, 77)),  # alpha dropped, not composited
    ("RGBA", (10, 20, 30, 0), "PNG", (10, 20, 30)),
    ("1", 1, "PNG", (255, 255, 255)),
    ("1", 0, "BMP", (0, 0, 0)),
    ("CMYK", (255, 0, 0, 0), "TIFF", (0, 255, 255)),
    ("CMYK", (0, 0, 0, 255), "TIFF", (0, 0, 0)),
    ("YCbCr", (100, 90, 200), "TIFF", (200, 61, 32)),
])
def test_modes(mode, fill, fmt, want):
    data = encode(Image.new(mode, (5, 3), fill), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really holds that mode
    out = pp.decode_image(data)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 3)
    assert np.all(out == want), out[0, 0]


@pytest.mark.parametrize("transparency", [None, 2, bytes([255, 0, 128, 255])])
def test_palette(transparency):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7]
    im = Image.fromarray(np.array([[0, 1, 2, 3]], np.uint8), "P")
    im.putpalette(palette)
    data = encode(im, "PNG", **({} if transparency is None else {"transparency": transparency}))
    assert (Image.open(io.BytesIO(data)).info.get("transparency") is None) == (transparency is None)
    out = pp.decode_image(data)
    np.testing.assert_array_equal(out[0], np.reshape(palette, (4, 3)))


def test_16_bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], ">u2")
    data = png(4, 1, 16, 0, values)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = pp.decode_image(data)
    np.testing.assert_array_equal(out[0], [[0] * 3, [1] * 3, [128] * 3, [255] * 3])


def test_16_bit_colour_png():
    values = np.array([[[0, 32768, 65535], [65535, 257, 0]]], ">u2")
    out = pp.decode_image(png(2, 1, 16, 2, values))
    np.testing.assert_array_equal(out[0], [[0, 128, 255], [255, 1, 0]])


def test_arrays():
    rgb = natural(4, 5)
    assert pp.decode_image(rgb) is rgb
    np.testing.assert_array_equal(pp.decode_image(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, 2))
    np.testing.assert_array_equal(pp.decode_image(rgb[:, :, :1]), np.repeat(rgb[:, :, :1], 3, 2))
    rgba = np.concatenate([rgb, np.zeros((4, 5, 1), np.uint8)], -1)
    np.testing.assert_array_equal(pp.decode_image(rgba), rgb)
    with pytest.raises(ValueError, match="uint8"):
        pp.decode_image(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        pp.decode_image(np.zeros((4, 5, 2), np.uint8))


# ---- failures → Skip reasons


def skip_reason(data, **kwargs) -> str:
    with pytest.raises(Skip) as info:
        pp.decode_image(data, **kwargs)
    return info.value.reason


@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_jpeg(decoder):
    for progressive in (False, True):
        data = encode(natural(64, 80), "JPEG", quality=90, progressive=progressive)
        for cut in (len(data) // 2, len(data) - 2, 300, 10):  # ... -2: only the EOI missing
            assert skip_reason(data[:cut], decoder=decoder) == "undecodable_image"


@pytest.mark.parametrize("decoder", DECODERS)
def test_recoverable_jpeg_glitch_still_decodes(decoder):
    # Junk before a marker: strict libjpeg-turbo refuses it, Pillow (the fallback) decodes it.
    data = encode(natural(32, 32), "JPEG", quality=95)
    sos = data.find(b"\xff\xda")
    out = pp.decode_image(data[:sos] + b"\x00\x00" + data[sos:], decoder=decoder)
    assert np.abs(out.astype(int) - pp.decode_image(data, decoder="pillow")).max() <= 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_failures(decoder):
    data = encode(natural(64, 80), "PNG")
    assert skip_reason(data[: len(data) // 2], decoder=decoder) == "undecodable_image"
    assert skip_reason(data[:30], decoder=decoder) == "undecodable_image"
    garbage = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    assert skip_reason(garbage, decoder=decoder) == "undecodable_image"
    assert skip_reason(b"\xff\xd8\xff" + garbage, decoder=decoder) == "undecodable_image"
    for html in (b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
                 b"<html><head>", b"\r\n  \t<HTML>", b"\xef\xbb\xbf<?xml version='1.0'?>",
                 b"403 Forbidden\n"):
        assert skip_reason(html, decoder=decoder) == "not_an_image", html
    assert skip_reason(b"", decoder=decoder) == "missing_image"
    assert skip_reason(None, decoder=decoder) == "missing_image"


def test_decompression_bomb():
    # A header claiming the pixels, with no pixel data: rejected before any decoding.
    assert skip_reason(png(20000, 20000, 1, 0)) == "decompression_bomb"  # > 2x Pillow's limit
    assert skip_reason(png(10000, 10000, 1, 0)) == "decompression_bomb"  # Pillow would only warn
    # Under max_pixels it gets as far as the (empty) pixel data: our limit rules, not Pillow's.
    assert skip_reason(png(10000, 10000, 1, 0), max_pixels=10**8) == "undecodable_image"


@pytest.mark.parametrize("decoder", DECODERS)
def test_decompression_bomb_limit(decoder):
    data = encode(natural(40, 50), "JPEG")
    assert skip_reason(data, decoder=decoder, max_pixels=1999) == "decompression_bomb"
    assert pp.decode_image(data, decoder=decoder, max_pixels=2000).shape == (40, 50, 3)


def test_decoder_argument(monkeypatch):
    with pytest.raises(ValueError, match="pillow"):
        pp.decode_image(b"x", decoder="cv2")
    jpeg = encode(natural(8, 8), "JPEG")
    monkeypatch.setattr(pp, "simplejpeg", None)
    with pytest.raises(ValueError, match="pip install simplejpeg"):
        pp.decode_image(jpeg, decoder="simplejpeg")
    assert pp.decode_image(jpeg).shape == (8, 8, 3)  # auto falls back to Pillow


def test_skip():
    with pytest.raises(ValueError, match="unknown skip reason"):
        Skip("too_ugly")
    copy = pickle.loads(pickle.dumps(Skip("bad_utf8", "byte 0xff")))
    assert (copy.reason, copy.detail, str(copy)) == ("bad_utf8", "byte 0xff", "bad_utf8: byte 0xff")


# ---- reduced-size decoding


def test_pillow_draft_matches_full_decode():
    data = encode(natural(768, 1024), "JPEG", quality=92)
    small = pp.decode_image(data, min_size=224, decoder="pillow")
    assert small.shape == (384, 512, 3)  # 1/2: 1/4 would be 192 < 224
    full = Image.fromarray(pp.decode_image(data, decoder="pillow"))
    reference = np.asarray(full.resize((512, 384), Image.Resampling.BICUBIC))
    assert np.abs(small.astype(int) - reference).mean() < 3


@pytest.mark.parametrize("decoder", DECODERS)
def test_reduced_decode_never_below_min_size(decoder):
    for height, width in [(768, 1024), (224, 300), (447, 600), (448, 448), (449, 2000),
                          (2000, 449), (1000, 895), (1792, 1800), (100, 150)]:
        data = encode(natural(height, width), "JPEG", quality=80)
        out = pp.decode_image(data, min_size=224, decoder=decoder)
        assert min(out.shape[:2]) >= min(224, height, width), (height, width, out.shape)
        assert out.shape[0] <= height and out.shape[1] <= width
    # A PNG has no reduced decode: full size.
    assert pp.decode_image(encode(natural(500, 600), "PNG"), min_size=224).shape == (500, 600, 3)


@pytest.mark.skipif(pp.simplejpeg is None, reason="simplejpeg not installed")
def test_simplejpeg_reduced_decode_matches_full_decode():
    data = encode(natural(768, 1024), "JPEG", quality=92)
    small = pp.decode_image(data, min_size=224, decoder="simplejpeg")
    assert small.shape == (288, 384, 3)  # 3/8 scale: 2/8 would be 192 < 224
    full = Image.fromarray(pp.decode_image(data, decoder="simplejpeg"))
    reference = np.asarray(full.resize((384, 288), Image.Resampling.BICUBIC))
    assert np.abs(small.astype(int) - reference).mean() < 3


# ---- crops


def torchvision_box(height, width, rng, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed with numpy draws."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width, scale, ratio", [
    (256, 341, (0.9, 1.0), (3 / 4, 4 / 3)),
    (256, 256, (0.08, 1.0), (3 / 4, 4 / 3)),
    (20, 1000, (0.9, 1.0), (3 / 4, 4 / 3)),  # always the fallback, ratio clamped
    (1000, 20, (0.9, 1.0), (3 / 4, 4 / 3)),
    (300, 200, (0.5, 0.6), (1.0, 1.0)),
])
def test_sample_box_is_torchvisions(height, width, scale, ratio):
    ours, theirs = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(500):
        assert pp._sample_box(height, width, ours, scale, ratio) == torchvision_box(
            height, width, theirs, scale, ratio)


def test_sample_box_statistics():
    rng = np.random.default_rng(0)
    # Square, so that rejected boxes (taller or wider than the image) do not bias the aspect.
    height, width, scale, ratio = 480, 480, (0.3, 1.0), (3 / 4, 4 / 3)
    boxes = np.array([pp._sample_box(height, width, rng, scale, ratio) for _ in range(4000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
    fraction, log_aspect = h * w / (height * width), np.log(w / h)
    assert fraction.min() > 0.29 and fraction.max() <= 1.0
    assert np.all(np.abs(log_aspect) < math.log(4 / 3) + 0.02)
    assert abs(np.median(log_aspect)) < 0.02  # log-uniform: symmetric around square
    assert len(set(map(tuple, boxes))) > 3000  # positions vary too


def test_random_resized_crop():
    image = natural(200, 200)
    plain = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BICUBIC))
    out = pp.random_resized_crop(image, 64, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1))
    np.testing.assert_array_equal(out, plain)
    # A box: the same as cropping first, then resizing (away from the box edges, where
    # Pillow's filter may read the pixels just outside).
    image = natural(256, 341)
    out = pp.random_resized_crop(image, 96, np.random.default_rng(3))
    top, left, h, w = pp._sample_box(256, 341, np.random.default_rng(3), (0.9, 1.0), (3 / 4, 4 / 3))
    crop = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize(
        (96, 96), Image.Resampling.BICUBIC))
    assert out.dtype == np.uint8 and out.shape == (96, 96, 3)
    np.testing.assert_array_equal(out[4:-4, 4:-4], crop[4:-4, 4:-4])
    again = pp.random_resized_crop(image, 96, np.random.default_rng(3))
    other = pp.random_resized_crop(image, 96, np.random.default_rng(4))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)


@pytest.mark.parametrize("height, width", [(256, 341), (341, 256), (300, 225), (225, 226), (50, 70)])
def test_center_crop_is_resize_shorter_then_crop(height, width):
    image, size = natural(height, width), 224
    scale = size / min(height, width)
    new_w, new_h = (size, int(scale * height)) if width <= height else (int(scale * width), size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    out = pp.center_crop(image, size)
    np.testing.assert_array_equal(out, resized[top:top + size, left:left + size])
    np.testing.assert_array_equal(pp.eval_image(image, size), out)


def test_center_crop_identity():
    image = natural(224, 224)
    assert pp.center_crop(image, 224) is image
    assert pp.eval_image(image, 224) is image


def test_flip_and_train_image():
    image = natural(32, 48)
    np.testing.assert_array_equal(pp.maybe_flip(image, np.random.default_rng(0), p=1.0), image[:, ::-1])
    assert pp.maybe_flip(image, np.random.default_rng(0), p=0.0) is image
    flips = [pp.maybe_flip(image, rng) is not image for rng in map(np.random.default_rng, range(400))]
    assert 150 < sum(flips) < 250

    np.testing.assert_array_equal(pp.train_image(image, 32, np.random.default_rng(0), crop="center"),
                                  pp.center_crop(image, 32))
    first = pp.train_image(image, 24, np.random.default_rng(5), flip=True)
    np.testing.assert_array_equal(first, pp.train_image(image, 24, np.random.default_rng(5), flip=True))
    assert first.shape == (24, 24, 3) and first.flags.c_contiguous
    flipped = [pp.train_image(image, 32, np.random.default_rng(s), crop="center", flip=True)
               for s in range(20)]
    assert any(np.array_equal(f, pp.center_crop(image, 32)[:, ::-1]) for f in flipped)
    with pytest.raises(ValueError, match="random_resized.*center"):
        pp.train_image(image, 24, np.random.default_rng(0), crop="random")


# ---- captions


def caption_reason(captions, rng=None) -> str:
    with pytest.raises(Skip) as info:
        pp.caption_text(captions, rng)
    return info.value.reason


def test_caption_text():
    assert pp.caption_text(["  a dog \n", "a cat"], None) == "a dog"
    assert pp.caption_text([b"caf\xc3\xa9 "], np.random.default_rng(0)) == "café"
    assert caption_reason([]) == "missing_caption"
    assert caption_reason([" \t\n"]) == "empty_caption"
    assert caption_reason([b""]) == "empty_caption"
    assert caption_reason([b"caf\xe9"]) == "bad_utf8"  # latin-1, not UTF-8


def test_caption_choice_is_uniform_and_seeded():
    captions = [f"caption {i}" for i in range(5)]
    picks = [pp.caption_text(captions, np.random.default_rng(s)) for s in range(2000)]
    counts = np.array([picks.count(c) for c in captions])
    assert counts.min() > 330 and counts.max() < 470  # 400 each; 4 sigma is about +-70
    assert picks == [pp.caption_text(captions, np.random.default_rng(s)) for s in range(2000)]
    rng = np.random.default_rng(0)
    assert len({pp.caption_text(captions, rng) for _ in range(50)}) == 5
