"""`wds:PATTERN`: img2dataset webdataset tar shards, streamed member by member.

A shard is a tar whose consecutive members sharing a key form one sample: `dir/000123.jpg`
and `dir/000123.txt` have key `dir/000123` (the path up to the first dot of the basename)
and extensions `jpg` and `txt` (everything after that dot, lowercased). Only image and
`txt` members are read; every other member (json, unknown extensions, directories, links)
is skipped without reading its bytes and does not break a group.
"""
from __future__ import annotations

import dataclasses
import os
import tarfile

import grain

from mmjax.data.sources import base
from mmjax.data.sources.patterns import expand_pattern

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
CAPTION_EXTENSION = "txt"
_WANTED = frozenset(IMAGE_EXTENSIONS + (CAPTION_EXTENSION,))
_BLOCK = tarfile.BLOCKSIZE


def split_name(name: str) -> tuple[str, str] | None:
    """"dir/000123.JPG" -> ("dir/000123", "jpg"); None for a basename without a key or extension."""
    directory, _, basename = name.rpartition("/")
    stem, dot, extension = basename.partition(".")
    if not stem or not dot or not extension:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


class _Broken(Exception):
    """The shard cannot be read past here (cut mid-member, or a corrupt header)."""

    def __init__(self, key: str | None, offset: int):
        super().__init__(key, offset)
        self.key = key  # of the last member whose header was read, if any
        self.offset = offset  # a restore from this byte breaks the same way again


@dataclasses.dataclass
class _Member:
    key: str
    extension: str
    offset: int  # where its header starts (its pax / GNU long-name header, if any)
    data: bytes


class _TarShardIterator(grain.DatasetIterator):
    """Raw records of one tar; state {"offset": header offset of the next sample's first
    member (the file size once finished), "index": records yielded so far}, so a restore
    re-reads from that byte. Bad data never raises: it becomes skip reasons (see _sample)
    and at most one final truncated_shard record."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path
        self._file = None
        self._seek(0, 0)

    def _seek(self, offset: int, index: int) -> None:
        self._close_file()
        self._offset, self._index = offset, index
        # The first member of the next sample (or the break after this one), already read.
        self._lookahead: _Member | _Broken | None = None
        self._last = _Broken(None, offset)  # where a failure from here on is reported
        self._file = open(self._path, "rb")
        self._size = os.fstat(self._file.fileno()).st_size
        self._done = offset >= self._end()
        if self._done:
            self._close_file()
        else:
            self._file.seek(offset)
        self._tar = None  # opened lazily so a bad header there becomes a record, not an error

    def _end(self) -> int:
        """A finished shard's state offset; past 0 so that an empty file is read (and reported) once."""
        return max(self._size, 1)

    def _next_member(self) -> _Member | None:
        """The next image or caption member, or None at a clean end of the archive."""
        if isinstance(self._lookahead, _Broken):
            raise self._lookahead
        if self._lookahead is not None:
            member, self._lookahead = self._lookahead, None
            return member
        try:
            if self._tar is None:
                self._tar = tarfile.open(fileobj=self._file, mode="r:")
            while (info := self._tar.next()) is not None:
                # TarFile remembers every member it has read; forget them so memory stays flat.
                self._tar.members.clear()
                parts = split_name(info.name) if info.isreg() else None
                # A member cut short fails on its read, or on the next header: both blame it.
                self._last = _Broken(parts and parts[0], info.offset)
                if parts and parts[1] in _WANTED:
                    if info.offset_data + info.size > self._size:  # cut short: don't allocate its size
                        raise self._last
                    return _Member(*parts, info.offset, self._tar.extractfile(info).read())
        except tarfile.TarError as e:
            raise self._last from e
        # tarfile also returns None for a corrupt header past the first member: only an empty
        # or all-zero block (the end-of-archive marker) is a clean end.
        self._file.seek(self._tar.offset)
        if self._file.read(_BLOCK).strip(b"\0"):
            raise _Broken(None, self._tar.offset)
        return None

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._done:
            raise StopIteration
        key, members = None, {}
        while True:
            try:
                member = self._next_member()
            except _Broken as broken:
                if key is not None and broken.key != key:  # the break is past this sample: yield it first
                    self._lookahead, self._offset = broken, broken.offset
                    return self._emit(self._sample(key, members, at_end=False))
                self._finish()
                return self._emit(
                    base.record(broken.key or f"{self._path}@{broken.offset}", skip="truncated_shard")
                )
            if member is None:
                self._finish()
                if key is None:
                    raise StopIteration
                return self._emit(self._sample(key, members, at_end=True))
            if key is not None and member.key != key:
                self._lookahead, self._offset = member, member.offset
                return self._emit(self._sample(key, members, at_end=False))
            key = member.key
            members.setdefault(member.extension, member.data)

    def _sample(self, key: str, members: dict, at_end: bool) -> dict:
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        caption = members.get(CAPTION_EXTENSION)
        skip = ""
        # A sample whose members span two shards shows up as a first sample without its image
        # and a last sample without its caption; one shard alone cannot tell that apart from a
        # really missing member, so those two positions count as split_key.
        if image is None:
            skip = "split_key" if self._index == 0 else "missing_image"
        elif caption is None:
            skip = "split_key" if at_end else "missing_caption"
        return base.record(key, image, [] if caption is None else [caption], skip=skip)

    def _emit(self, record: dict) -> dict:
        self._index += 1
        return record

    def _finish(self) -> None:
        """Stop the shard; the state then says so."""
        self._done = True
        self._offset = self._end()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def get_state(self) -> dict:
        return {"offset": self._offset, "index": self._index}

    def set_state(self, state: dict) -> None:
        self._seek(int(state["offset"]), int(state["index"]))

    def close(self) -> None:
        self._close_file()
        super().close()

    def __str__(self) -> str:
        return f"TarShardIterator({self._path})"


class TarShardDataset(grain.IterDataset):
    """The raw records of one webdataset tar, in file order. Holds only the path (picklable)."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def __iter__(self) -> _TarShardIterator:
        return _TarShardIterator(self._path)

    def __str__(self) -> str:
        return f"TarShardDataset({self._path})"


@dataclasses.dataclass
class WebDatasetSource:
    """A StreamSource over webdataset tars (mmjax.data.sources.base)."""

    name: str
    shards: list[str]
    class_names = None

    def shard_dataset(self, shard: str) -> TarShardDataset:
        return TarShardDataset(shard)


def open_source(scheme: str, argument: str, data_cfg) -> WebDatasetSource:
    """The registry hook: `wds:PATTERN` -> a source over the matching tars."""
    del data_cfg  # nothing to configure: the member extensions are fixed by img2dataset
    return WebDatasetSource(name=f"{scheme}:{argument}", shards=expand_pattern(argument, scheme))
