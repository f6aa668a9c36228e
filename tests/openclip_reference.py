"""open_clip, imported for parity tests only (pytest.skip when torch or open_clip is absent).

The torchvision stand-in open_clip needs beside a CPU-only torch lives in
mmjax.interop.torch_peer, shared with mmjax.benchmarks.vs_openclip.
"""
import pytest

from mmjax.interop import torch_peer


def open_clip():
    """The open_clip package (skips the test without torch or open_clip_torch)."""
    missing = torch_peer.available()
    if missing:
        pytest.skip(missing)
    return torch_peer.open_clip()
