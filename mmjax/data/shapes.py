"""Procedural image–caption data: scenes of coloured shapes, generated from an index.

Each image shows `count` copies of ONE (colour, shape) kind, all of one size, in
distinct cells of a 3×3 grid (with jitter), on a dark noisy background. The caption
("two small red circles") is a pure function of (count, size, colour, shape), so
exact-match captioning is possible, and the label (colour, shape) gives 24 zero-shot
classes. No files: example i of a split comes from its own RNG stream
`default_rng([seed, split_id, i])`, so any index is reproducible in isolation and the
train and eval splits never share a stream.
"""
from __future__ import annotations

import functools

import numpy as np

COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta")
SHAPES = ("circle", "square", "triangle", "cross")
COUNTS = (1, 2, 3)
SIZES = ("small", "large")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # label = color * len(SHAPES) + shape

_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Saturated primaries/secondaries, far apart in RGB even after jitter. Channel values in
# [40, 225] keep fill ± 20 jitter ± 10 noise inside [0, 255], so no clipping is needed.
_RGB = np.array(
    [(225, 40, 40), (40, 210, 40), (50, 80, 225), (225, 215, 40), (40, 210, 220), (215, 50, 215)],
    np.float32)
_SPLITS = {"train": 0, "eval": 1}
_GRID = 3
_DIAMETER = {0: 0.55, 1: 0.8}  # object extent as a fraction of a grid cell, per size
_MARGIN_PX = 1.0  # objects stay this far inside their cell, so neighbours never touch


def caption(count: int, size: int, color: int, shape: int) -> str:
    noun = SHAPES[shape] if count == 1 else _PLURALS[SHAPES[shape]]
    return f"{_COUNT_WORDS[count]} {SIZES[size]} {COLORS[color]} {noun}"


def label_of(color: int, shape: int) -> int:
    return color * len(SHAPES) + shape


def zeroshot_prompts(label: int) -> list[str]:
    color, shape = divmod(label, len(SHAPES))
    return [caption(n, z, color, shape) for n in COUNTS for z in range(len(SIZES))]


def all_texts() -> list[str]:
    return [p for label in range(len(CLASS_NAMES)) for p in zeroshot_prompts(label)]


@functools.lru_cache(maxsize=None)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    return yy, xx


def _shape_masks(shape: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean masks [k, H, W] for k objects; dy, dx are offsets from each centre."""
    ay, ax = np.abs(dy), np.abs(dx)
    if SHAPES[shape] == "circle":
        return dy * dy + dx * dx <= r * r
    if SHAPES[shape] == "square":
        return np.maximum(ay, ax) <= 0.8 * r  # area close to the circle's
    if SHAPES[shape] == "triangle":  # apex up: half-width grows linearly from 0 to r
        return (dy <= r) & (ax <= (dy + r) * 0.5)
    arm = 0.34 * r  # cross: two bars of half-width `arm`
    return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))


def render(rng: np.random.Generator, image_size: int, count: int, size: int, color: int,
           shape: int) -> np.ndarray:
    """Draws one scene as uint8 [H, W, 3]."""
    cell = image_size / _GRID
    r = _DIAMETER[size] * cell / 2
    slack = max(cell / 2 - r - _MARGIN_PX, 0.0)
    cells = rng.permutation(_GRID * _GRID)[:count]
    centre = (np.stack(divmod(cells, _GRID), -1) + 0.5) * cell + rng.uniform(-slack, slack, (count, 2))
    yy, xx = _pixel_centres(image_size)
    centre = centre.astype(np.float32)[:, :, None, None]
    mask = _shape_masks(shape, yy - centre[:, 0], xx - centre[:, 1], r).any(0)[..., None]
    background = rng.uniform(10, 40, 3).astype(np.float32)
    fill = _RGB[color] + rng.uniform(-20, 20, 3).astype(np.float32)
    noise = rng.random((image_size, image_size, 3), dtype=np.float32) * 20 - 10  # mild, uniform
    return (np.where(mask, fill, background) + noise).astype(np.uint8)


class ShapesSource:
    """grain random-access source of shape scenes; example i depends only on (seed, split, i)."""

    def __init__(self, split: str, num_examples: int, image_size: int = 32, seed: int = 0):
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {sorted(_SPLITS)}")
        if image_size < 24:
            raise ValueError(f"image_size must be >= 24 for shapes to stay legible, got {image_size}")
        self.split, self.num_examples, self.image_size, self.seed = split, num_examples, image_size, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        count_index, size, color, shape = rng.integers((len(COUNTS), len(SIZES), len(COLORS), len(SHAPES)))
        count = COUNTS[count_index]
        return {
            "image": render(rng, self.image_size, count, size, color, shape),
            "caption": caption(count, size, color, shape),
            "label": np.int32(label_of(color, shape)),
            "count": np.int32(count),
            "size": np.int32(size),
            "color": np.int32(color),
            "shape": np.int32(shape),
        }

    def __repr__(self) -> str:
        return (f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
                f"image_size={self.image_size}, seed={self.seed})")
