"""open_clip, imported as a peer to compare against (parity tests, mmjax.benchmarks.vs_openclip).

open_clip imports torchvision for its image transforms and a frozen-BatchNorm helper, which
building and running its ViT/text/CoCa models never touches. PyPI's torchvision fails to
import beside a CPU-only torch wheel ("operator torchvision::nms does not exist"), so when
torchvision cannot be imported, a stand-in module whose every attribute refuses to be used
takes its place: code that did reach torchvision fails loudly instead of computing
something else. One copy, shared by the tests and the benchmark.
"""
from __future__ import annotations

import importlib
import sys
import types


class _Unavailable(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _TorchvisionStandIn(metaclass=_Unavailable):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not importable here; building and training open_clip models does not use it")


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


def available() -> str | None:
    """None when torch and open_clip_torch are installed, else what is missing (a sentence)."""
    for module, package in (("torch", "torch"), ("open_clip", "open_clip_torch")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -e .[test])"
    return None


def open_clip():
    """The open_clip package, torchvision stood in for when it cannot be imported."""
    missing = available()
    if missing:
        raise ImportError(missing)
    try:
        import torchvision  # noqa: F401
    except Exception:
        _stand_in_for_torchvision()
    return importlib.import_module("open_clip")
