"""Convert parameters between the unrolled and the scanned layer layouts.

`layers.Transformer(scan=False)` names its blocks "block0".."block{n-1}"; with `scan=True`
the same weights live under one "blocks" entry, each stacked on a leading `layers` axis.
The two are the same model: `stack_blocks(unroll_blocks(p)) == p`. Works on any nested
dict of arrays (parameters, or optimizer moments shaped like them).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from mmjax.models.layers import SCANNED_BLOCKS

_BLOCK = re.compile(r"block(\d+)$")


def unroll_blocks(tree):
    """Scanned layout -> unrolled: every "blocks" stack becomes block0..block{n-1}."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for name, sub in tree.items():
        if name == SCANNED_BLOCKS:
            depth = jax.tree.leaves(sub)[0].shape[0]
            for i in range(depth):
                out[f"block{i}"] = jax.tree.map(lambda x, i=i: x[i], sub)
        else:
            out[name] = unroll_blocks(sub)
    return out


def stack_blocks(tree):
    """Unrolled layout -> scanned: block0..block{n-1} are stacked into one "blocks" entry."""
    if not isinstance(tree, dict):
        return tree
    blocks = sorted((int(m.group(1)), name) for name in tree if (m := _BLOCK.match(name)))
    if blocks and [i for i, _ in blocks] != list(range(len(blocks))):
        raise ValueError(f"blocks are not numbered 0..{len(blocks) - 1}: {[name for _, name in blocks]}")
    out = {name: stack_blocks(sub) for name, sub in tree.items() if not _BLOCK.match(name)}
    if blocks:
        out[SCANNED_BLOCKS] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[name] for _, name in blocks))
    return out
