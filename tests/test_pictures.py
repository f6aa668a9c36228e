"""Evaluation pictures (retrieval grid, caption samples) and curves.png's panel layout."""
import os

import numpy as np
import pytest
from PIL import Image

from mmjax import metrics
from mmjax.evals import pictures


def _is_green(pixel):
    r, g, b = pixel[:3]
    return g > 120 and r < 60 and b < 60


def _is_red(pixel):
    r, g, b = pixel[:3]
    return r > 150 and g < 80 and b < 80


def _open(path):
    with Image.open(path) as im:
        im.verify()  # a complete, valid PNG
    im = Image.open(path)
    assert im.format == "PNG"
    return im.convert("RGB")


@pytest.fixture
def synthetic():
    """6 random 8×8 images, 12 texts (2 per image), and hand-set rankings."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    texts = [f"image {i // 2} caption {i % 2}: a small random square of noisy coloured pixels" for i in range(12)]
    text_image = np.repeat(np.arange(6), 2)
    image_to_text = np.stack([np.roll(np.arange(12), -(2 * i + 4)) for i in range(6)])  # no true caption...
    image_to_text[0, 2] = 1  # ...except image 0's third-best caption (text 1 describes image 0)
    text_to_image = np.stack([np.roll(np.arange(6), -(t // 2 + 1)) for t in range(12)])  # own image last
    text_to_image[0, :5] = [3, 4, 0, 1, 2]  # text 0's true image (0) ranks third
    return images, texts, image_to_text, text_to_image, text_image


def _leftovers(directory, name):
    return [f for f in os.listdir(directory) if f != name]


def test_retrieval_grid_marks_the_true_matches_in_green(tmp_path, synthetic):
    images, texts, i2t, t2i, text_image = synthetic
    path = tmp_path / "retrieval.png"
    pictures.retrieval_grid(str(path), images, texts, i2t, t2i, text_image, queries=2, k=5)
    im = _open(path)
    assert _leftovers(tmp_path, "retrieval.png") == []  # the temp file was renamed, not left
    layout = pictures.retrieval_boxes(2, 2, 5)
    assert im.size == layout["size"]
    assert [len(rows) for rows in (layout["image_to_text"], layout["text_to_image"])] == [2, 2]

    # text → image, query text 0: its image is the 3rd result (column 3), framed in green;
    # the others (columns 1, 2, 4, 5) are framed in red. Sample the middle of each left edge.
    for col in range(1, 6):
        left, top, right, bottom = layout["text_to_image"][0][col]
        edge = im.getpixel((left + 1, (top + bottom) // 2))
        assert (_is_green if col == 3 else _is_red)(edge), (col, edge)
        inside = im.getpixel((left + pictures.FRAME + 4, top + pictures.FRAME + 4))
        assert not _is_green(inside)  # the thumbnail itself, not the frame
    # text 1 (also image 0's) has no true image in its top 5: no green frame in its row.
    for col in range(1, 6):
        left, top, right, bottom = layout["text_to_image"][1][col]
        assert _is_red(im.getpixel((left + 1, (top + bottom) // 2)))

    # image → text, query image 0: only its 3rd caption is a true one: green frame and text.
    def green_pixels(box):
        crop = np.asarray(im.crop(box)).astype(int)
        return int(((crop[..., 1] > 120) & (crop[..., 0] < 60) & (crop[..., 2] < 60)).sum())

    row = layout["image_to_text"][0]
    left, top, right, bottom = row[3]
    assert _is_green(im.getpixel((left + 1, (top + bottom) // 2)))
    inner = (left + pictures.FRAME + 1, top + pictures.FRAME + 1, right - pictures.FRAME - 1, bottom - pictures.FRAME - 1)
    assert green_pixels(inner) > 20  # green caption text (and its check mark)
    for col in (1, 2, 4, 5):
        assert green_pixels(row[col]) == 0, col
    assert all(green_pixels(box) == 0 for box in layout["image_to_text"][1][1:])


def test_retrieval_grid_height_grows_with_queries_and_handles_few_items(tmp_path, synthetic):
    images, texts, i2t, t2i, text_image = synthetic
    sizes = {}
    for q in (1, 3):
        path = tmp_path / f"q{q}.png"
        pictures.retrieval_grid(str(path), images, texts, i2t, t2i, text_image, queries=q, k=5)
        sizes[q] = _open(path).size
    assert sizes[1][0] == sizes[3][0]
    assert sizes[3][1] - sizes[1][1] == 4 * (pictures.ROW_H + pictures.GAP)  # 2 more rows each way
    # Fewer items than queries and k: 2 images, 4 texts, rankings only 2 deep.
    path = tmp_path / "few.png"
    pictures.retrieval_grid(str(path), images[:2], texts[:4], np.array([[1, 2], [3, 0]]),
                            np.array([[0, 1], [1, 0], [1, 0], [0, 1]]), text_image[:4], queries=4, k=5)
    assert _open(path).size == pictures.retrieval_boxes(2, 4, 2)["size"]
    assert sorted(os.listdir(tmp_path)) == ["few.png", "q1.png", "q3.png"]


def test_retrieval_grid_keeps_real_sized_pictures_small(tmp_path):
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 255, 256)
    base = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128 + 0 * ramp[None, :]), -1)
    images = np.stack([np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(8)])
    texts = [" ".join(["word"] * 60) for _ in range(16)]
    path = tmp_path / "big.png"
    pictures.retrieval_grid(str(path), images, texts, np.tile(np.arange(16), (8, 1)),
                            np.tile(np.arange(8), (16, 1)), np.repeat(np.arange(8), 2))
    assert _open(path).size == pictures.retrieval_boxes(4, 4, 5)["size"]
    assert os.path.getsize(path) < 400_000


def test_caption_samples_grid(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    images[0, :16] = (200, 30, 90)  # a flat top half, to find in the picture
    references = [[f"reference {i} one", f"reference {i} two", "a third one, not drawn"] for i in range(6)]
    generated = [f"generated caption number {i} " + "very " * 30 + "long" for i in range(6)]
    sizes = {}
    for count in (2, 4, 8):
        path = tmp_path / f"c{count}.png"
        pictures.caption_samples(str(path), images, references, generated, count=count)
        sizes[count] = _open(path).size
        assert sizes[count] == pictures.caption_boxes(6, count)["size"]
    assert sizes[2][0] < sizes[4][0] == sizes[8][0]  # up to 4 a row
    assert sizes[2][1] == sizes[4][1] < sizes[8][1]  # 8 asks for a second row (6 images: 4 + 2)
    assert len(pictures.caption_boxes(6, 8)["cells"]) == 6  # fewer images than count
    # The thumbnail (upscaled 32 → 96 px, NEAREST) sits in its cell: a pixel of image 0.
    left, top, _, _ = pictures.caption_boxes(6, 4)["cells"][0]
    x0 = left + (pictures.CELL_W - pictures.ROW_H) // 2 + pictures.FRAME
    im = _open(tmp_path / "c4.png")
    assert im.getpixel((x0, top + pictures.FRAME)) == (200, 30, 90)
    assert im.getpixel((x0 + pictures.THUMB - 1, top + pictures.FRAME + pictures.THUMB // 2 - 1)) == (200, 30, 90)
    assert im.getpixel((x0, top + pictures.FRAME + pictures.THUMB // 2)) != (200, 30, 90)
    assert sorted(os.listdir(tmp_path)) == ["c2.png", "c4.png", "c8.png"]


def test_panels_one_per_training_metric_and_one_per_evaluator():
    keys = ["step", "grad_norm", "loss", "eval/zeroshot/top1", "eval/zeroshot/top5", "examples_per_sec",
            "eval/retrieval/image_to_text_r@1", "caption_loss", "eval/old_metric", "eval/retrieval/text_to_image_r@1"]
    assert metrics.panels(keys) == [
        ("loss", ["loss"]),
        ("caption_loss", ["caption_loss"]),
        ("grad_norm", ["grad_norm"]),
        ("zeroshot", ["eval/zeroshot/top1", "eval/zeroshot/top5"]),
        ("retrieval", ["eval/retrieval/image_to_text_r@1", "eval/retrieval/text_to_image_r@1"]),
        ("eval/old_metric", ["eval/old_metric"]),
    ]
    three = ["eval/zeroshot/top1", "eval/zeroshot/top5", "eval/retrieval/image_to_text_r@1", "loss"]
    assert [title for title, _ in metrics.panels(three)] == ["loss", "zeroshot", "retrieval"]


def test_plot_curves_end_to_end(tmp_path):
    rows = []
    for step in range(1, 31):
        rows.append({"step": step, "loss": 5.0 / step, "examples_per_sec": 100.0})
        if step % 10 == 0:
            rows.append({"step": step, "eval/zeroshot/top1": step / 40, "eval/zeroshot/top5": step / 35,
                         "eval/retrieval/image_to_text_r@1": step / 50, "eval/captioning/cider": step / 10,
                         "eval/captioning/bleu4": None})
    path = tmp_path / "curves.png"
    metrics.plot_curves(rows, str(path))
    with Image.open(path) as im:
        assert im.size == (4 * 4 * 80, 3 * 80)  # 4 panels in one row at dpi 80
    assert os.listdir(tmp_path) == ["curves.png"]
