"""Experiment config files: plain Python files defining `get_config()` (big_vision style; the first
line of each is the command that runs it)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path


def load_get_config(path: str | os.PathLike):
    """Import the config file at `path` and return what its `get_config()` returns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_fgq_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config()


def derived_config(base: str | os.PathLike, **changes):
    """The config of the file `base` with some fields changed: a variant config file is one line,
    ``return derived_config(Path(__file__).with_name("base.py"), epochs=3)``. The base's
    `get_config()` must return a dataclass."""
    return dataclasses.replace(load_get_config(base), **changes)
