"""Rule-based weight quantization of whole parameter trees (Linen params dicts and NNX States).

A tree is flattened with paths; each leaf's path is written as a '/'-joined string
(``"stage1_block0/conv1/kernel"``; for NNX ``Variable`` leaves the trailing ``.value`` attribute is
dropped) and matched against an ordered list of :class:`Rule` s with ``re.search``: the first rule
whose pattern matches decides the leaf's quantizer (``None`` = keep full precision). Leaves that
match nothing, and leaves with fewer than 2 axes (biases, norm scales), are never quantized.

Everything is pure: the input tree is never mutated, a new tree of the same structure comes back.

    rules = default_rules(WeightQuant("exact", group_size=4), first_layer="conv_init", last_layer="fc")
    fake = quantize_params(params, rules)                    # float kernels, drop-in for apply
    tern = quantize_params(params, rules, mode="ternary")    # TernaryTensor leaves, for export
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Sequence
from typing import Any, Union

import jax
import numpy as np

from fgq_jax import ternary

__all__ = [
    "WeightQuant",
    "Int8Weights",
    "Quant",
    "Rule",
    "default_rules",
    "quantize_params",
    "quantized_paths",
    "ternarize_params",
    "path_to_str",
    "tree_fingerprint",
]


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """Ternary weights: :func:`fgq_jax.ternary.ternarize` arguments (validated on creation)."""

    method: str = "exact"
    group_size: ternary.GroupSize = 4
    asymmetric: bool = False
    grouping: str = "input"

    def __post_init__(self):
        ternary._check_method(self.method)
        ternary._check_grouping(self.grouping)
        if self.grouping == "kernel":  # kernel slices define the groups; group_size is ignored
            object.__setattr__(self, "group_size", None)
        else:
            object.__setattr__(self, "group_size", ternary.normalize_group_size(self.group_size))


@dataclasses.dataclass(frozen=True)
class Int8Weights:
    """Symmetric int8 weights (e.g. the first/last layer policy), per output channel by default."""

    per_channel: bool = True


Quant = Union[WeightQuant, Int8Weights, None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern``: regex searched (``re.search``) in a leaf's '/'-joined path; ``quant``: what to
    do with matching leaves (None = keep full precision)."""

    pattern: str
    quant: Quant

    def __post_init__(self):
        if not isinstance(self.quant, (WeightQuant, Int8Weights, type(None))):
            raise TypeError(f"Rule.quant must be a WeightQuant, Int8Weights or None, got {self.quant!r}")
        _compile(self.pattern)  # fail early on a bad regex

    def matches(self, path: str) -> bool:
        return _compile(self.pattern).search(path) is not None


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid rule pattern {pattern!r}: {e}") from None


def _layer_pattern(layer: str) -> str:
    """Leaves of the module at path prefix ``layer`` (optionally under a top-level 'params')."""
    return rf"^(params/)?{re.escape(layer.strip('/'))}/"


def default_rules(
    wq: WeightQuant,
    first_layer: str,
    last_layer: str,
    first_last: str = "fp",
) -> tuple[Rule, ...]:
    """Quantize every leaf named ``kernel`` with ``wq``; the first and last layers (path prefixes,
    e.g. "conv_init" and "fc") stay full precision (``first_last="fp"``) or get int8 weights
    (``"8"``). Biases and normalisation parameters are never touched."""
    if not isinstance(wq, WeightQuant):
        raise TypeError(f"wq must be a WeightQuant, got {wq!r}")
    if first_last not in ("fp", "8"):
        raise ValueError(f"first_last must be 'fp' or '8', got {first_last!r}")
    edge = None if first_last == "fp" else Int8Weights(per_channel=True)
    return (
        Rule(_layer_pattern(first_layer) + r"(.*/)?kernel$", edge),
        Rule(_layer_pattern(last_layer) + r"(.*/)?kernel$", edge),
        Rule(r"(^|/)kernel$", wq),
    )


# --------------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------------
def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_to_str(path: Sequence[Any]) -> str:
    """'/'-joined path of a leaf; an NNX Variable's trailing ``value`` attribute is dropped."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def get_at(tree: Any, path: str):
    """The subtree of a nested dict at a '/'-joined path (e.g. "layer1_0/conv1"); KeyError naming
    the path and the missing key."""
    for key in path.split("/"):
        if key not in tree:
            raise KeyError(f"no {path!r} in the tree (at {key!r})")
        tree = tree[key]
    return tree


def set_at(tree: Any, path: str, value) -> dict:
    """Functional update of a nested dict at a '/'-joined path (copies only along the path)."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = set_at(tree[key], rest, value) if rest else value
    return out


