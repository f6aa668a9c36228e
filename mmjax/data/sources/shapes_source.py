"""`shapes[:train|eval]`: the embedded procedural dataset (mmjax.data.shapes) as raw records."""
from __future__ import annotations

from mmjax.data import shapes
from mmjax.data.sources import base
from mmjax.errors import UserError

# Examples are generated from their index, so a split's size costs nothing; train is large
# enough that no run repeats it, eval small enough to score in seconds.
NUM_EXAMPLES = {"train": 1_000_000, "eval": 10_000}


class ShapesRecords:
    def __init__(self, split: str, image_size: int):
        try:
            self._shapes = shapes.ShapesSource(split, NUM_EXAMPLES[split], image_size, seed=0)
        except ValueError as e:  # image_size too small to draw legible shapes
            raise UserError(f"shapes: {e}; set --config.data.image_size to 24 or more") from None
        self.split = split
        self.name = f"shapes:{split}"
        self.class_names = shapes.CLASS_NAMES
        self.zeroshot_prompts = [shapes.zeroshot_prompts(c) for c in range(len(shapes.CLASS_NAMES))]

    def texts(self, limit: int) -> list[str]:
        """Every caption the grammar can produce: what its tokenizer is trained on."""
        return shapes.all_texts()[:limit]

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, index: int) -> dict:
        example = self._shapes[index]
        return base.record(f"shapes:{self.split}#{index}", example["image"], [example["caption"]],
                           example["label"])


def open_source(scheme: str, argument: str, data_cfg) -> ShapesRecords:
    split = argument or "train"
    if split not in NUM_EXAMPLES:
        raise UserError(f"unknown shapes split {split!r}; valid splits: {', '.join(NUM_EXAMPLES)} (e.g. shapes:eval)")
    return ShapesRecords(split, data_cfg.image_size)
