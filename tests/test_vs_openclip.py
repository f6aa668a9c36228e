"""mmjax.benchmarks.vs_openclip on a tiny CLIP: both frameworks build the same parameter count
and every measurement carries its fields (skipped without torch or open_clip_torch)."""
import pytest

from mmjax.benchmarks import vs_openclip
from mmjax.interop import torch_peer

pytestmark = pytest.mark.skipif(torch_peer.available() is not None, reason=str(torch_peer.available()))

FIELDS = {"framework", "variant", "model", "batch", "params", "step_seconds", "examples_per_sec", "device", "jax",
          "torch", "open_clip", "threads"}


_MODEL_CONFIG = vs_openclip.model_config


def tiny_config(name, batch):
    c = _MODEL_CONFIG("tiny_clip", batch)
    c.model.embed_dim = 16
    c.model.vision.update(dict(patch_size=8, width=32, depth=1, mlp_dim=128, heads=2))
    c.model.text.update(dict(width=32, depth=1, mlp_dim=128, heads=2))
    c.data.image_size, c.data.text_len = 16, 9
    return c


def test_one_step_each_same_parameter_count(monkeypatch):
    monkeypatch.setattr(vs_openclip, "model_config", tiny_config)
    rows = vs_openclip.compare("tiny_clip", batch=4, steps=1, warmup=1)
    assert [(r["framework"], r["variant"]) for r in rows] == [("mmjax", "float32"), ("open_clip", "f32")]
    assert rows[0]["params"] == rows[1]["params"] > 0
    for r in rows:
        assert FIELDS <= set(r) and r["step_seconds"] > 0
    assert "mmjax / this" in vs_openclip.table(rows)


def test_the_issue_tiny_clip_is_6_55m_parameters_in_open_clip():
    open_clip = torch_peer.open_clip()
    config = vs_openclip.model_config("tiny_clip", 128)
    model = open_clip.model.CLIP(**vs_openclip.open_clip_kwargs(config))
    assert sum(p.numel() for p in model.parameters()) == 6_549_505
