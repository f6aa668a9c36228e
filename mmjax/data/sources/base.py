"""What every data source gives the pipeline: raw records, read either by index or as streams.

A raw record is a dict:
  key       str: names the record in error messages and skip reports (file path, tar key, ...)
  image     bytes (an encoded image file), or uint8 [H, W, 3] (already decoded), or None (missing)
  captions  list of str or bytes (bytes are decoded as UTF-8 later); may be empty
  label     int: class index for classification sets, -1 when there is none
  skip      str: "" when the record is usable, else a reason from SKIP_REASONS that
            only the source can see (a key split across shards, a truncated tar member, ...)

Decoding, cropping and tokenizing happen in one later stage (mmjax.data.preprocess), so a
source only reads. Two kinds:
  RandomAccessSource: __len__ and a thread-safe __getitem__ (shapes, tfds, csv/jsonl, folder);
      the pipeline shuffles indices, repeats and slices them per process.
      A source that can list its captions without reading images also has texts(limit).
  StreamSource: a list of shards and a grain IterDataset per shard whose iterator state is
      exact (webdataset tars: the byte offset of the next member; parquet: the row); the
      pipeline shuffles the shard order per epoch, slices it per process and interleaves.
"""
from __future__ import annotations

from typing import Collection, Protocol, Sequence, runtime_checkable

import grain

from mmjax.errors import UserError

# Why a record was skipped: the keys of `data/skipped/<reason>` in metrics.jsonl.
SKIP_REASONS = (
    "undecodable_image",  # truncated or corrupt image bytes, an unknown format
    "not_an_image",  # e.g. an HTML error page saved as .jpg
    "decompression_bomb",  # more pixels than data.max_image_pixels
    "missing_image",  # no image member / column / file
    "missing_caption",  # no caption member / column
    "empty_caption",  # a caption that is only whitespace
    "bad_utf8",  # caption bytes that are not UTF-8
    "split_key",  # a webdataset key whose members span two shards
    "truncated_shard",  # a tar that ends mid-member
)


def record(key: str, image=None, captions=(), label: int = -1, skip: str = "") -> dict:
    """A raw record with every field present (grain stages and tests rely on the full set)."""
    return {"key": key, "image": image, "captions": list(captions), "label": int(label), "skip": skip}


def pick_field(present: Collection[str], chosen: str, defaults: Sequence[str], option: str, where: str,
               required: bool = True) -> str | None:
    """The column / feature to read: `chosen` (the value of --config.data.<option>) if set, else
    the first of `defaults` in `present`. A field the user named must exist; a default-only
    field may be absent (None) when not `required`."""
    names = [chosen] if chosen else list(defaults)
    for name in names:
        if name in present:
            return name
    if chosen or required:
        found = ", ".join(sorted(map(str, present))) or "none"
        raise UserError(f"{where} has no field {' or '.join(map(repr, names))} (it has: {found}); "
                        f"name the right one with --config.data.{option}=NAME")
    return None


@runtime_checkable
class RandomAccessSource(Protocol):
    name: str  # the spec it was opened from, e.g. "csv:/data/train.csv"
    class_names: Sequence[str] | None  # for classification sets (folder:, tfds cifar10, shapes)

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


@runtime_checkable
class StreamSource(Protocol):
    name: str
    class_names: Sequence[str] | None
    shards: Sequence[str]  # sorted, so every process sees the same list

    def shard_dataset(self, shard: str) -> grain.IterDataset:
        """The raw records of one shard, in file order, with exact get_state/set_state."""
        ...
