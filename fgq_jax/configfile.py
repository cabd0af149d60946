"""Experiment config files: plain Python files defining `get_config()` (big_vision style; the first
line of each is the command that runs it), and the one override mechanism every CLI shares.

A config is a frozen dataclass (`SweepConfig`, `TrainConfig`, `CompareConfig`). When it has a
``recipe`` field (a `fgq_jax.recipe.QuantRecipe`), the recipe's flat names (``group_size``,
``act_bits``, ``bn_reestimate``, ...) can be set on the config directly: ``--set group_size=16``.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Sequence

from fgq_jax.recipe import QuantRecipe, check_fields

__all__ = ["load_get_config", "derived_config", "replace_config", "parse_overrides", "load_config"]


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
    try:
        return module.get_config()
    except TypeError as e:  # a misspelled field: name it, with the closest known one
        m = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
        cls = getattr(module, m.group(1), None) if m else None
        if cls is None or not dataclasses.is_dataclass(cls):
            raise
        try:
            check_fields(cls.__name__, [m.group(2)], [f.name for f in dataclasses.fields(cls)])
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        raise


def replace_config(cfg, **changes):
    """`dataclasses.replace` that also takes the recipe's flat names (validated; an unknown name is
    an error suggesting the closest field)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    recipe = getattr(cfg, "recipe", None) if "recipe" in fields else None
    recipe_names = set(recipe.flat()) if isinstance(recipe, QuantRecipe) else set()
    check_fields(type(cfg).__name__, changes, fields | recipe_names)
    direct = {k: v for k, v in changes.items() if k in fields}
    flat = {k: v for k, v in changes.items() if k not in fields}
    if flat:
        direct["recipe"] = direct.get("recipe", recipe).replace(**flat)
    return dataclasses.replace(cfg, **direct)


def derived_config(base: str | os.PathLike, **changes):
    """The config of the file `base` with some fields changed: a variant config file is one line,
    ``return derived_config(Path(__file__).with_name("base.py"), epochs=3)``."""
    return replace_config(load_get_config(base), **changes)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> {key: value}; values are Python literals when they parse
    (``lr=0.1``, ``group_size=None``, ``group_sizes=(4,64)``), else strings."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override must be key=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), cls: type | None = None):
    """`get_config()` of a config file with ``key=value`` overrides applied. ``cls``: the expected
    config class; a dict / ConfigDict of its fields is converted to it."""
    cfg = load_get_config(path)
    if cls is not None and not isinstance(cfg, cls):
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        check_fields(cls.__name__, d, [f.name for f in dataclasses.fields(cls)])
        cfg = cls(**d)
    return replace_config(cfg, **parse_overrides(overrides))
