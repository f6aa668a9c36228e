"""`parquet:PATTERN`: img2dataset (and Hugging Face style) parquet files, streamed by row.

grain's ParquetIterDataset reads every column of a whole row group at once (the image
bytes of columns we do not use included), so this reads only the image, caption and key
columns, a small batch at a time, with state {"row_group", "row"}.
"""
from __future__ import annotations

import collections
import dataclasses

import grain
import pyarrow as pa
import pyarrow.parquet as pq

from mmjax.data.sources import base
from mmjax.data.sources.patterns import expand_pattern
from mmjax.errors import UserError

IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp")  # tried in order when data.image_key is ""
CAPTION_COLUMNS = ("caption", "txt", "text", "title")  # tried in order when data.text_key is ""
KEY_COLUMN = "key"
_BATCH_ROWS = 64  # rows decoded at once: bounds memory whatever the row-group size


def _image(value):
    """Image bytes from a binary cell or a struct with a `bytes` field (the HF Image feature)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes) else None


def _captions(value) -> list | None:
    """A str/bytes cell or a list of them -> a list; None when the cell is null."""
    if value is None:
        return None
    if isinstance(value, list):
        return [v for v in value if v is not None]
    return [value]


class _ParquetShardIterator(grain.DatasetIterator):
    """Raw records of one parquet file; state {"row_group": g, "row": rows of g yielded}
    (row_group -1 once an unreadable part stopped the file)."""

    def __init__(self, path: str, image_column: str, caption_column: str):
        super().__init__()
        self._path, self._image_column, self._caption_column = path, image_column, caption_column
        self._file = None
        self._seek(0, 0)

    def _seek(self, row_group: int, row: int) -> None:
        self._close_file()
        self._row_group, self._row = row_group, row
        self._to_skip = row  # rows of this row group already yielded before a restore
        self._batches = None  # the current row group's batches
        self._rows = collections.deque()  # decoded rows of the current batch, not yet yielded
        self._done = row_group < 0  # -1: stopped at an unreadable part of the file

    def _open(self) -> None:
        self._file = pq.ParquetFile(self._path)
        names = set(self._file.schema_arrow.names)
        # A file that lacks a column gives null cells, so its rows count as missing_*.
        self._columns = list(dict.fromkeys(
            c for c in (self._image_column, self._caption_column, KEY_COLUMN) if c in names
        ))
        metadata = self._file.metadata
        self._first_rows = [0]  # file row index of each row group's first row
        for g in range(metadata.num_row_groups):
            self._first_rows.append(self._first_rows[-1] + metadata.row_group(g).num_rows)

    def _fill(self) -> bool:
        """Decode rows until one is waiting; False at the end of the file."""
        if self._file is None:
            self._open()
        while not self._rows:
            if self._batches is None:
                if self._row_group >= self._file.num_row_groups:
                    return False
                self._batches = self._file.iter_batches(
                    batch_size=_BATCH_ROWS, row_groups=[self._row_group], columns=self._columns
                )
            batch = next(self._batches, None)
            if batch is None:
                self._batches, self._row_group, self._row, self._to_skip = None, self._row_group + 1, 0, 0
                continue
            skipped = min(self._to_skip, batch.num_rows)
            self._to_skip -= skipped
            self._rows.extend(batch.slice(skipped).to_pylist())
        return True

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._done:
            raise StopIteration
        try:
            has_row = self._fill()
        except (pa.ArrowException, OSError):  # a corrupt or cut file: report it, don't stop the run
            key = f"{self._path}#{self._row_group}/{self._row}"
            self._seek(-1, 0)
            return base.record(key, skip="truncated_shard")
        if not has_row:
            self._done = True
            self._close_file()
            raise StopIteration
        row = self._rows.popleft()
        index = self._first_rows[self._row_group] + self._row
        self._row += 1
        key = row.get(KEY_COLUMN)
        image, captions = _image(row.get(self._image_column)), _captions(row.get(self._caption_column))
        skip = "missing_image" if image is None else "missing_caption" if captions is None else ""
        return base.record(
            f"{self._path}#{index}" if key is None else str(key), image, captions or [], skip=skip
        )

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def get_state(self) -> dict:
        return {"row_group": self._row_group, "row": self._row}

    def set_state(self, state: dict) -> None:
        self._seek(int(state["row_group"]), int(state["row"]))

    def close(self) -> None:
        self._close_file()
        super().close()

    def __str__(self) -> str:
        return f"ParquetShardIterator({self._path})"


class ParquetShardDataset(grain.IterDataset):
    """The raw records of one parquet file, in row order. Holds only names (picklable)."""

    def __init__(self, path: str, image_column: str, caption_column: str):
        super().__init__()
        self._path, self._image_column, self._caption_column = path, image_column, caption_column

    def __iter__(self) -> _ParquetShardIterator:
        return _ParquetShardIterator(self._path, self._image_column, self._caption_column)

    def __str__(self) -> str:
        return f"ParquetShardDataset({self._path})"


@dataclasses.dataclass
class ParquetSource:
    """A StreamSource over parquet files (mmjax.data.sources.base)."""

    name: str
    shards: list[str]
    image_column: str
    caption_column: str
    class_names = None

    def shard_dataset(self, shard: str) -> ParquetShardDataset:
        return ParquetShardDataset(shard, self.image_column, self.caption_column)


def open_source(scheme: str, argument: str, data_cfg) -> ParquetSource:
    """The registry hook: `parquet:PATTERN` -> a source over the matching files.

    The columns are picked from the first file's schema (reading every footer would be slow
    on thousands of remote files); a later file without them yields missing_* records.
    """
    shards = expand_pattern(argument, scheme)
    try:
        names = pq.read_schema(shards[0]).names
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read the parquet schema of {shards[0]}: {e}; is it a parquet file?") from None
    where = f"parquet file {shards[0]}"
    return ParquetSource(
        name=f"{scheme}:{argument}",
        shards=shards,
        image_column=base.pick_field(names, data_cfg.image_key, IMAGE_COLUMNS, "image_key", where),
        caption_column=base.pick_field(names, data_cfg.text_key, CAPTION_COLUMNS, "text_key", where),
    )
