"""jax's persistent compilation cache: a resumed or repeated run loads its train step from
disk instead of compiling it again.

`config.compilation_cache`: "user" ($XDG_CACHE_HOME, else ~/.cache, then /mmjax/xla) |
"workdir" (<workdir>/xla_cache) | "off" | a directory.
"""
from __future__ import annotations

import collections
import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

# jax.monitoring events: a compile answered from the cache, and an entry written to it
# (jax names the write "cache_misses": it records one only when it writes).
HIT = "/jax/compilation_cache/cache_hits"
WRITE = "/jax/compilation_cache/cache_misses"


def directory(setting: str, workdir: str) -> str | None:
    """Where `setting` keeps compiled programs; None for "off"."""
    if setting == "off":
        return None
    if setting == "user":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "mmjax", "xla")
    if setting == "workdir":
        return os.path.join(workdir, "xla_cache")
    return os.path.expanduser(setting)


def unsupported(devices) -> str | None:
    """Why the cache must stay off for a run on `devices`, or None when it can be used."""
    devices = list(devices)
    if len(devices) > 1 and devices[0].platform == "cpu":
        # Seen with jax 0.10.2 on 8 simulated CPU devices: the train step loaded from the cache
        # stops in an all-reduce rendezvous ("only 7 of 8 threads arrived") and aborts the run.
        return "jax's CPU programs loaded from it can deadlock in collectives across several devices"
    return None


@contextlib.contextmanager
def use(setting: str, workdir: str):
    """Within: jax's persistent cache is `setting`'s directory (yielded; None: off). After:
    whatever it was before, so a run leaves the process as it found it."""
    previous = jax.config.jax_compilation_cache_dir
    path = directory(setting, workdir)
    _point_at(path)
    try:
        yield path
    finally:
        _point_at(previous)


def _point_at(path: str | None) -> None:
    if path == jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # jax opens its cache once per process, at the first compile after a directory is set,
    # and keeps using that one whatever the setting says later, until the cache is reset.
    jax_cache.reset_cache()


class Watch:
    """Within: compiles are written to the cache however quickly they finish (jax's default
    skips those under a second: a small model's step on a fast chip, which a restarted
    run would still rather load), and the cache's hits and writes are counted."""

    def __init__(self):
        self.events = collections.Counter()

    def _listen(self, event: str, **kwargs) -> None:
        self.events[event] += 1

    def __enter__(self):
        self._min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.monitoring.register_event_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._listen)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", self._min_seconds)

    @property
    def hit(self) -> bool:
        return self.events[HIT] > 0

    @property
    def written(self) -> bool:
        return self.events[WRITE] > 0
