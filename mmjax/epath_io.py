"""Workdir files that may be local or under a URL (--workdir=gs://bucket/run), through etils.epath."""
from __future__ import annotations

import contextlib
import os
import tempfile

from etils import epath

from mmjax.errors import ConfigError


def is_remote(path) -> bool:
    """gs://, s3:// ...: an object store, where a file cannot be appended to and rename is not atomic."""
    return "://" in os.fspath(path)


def absolute(path: str) -> str:
    """A local path made absolute (~ expanded), so messages say where; a URL as it is (abspath
    would turn gs://bucket/run into a local directory named "gs:")."""
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def check_filesystem(path: str) -> None:
    """A URL whose scheme needs a package that is not installed (gcsfs for gs://) is one line
    naming the install, before anything reads or writes there."""
    try:
        epath.Path(path).exists()
    except ImportError as e:
        raise ConfigError(f"{path} needs a filesystem package ({e}); for gs:// run pip install -e '.[gcs]' "
                          "(gcsfs, google-cloud-storage), for s3:// pip install s3fs") from None


def write_atomic(path, data: bytes) -> None:
    """Locally: a temporary file beside `path`, fsynced, then renamed over it, so a crash leaves the
    old file or the new one, never half a file. Remotely: written directly, since an object store
    publishes an object only when its upload completes, and not every store can rename."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
