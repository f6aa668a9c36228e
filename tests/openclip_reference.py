"""open_clip, imported for parity tests only (pytest.skip when torch or open_clip is absent).

open_clip imports torchvision for its image transforms and a frozen-BatchNorm helper, which
building and running its ViT/text/CoCa models never touches. PyPI's torchvision fails to
import beside a CPU-only torch wheel ("operator torchvision::nms does not exist"), so when
torchvision cannot be imported, a stand-in module whose every attribute refuses to be used
takes its place: a test that did reach torchvision would fail loudly, not pass.
"""
import importlib
import sys
import types

import pytest


class _Unavailable(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _TorchvisionStandIn(metaclass=_Unavailable):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not importable here; open_clip parity tests do not use it")


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _TorchvisionStandIn


def _stand_in_for_torchvision():
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # a half-imported torchvision
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
                 "torchvision.ops.misc"):
        module = types.ModuleType(name)
        module.__getattr__ = _module_getattr
        module.__path__ = []
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def open_clip():
    """The open_clip package (skips the test without torch or open_clip_torch)."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install -e .[test])")
    try:
        import torchvision  # noqa: F401
    except Exception:
        _stand_in_for_torchvision()
    return importlib.import_module("open_clip")
