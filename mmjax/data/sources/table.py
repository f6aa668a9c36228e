"""`csv:FILE` and `jsonl:FILE`: a table with an image-path column and a caption column.

Columns: image = --config.data.image_key or the first of image/filepath/file/path; caption =
--config.data.text_key or the first of caption/title/text; an optional integer `label`.
Relative image paths are relative to the table's directory. A CSV is tab-separated when its
header has a tab (open_clip's default), else comma-separated. In JSONL the columns are those of
the first valid line, and a caption cell may also be a list of captions.

The whole table is read at open and kept as Python lists: about 150 bytes a row plus the text,
so ~2.5 GB for 10M rows in every process (grain workers get a pickled copy). Bigger sets belong
in webdataset or parquet shards.
"""
from __future__ import annotations

import csv
import itertools
import json
import os

from mmjax.data.sources import base
from mmjax.errors import UserError

IMAGE_COLUMNS = ("image", "filepath", "file", "path")
CAPTION_COLUMNS = ("caption", "title", "text")


class TableSource:
    def __init__(self, scheme: str, path: str, data_cfg):
        self.path, self.root = path, os.path.dirname(os.path.abspath(path))
        self.name = f"{scheme}:{path}"
        self.class_names = None  # a label column carries indices only
        self.images, self.captions, self.labels = [], [], []
        # row index -> (key, skip reason) for rows with no usable image cell or an unparsable line
        self.broken: dict[int, tuple[str, str]] = {}
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = _csv_rows(f) if scheme == "csv" else _jsonl_rows(f)
                self._read(rows, data_cfg)
        except FileNotFoundError:
            raise UserError(f"{self.name}: no such file; check the path") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{self.name}: not UTF-8 text ({e.reason}); "
                            "re-save it as UTF-8") from None
        if not self.images:
            raise UserError(f"{self.name}: the table has no rows")

    def _read(self, rows, data_cfg) -> None:
        """Fills the columns from (line number, row dict or None when unparsable) pairs."""
        image_col = caption_col = None
        has_label = False
        for line, row in rows:
            if row is not None and image_col is None:  # the first valid row fixes the columns
                image_col = base.pick_field(row, data_cfg.image_key, IMAGE_COLUMNS, "image_key", self.name)
                caption_col = base.pick_field(row, data_cfg.text_key, CAPTION_COLUMNS, "text_key", self.name)
                has_label = "label" in row
                if str(row[image_col]).startswith(("http://", "https://")):
                    raise UserError(f"{self.name}: the image column holds URLs, not files; download them "
                                    "first (img2dataset) and read the result with wds: or parquet:")
            if row is None or not row.get(image_col):
                reason = "missing_caption" if row is None else "missing_image"
                self.broken[len(self.images)] = (f"{self.path}:line {line}", reason)
                row = {}
            self.images.append(str(row.get(image_col, "")))
            self.captions.append(row.get(caption_col) or "")
            self.labels.append(self._label(row.get("label"), line) if has_label else -1)
        if self.images and image_col is None:
            raise UserError(f"{self.name}: no line is a JSON object; write one object per line")

    def _label(self, cell, line: int) -> int:
        try:
            return int(cell) if cell not in (None, "") else -1
        except (TypeError, ValueError):
            raise UserError(f"{self.path}:line {line}: label {cell!r} is not an integer; "
                            "fix the cell or drop the label column") from None

    def __len__(self) -> int:
        return len(self.images)

    def texts(self, limit: int) -> list:
        """The first captions of the caption column, without opening any image file."""
        cells = (cell if isinstance(cell, list) else [cell] for cell in self.captions)
        return list(itertools.islice((c.strip() for cell in cells for c in cell if c.strip()), limit))

    def __getitem__(self, index: int) -> dict:
        label = self.labels[index]
        if index in self.broken:
            key, reason = self.broken[index]
            return base.record(key, label=label, skip=reason)
        path = os.path.join(self.root, self.images[index])  # an absolute cell stays as it is
        cell = self.captions[index]
        captions = [c for c in cell if c] if isinstance(cell, list) else [cell] if cell else []
        if not captions:
            return base.record(path, label=label, skip="missing_caption")
        try:
            with open(path, "rb") as f:
                return base.record(path, f.read(), captions, label)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return base.record(path, None, captions, label, skip="missing_image")


def _csv_rows(f):
    header = f.readline()
    f.seek(0)
    reader = csv.DictReader(f, delimiter="\t" if "\t" in header else ",")
    for row in reader:
        yield reader.line_num, row


def _jsonl_rows(f):
    """A malformed line is kept as an unusable row (counted as missing_caption downstream), so
    one bad line among millions is reported in the skip counts instead of ending the run."""
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        yield line, row if isinstance(row, dict) else None


def open_source(scheme: str, argument: str, data_cfg) -> TableSource:
    return TableSource(scheme, os.path.expanduser(argument), data_cfg)
