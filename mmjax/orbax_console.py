"""Orbax's failures as one line each: what keeps its tracebacks off the console.

A failed read or write of one array makes orbax return while its other reads and writes of
that step are still in flight; each then surfaces on its own as a traceback, hundreds of
lines in all. The Checkpointer reports the failure in one line (`one_line`, `os_error`) and
these filters drop exactly those leftovers.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import traceback

import orbax.checkpoint as ocp

_ORBAX_DIR = os.path.dirname(ocp.__file__)


class QuietOrbax(logging.Filter):
    """Keeps orbax's log tracebacks off the console while this Checkpointer is open: every
    failure they describe reaches the user as one line (a warning or RunStopped). Inside
    `muted()` (listing steps, restoring, closing) orbax's other records are dropped too.
    Other loggers, and orbax after close(), are untouched."""

    def __init__(self):
        super().__init__()
        self._muted = 0
        logging.getLogger("absl").addFilter(self)  # orbax logs through absl.logging

    def filter(self, record):
        return not record.pathname.startswith(_ORBAX_DIR) or not (self._muted or record.exc_info)

    @contextlib.contextmanager
    def muted(self):
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    def remove(self):
        logging.getLogger("absl").removeFilter(self)


class _AbandonedOrbaxWork(logging.Filter):
    """asyncio's "... exception was never retrieved" for an orbax task (its traceback runs
    through orbax) or a tensorstore future (an error set from C++ and never raised, so no
    traceback, with a status-code message such as "OUT_OF_RANGE: ...")."""

    def filter(self, record):
        if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
            return True
        error = record.exc_info[1]
        if error.__traceback__ is None:
            return not re.match(r"[A-Z_]+: ", str(error))
        frames = traceback.walk_tb(error.__traceback__)
        return not any(frame.f_code.co_filename.startswith(_ORBAX_DIR) for frame, _ in frames)


def silence_async_leftovers() -> None:
    """A failed read or write returns while orbax's other reads or writes of that step are
    still in flight, and orbax closes the event loop it ran them on. Each then surfaces on
    its own, seconds later (after the one-line report, even after close), as a traceback:
    - tensorstore's completion callback finds the loop closed: RuntimeError("Event loop is
      closed") through sys.unraisablehook;
    - the abandoned orbax coroutine, closed when collected, turns GeneratorExit into an
      Exception (its `except BaseException`): "Exception ignored in: <coroutine ...>";
    - the collected task or future logs "... exception was never retrieved" (asyncio logger);
    one per array: hundreds of lines. They are harmless, so from the first Checkpointer on
    exactly those are dropped; everything else still reaches the hook and the logger."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedOrbaxWork) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedOrbaxWork())
    if getattr(sys.unraisablehook, "drops_orbax_async_leftovers", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_async_leftover(unraisable):
            previous(unraisable)

    hook.drops_orbax_async_leftovers = True
    sys.unraisablehook = hook


def _is_async_leftover(unraisable) -> bool:
    if unraisable.object is None:  # tensorstore's completion callback
        exc = unraisable.exc_value
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and code.co_filename.startswith(_ORBAX_DIR)


def one_line(error: BaseException) -> str:
    """The innermost message of an explicit `raise ... from` chain, as one short line:
    tensorstore's status line without its JSON spec payloads."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = re.split(r" \[[\w ]+(?:\[\d+\])?='", text)[0]  # [tensorstore_spec='{...}'], [source locations='...']
    text = re.sub(r'(Error opening "\w+" driver: )+', "", text)
    return text if re.match(r"[A-Z_]+: ", text) else f"{type(error).__name__}: {text}".rstrip(": ")


def os_error(error: BaseException) -> str | None:
    """'No space left on device (ENOSPC)' if an OS error is behind `error`: a Python OSError,
    or tensorstore's `[os_error_code=28]` inside a ValueError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        match = re.search(r"os_error_code='?(\d+)", str(error))
        code = code or (int(match[1]) if match else None)
        if code:
            return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
        error = error.__cause__ or error.__context__
    return None