def _flatten(params: Any):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=ternary.is_ternary)
    return [(path_to_str(p), x) for p, x in leaves], treedef


def _match(path: str, leaf: Any, rules: Sequence[Rule]) -> Quant:
    """The quantizer for one leaf: first matching rule, only for real arrays with >= 2 axes."""
    if ternary.is_ternary(leaf) or getattr(leaf, "ndim", 0) < 2:
        return None
    for rule in rules:
        if rule.matches(path):
            return rule.quant
    return None


def _check_rules(rules: Any) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        rules = (rules,)
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be Rule objects, got {r!r}")
    return rules


def quantized_paths(params: Any, rules: Sequence[Rule]) -> dict[str, Quant]:
    """``{path: quant}`` for every leaf that :func:`quantize_params` would quantize (in tree
    order; full-precision leaves are not listed)."""
    rules = _check_rules(rules)
    flat, _ = _flatten(params)
    out = {}
    for path, leaf in flat:
        q = _match(path, leaf, rules)
        if q is not None:
            out[path] = q
    return out


# --------------------------------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------------------------------
def _check_finite(path: str, leaf: Any) -> None:
    """NaN/Inf in a kernel to quantize -> ValueError naming it (concrete arrays only)."""
    if isinstance(leaf, jax.core.Tracer):
        return  # inside jit/grad: values unknown; checked where params are concrete
    arr = np.asarray(leaf)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(
            f"parameter {path!r} (shape {arr.shape}) has {bad} NaN/Inf value(s); refusing to quantize it"
        )


def _apply(leaf: jax.Array, quant: Quant, mode: str, ste: bool):
    if isinstance(quant, Int8Weights):
        # int8 layers stay float (their int8-rounded values) in both modes
        fn = ternary.quantize_int8_weights_ste if ste else ternary.quantize_int8_weights
        return fn(leaf, per_channel=quant.per_channel)
    kw = dict(asymmetric=quant.asymmetric, grouping=quant.grouping)
    if mode == "ternary":
        return ternary.ternarize(leaf, quant.group_size, quant.method, **kw)
    if ste:
        return ternary.ternarize_ste(leaf, quant.group_size, quant.method, **kw)
    return ternary.ternarize(leaf, quant.group_size, quant.method, **kw).dequantize(leaf.dtype)


def quantize_params(params: Any, rules: Sequence[Rule], mode: str = "fake", ste: bool = False):
    """Quantize the kernels of a parameter tree selected by ``rules``; returns a new tree.

    Args:
      params: a Linen params dict (or any pytree of arrays) or an ``nnx.State``.
      rules: ordered :class:`Rule` s; first match wins (see :func:`default_rules`).
      mode: "fake" -> same structure with float kernels (alpha * t, the kernel's dtype): a drop-in
        for ``model.apply`` / ``nnx.update``; "ternary" -> :class:`~fgq_jax.ternary.TernaryTensor`
        leaves for the ternary kernels (export / integer path). Int8 layers are fake-quantized
        floats in both modes.
      ste: straight-through gradients to the latent float kernels (training; "fake" mode only).

    Raises ValueError (naming the parameter path) when a kernel to quantize holds NaN/Inf; all
    kernels are checked before anything is computed. Works under ``jax.jit`` (then the check is
    skipped for traced values).
    """
    if mode not in ("fake", "ternary"):
        raise ValueError(f"mode must be 'fake' or 'ternary', got {mode!r}")
    if ste and mode != "fake":
        raise ValueError("ste=True needs mode='fake' (TernaryTensor codes carry no gradient)")
    rules = _check_rules(rules)
    flat, treedef = _flatten(params)
    plan = [(path, leaf, _match(path, leaf, rules)) for path, leaf in flat]
    for path, leaf, q in plan:
        if q is not None:
            _check_finite(path, leaf)
    new_leaves = [leaf if q is None else _apply(leaf, q, mode, ste) for _, leaf, q in plan]
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


def ternarize_params(
    params: Any,
    wq: WeightQuant,
    *,
    first_layer: str,
    last_layer: str,
    first_last: str = "fp",
    mode: str = "fake",
):
    """``quantize_params(params, default_rules(wq, first_layer, last_layer, first_last), mode)``."""
    return quantize_params(params, default_rules(wq, first_layer, last_layer, first_last), mode=mode)


def tree_fingerprint(tree: Any) -> str:
    """SHA-256 of a pytree: its structure and every leaf's dtype, shape and bytes. Equal
    fingerprints mean bit-identical arrays, the condition for reusing a deterministic result
    (an evaluation, a calibration) instead of recomputing it."""
    leaves, treedef = jax.tree.flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
