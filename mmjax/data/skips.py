"""Bad records are skipped and counted, never fatal, until there are too many.

Inside the pipeline (possibly in a grain worker process) `SkipCountingIterDataset` drops the
examples that preprocessing marked as skipped and attaches, to the next good example, how
many it dropped per reason and the last dropped key. Batching sums nothing: the counts ride
along as [B, R] arrays, so they survive worker processes and need no shared state. In the
trainer `SkipMonitor` adds them up, reports `data/skipped/<reason>`, and stops the run when
the skipped share of a window passes `data.max_bad_fraction`.
"""
from __future__ import annotations

import collections

import grain
import numpy as np

from mmjax.data.sources.base import SKIP_REASONS
from mmjax.errors import UserError

# A run whose records are all bad must stop instead of spinning forever inside the pipeline.
MAX_CONSECUTIVE_SKIPS = 10_000
# The bad share is judged over at least this many records: a few bad files side by side in
# one shard are no reason to stop a run.
MIN_WINDOW_RECORDS = 256


def skipped(reason: str, key: str) -> dict:
    """The marker preprocessing returns for a record it cannot use."""
    return {"skip": reason, "key": key}


class SkipCountingIterDataset(grain.IterDataset):
    def __iter__(self):
        return _SkipCountingIterator(self._parent.__iter__())


class _SkipCountingIterator(grain.DatasetIterator):
    def __next__(self) -> dict:
        counts = np.zeros(len(SKIP_REASONS), np.int32)
        last_key = ""
        while True:
            example = next(self._parent)
            if "skip" not in example:
                return {**example, "skipped": counts, "skipped_key": last_key}
            counts[SKIP_REASONS.index(example["skip"])] += 1
            last_key = example["key"]
            if counts.sum() >= MAX_CONSECUTIVE_SKIPS:
                raise UserError(
                    f"{counts.sum()} records in a row were skipped ({_describe(counts)}; e.g. {last_key!r}); "
                    "the data is unreadable: check the source spec and its files"
                )

    # Skips between the last returned example and a checkpoint are never pending: the
    # parent is only read ahead when the next example is asked for.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _describe(counts) -> str:
    return ", ".join(f"{r}: {int(n)}" for r, n in zip(SKIP_REASONS, counts) if n)


class SkipMonitor:
    """Totals per reason since this process started; the skipped share of each window of at
    least `min_window` records (spanning logging intervals until it is that long)."""

    def __init__(self, max_bad_fraction: float, min_window: int = MIN_WINDOW_RECORDS):
        self.max_bad_fraction = max_bad_fraction
        self.min_window = min_window
        self.totals = np.zeros(len(SKIP_REASONS), np.int64)
        self._since_log = _Counts()
        self._window = _Counts()
        self._recent_keys = collections.deque(maxlen=3)

    def update(self, batch: dict) -> None:
        counts = np.asarray(batch["skipped"]).sum(0)
        self.totals += counts
        for window in (self._since_log, self._window):
            window.add(counts, len(batch["skipped"]))
        for key in np.asarray(batch["skipped_key"]).tolist():
            if key:
                self._recent_keys.append(key)

    def metrics(self) -> dict[str, int]:
        return {f"data/skipped/{r}": int(n) for r, n in zip(SKIP_REASONS, self.totals) if n}

    def end_window(self) -> str:
        """At a log step: raise UserError if too much of a full window was bad. -> a console
        note on what was skipped since the last log step ("" if nothing)."""
        log, self._since_log = self._since_log, _Counts()
        note = f"skipped {log.bad}/{log.seen} records ({_describe(log.skipped)})" if log.bad else ""
        window = self._window
        if window.seen < self.min_window:
            return note
        self._window = _Counts()
        if window.bad / window.seen > self.max_bad_fraction:
            raise UserError(
                f"{window.bad} of the last {window.seen} training records were skipped ({_describe(window.skipped)}), "
                f"more than data.max_bad_fraction={self.max_bad_fraction}; e.g. {list(self._recent_keys)}. "
                "Fix or drop those files, or raise --config.data.max_bad_fraction"
            )
        return note


class _Counts:
    def __init__(self):
        self.skipped = np.zeros(len(SKIP_REASONS), np.int64)
        self.good = 0

    def add(self, skipped, good: int) -> None:
        self.skipped += skipped
        self.good += good

    @property
    def bad(self) -> int:
        return int(self.skipped.sum())

    @property
    def seen(self) -> int:
        return self.bad + self.good
