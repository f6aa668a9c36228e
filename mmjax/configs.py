"""Config files are plain Python files with `get_config(variant="")`; load one by path.

Configs build on each other this way (configs/clip.py starts from configs/coca.py's run
settings), and tools that take a `path[:variant]` string load them with it.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def _module(path: str):
    name = "_mmjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str, variant: str = "") -> ml_collections.ConfigDict:
    return _module(path).get_config(*([variant] if variant else []))


def variants(path: str) -> tuple[str, ...]:
    """The config's VARIANTS ("" is its default)."""
    return tuple(_module(path).VARIANTS)


def sibling(config_file: str, name: str) -> str:
    """Path of config `name` next to `config_file` (a config's own `__file__`)."""
    return os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
