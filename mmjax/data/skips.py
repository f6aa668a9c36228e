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
    """Totals per reason since this process started, and the share skipped per window."""

    def __init__(self, max_bad_fraction: float):
        self.max_bad_fraction = max_bad_fraction
        self.totals = np.zeros(len(SKIP_REASONS), np.int64)
        self._window = np.zeros(len(SKIP_REASONS), np.int64)
        self._window_good = 0
        self._recent_keys = collections.deque(maxlen=3)

    def update(self, batch: dict) -> None:
        counts = np.asarray(batch["skipped"]).sum(0)
        self.totals += counts
        self._window += counts
        self._window_good += len(batch["skipped"])
        for key in np.asarray(batch["skipped_key"]).tolist():
            if key:
                self._recent_keys.append(key)

    def metrics(self) -> dict[str, int]:
        return {f"data/skipped/{r}": int(n) for r, n in zip(SKIP_REASONS, self.totals) if n}

    def end_window(self) -> str:
        """Close the window; raise UserError if too much of it was bad. -> a console note ("" if clean)."""
        bad = int(self._window.sum())
        seen = bad + self._window_good
        note = f"skipped {bad}/{seen} records ({_describe(self._window)})" if bad else ""
        if seen and bad / seen > self.max_bad_fraction:
            raise UserError(
                f"{bad} of the last {seen} training records were skipped ({_describe(self._window)}), "
                f"more than data.max_bad_fraction={self.max_bad_fraction}; e.g. {list(self._recent_keys)}. "
                "Fix or drop those files, or raise --config.data.max_bad_fraction"
            )
        self._window[:] = 0
        self._window_good = 0
        return note
