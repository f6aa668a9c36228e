"""Shard lists from path patterns: brace expansion, then globs (shared by wds: and parquet:)."""
from __future__ import annotations

import glob
import os

import braceexpand

from mmjax.errors import UserError

_GLOB_EXAMPLE = {"wds": "*.tar", "parquet": "*.parquet"}


def expand_pattern(pattern: str, scheme: str) -> list[str]:
    """The sorted, de-duplicated files that `pattern` names, e.g. "/d/{00000..00331}.tar" or "/d/*.tar".

    Raises UserError when nothing matches, so a typo fails at startup and not mid-run.
    """
    fix = (
        f"check the path (brace ranges like {{00000..00099}}, lists like {{a,b}} and globs like "
        f"{_GLOB_EXAMPLE.get(scheme, '*')} are expanded)"
    )
    try:
        pieces = list(braceexpand.braceexpand(os.path.expanduser(pattern)))
    except braceexpand.UnbalancedBracesError:
        raise UserError(f"{scheme} pattern {pattern!r} has unbalanced braces; {fix}") from None
    files = {path for piece in pieces for path in glob.glob(piece) if os.path.isfile(path)}
    if not files:
        raise UserError(f"{scheme} pattern {pattern!r} matches no file; {fix}")
    return sorted(files)
