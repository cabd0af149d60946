"""PyTorch checkpoints -> Flax variables for the models in fgq_jax.models.

Supported sources:
  * akamaster/pytorch_resnet_cifar10 ``.th`` files: ``{"state_dict": {"module.conv1.weight": ...}, ...}``
    (DataParallel ``module.`` prefix, Linear named ``linear``);
  * torchvision ``.pth`` files: a plain state_dict (``conv1.weight``, ``layer1.0.downsample.0.weight``,
    ``features.0.weight``, ``classifier.1.weight``, ...), for the ResNets, AlexNet and
    SqueezeNet 1.0 / 1.1 (whose Flax modules are named after torchvision's indices:
    ``features_3/expand3x3`` <-> ``features.3.expand3x3``, ``classifier_1`` <-> ``classifier.1``).

Layout changes: conv weight (out, in, kh, kw) -> kernel (kh, kw, in, out); Linear weight (out, in) ->
kernel (in, out); BatchNorm weight/bias/running_mean/running_var -> params scale/bias and batch_stats
mean/var; ``num_batches_tracked`` is dropped. AlexNet's fc6 rows are permuted from torch's (C, H, W)
flatten order to the Flax model's NHWC (H, W, C) order.

The expected Flax tree comes from ``jax.eval_shape`` of the model's init, so the check is exact:
every missing key, unexpected key and shape mismatch is reported in one CheckpointMismatchError.
PyTorch is only imported by ``convert_torch_checkpoint`` (an optional dependency).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fgq_jax.checkpoint import CheckpointMismatchError
from fgq_jax.models import get_model, variable_shapes
from fgq_jax.models.squeezenet import SQUEEZENET_VERSIONS

_TORCH_HINT = (
    "PyTorch is needed to read PyTorch checkpoints: install the pinned CPU build with "
    "`pip install torch==2.14.1 torchvision==0.29.1` (never an unpinned `torch`, which pulls a multi-GB CUDA build)."
)
# Flax leaf name -> PyTorch parameter/buffer suffix.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_ALEXNET_MODULES = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3": "features.6",
    "conv4": "features.8",
    "conv5": "features.10",
    "fc6": "classifier.1",
    "fc7": "classifier.4",
    "fc8": "classifier.6",
}
_BLOCK_RE = re.compile(r"^stage(\d+)_block(\d+)$")
_SEQUENTIAL_RE = re.compile(r"^(features|classifier)_(\d+)$")  # SqueezeNet: torchvision's Sequential index
_MAX_LISTED = 100  # per category in the error message; the full lists are attributes


def _mismatch_message(model_name: str, source: str, missing, unexpected, shape_mismatches,
                      n_expected: int) -> str:
    """The CheckpointMismatchError message: every missing key, unexpected key and shape mismatch."""
    lines = [f"checkpoint {source} does not match model {model_name!r}:"]

    def listing(title, items):
        if not items:
            return
        lines.append(f"  {len(items)} {title}{'' if len(items) == 1 else 's'}:")
        lines.extend(f"    {it}" for it in items[:_MAX_LISTED])
        if len(items) > _MAX_LISTED:
            lines.append(f"    ... and {len(items) - _MAX_LISTED} more (see the exception's attributes)")

    listing("missing key", missing)
    listing("unexpected key", unexpected)
    listing("shape mismatch", [f"{k}: checkpoint {tuple(got)} vs model {tuple(exp)}" for k, got, exp in shape_mismatches])
    if len(missing) + len(shape_mismatches) > n_expected // 2:
        lines.append("  (most of the model's keys are missing or mis-shaped: is this a checkpoint of another model?)")
    return "\n".join(lines)


def _torch_module(model_name: str, family: str, flax_module: tuple[str, ...]) -> str | None:
    """PyTorch module name of a Flax module path, e.g. ('stage1_block0', 'conv1') -> 'layer1.0.conv1'."""
    if model_name == "alexnet":
        return _ALEXNET_MODULES.get("/".join(flax_module))
    if model_name in SQUEEZENET_VERSIONS:  # ('features_3', 'squeeze') -> 'features.3.squeeze'
        m = _SEQUENTIAL_RE.match(flax_module[0])
        return None if m is None else ".".join((m.group(1), m.group(2), *flax_module[1:]))
    top = {"conv_init": "conv1", "bn_init": "bn1", "fc": "linear" if family == "cifar" else "fc"}
    if len(flax_module) == 1:
        return top.get(flax_module[0])
    m = _BLOCK_RE.match(flax_module[0])
    if m is None or len(flax_module) != 2:
        return None
    block = f"layer{m.group(1)}.{m.group(2)}"
    sub = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(flax_module[1], flax_module[1])
    return f"{block}.{sub}"


def expected_torch_keys(model_name: str, num_classes: int | None = None) -> dict[str, tuple]:
    """Map each PyTorch key the model needs -> (collection, flax path tuple, flax shape, torch shape)."""
    shapes = variable_shapes(model_name, num_classes)
    family = get_model(model_name).dataset_family
    out = {}
    for collection, tree in shapes.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            module, leaf_name = path[:-1], path[-1]
            torch_module = _torch_module(model_name, family, module)
            suffix = _LEAF_TO_TORCH.get((collection, leaf_name))
            if torch_module is None or suffix is None:  # a model change the converter does not know
                raise NotImplementedError(f"no PyTorch name for {collection}/{'/'.join(path)} of {model_name}")
            shape = tuple(leaf.shape)
            if leaf_name == "kernel" and len(shape) == 4:
                torch_shape = (shape[3], shape[2], shape[0], shape[1])
            elif leaf_name == "kernel" and len(shape) == 2:
                torch_shape = (shape[1], shape[0])
            else:
                torch_shape = shape
            out[f"{torch_module}.{suffix}"] = (collection, path, shape, torch_shape)
    return out


def _to_numpy(value) -> np.ndarray:
    """torch.Tensor / np.ndarray / jax array -> float32 numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor; .float() also handles bfloat16/half
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _convert_leaf(model_name: str, path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """One PyTorch tensor -> the Flax layout of the leaf at ``path``."""
    if path[-1] != "kernel":
        return w
    if w.ndim == 4:  # conv (out, in, kh, kw) -> (kh, kw, in, out)
        return np.transpose(w, (2, 3, 1, 0))
    if model_name == "alexnet" and path == ("fc6", "kernel"):
        # torch flattens the [C, 6, 6] map channel-major; the Flax model flattens [6, 6, C].
        out_f, in_f = w.shape
        c = in_f // 36
        return w.reshape(out_f, c, 6, 6).transpose(2, 3, 1, 0).reshape(in_f, out_f)
    return w.T  # Linear (out, in) -> (in, out)


def _strip_prefix(keys) -> dict[str, str]:
    """Map key without DataParallel's ``module.`` prefix -> original key."""
    return {(k[len("module.") :] if k.startswith("module.") else k): k for k in keys}


def convert_torch_state_dict(
    state_dict: Mapping[str, Any],
    model_name: str,
    num_classes: int | None = None,
    *,
    source: str = "<state_dict>",
) -> dict[str, dict]:
    """Convert a PyTorch state_dict to Flax variables ``{"params": ..., "batch_stats": ...}``.

    Args:
      state_dict: name -> tensor (torch.Tensor or array); ``module.`` prefixes are stripped and
        ``*.num_batches_tracked`` entries ignored.
      model_name: one of fgq_jax.models.MODEL_NAMES.
      num_classes: classes of the model (default: 10 CIFAR / 1000 ImageNet).
      source: name used in error messages (the file path when called from convert_torch_checkpoint).

    Returns:
      Nested dicts of float32 jax arrays exactly matching ``get_model(model_name).module.init``'s tree
      (``batch_stats`` is ``{}`` for AlexNet and SqueezeNet, which have no BatchNorm).

    Raises:
      CheckpointMismatchError: missing keys, unexpected keys and/or shape mismatches (all listed).
      ValueError: unknown model name, or ``state_dict`` is not a mapping of tensors.
    """
    get_model(model_name)  # ValueError listing the known models
    model_name = model_name.lower()
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{source}: expected a state_dict (mapping name -> tensor), got {type(state_dict).__name__}")
    non_tensors = [k for k, v in state_dict.items() if not hasattr(v, "shape")]
    if non_tensors:
        raise ValueError(f"{source}: state_dict entries that are not tensors: {', '.join(map(str, non_tensors))}")

    names = _strip_prefix(state_dict.keys())
    names = {k: orig for k, orig in names.items() if not k.endswith("num_batches_tracked")}
    expected = expected_torch_keys(model_name, num_classes)

    missing = [k for k in expected if k not in names]
    unexpected = [names[k] for k in names if k not in expected]
    mismatched = []
    for k, (_, _, _, torch_shape) in expected.items():
        if k in names:
            got = tuple(state_dict[names[k]].shape)
            if got != torch_shape:
                mismatched.append((names[k], got, torch_shape))
    if missing or unexpected or mismatched:
        message = _mismatch_message(model_name, source, missing, unexpected, mismatched, len(expected))
        raise CheckpointMismatchError(message, missing, unexpected, mismatched)

    flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for k, (collection, path, flax_shape, _) in expected.items():
        w = _convert_leaf(model_name, path, _to_numpy(state_dict[names[k]]))
        assert w.shape == flax_shape, (k, w.shape, flax_shape)
        flat[collection][path] = jnp.asarray(w)
    return {c: traverse_util.unflatten_dict(f) if f else {} for c, f in flat.items()}


_NAME_DIGEST = re.compile(r"-([0-9a-f]{8,64})$")


def check_name_digest(path: str | os.PathLike) -> None:
    """A torchvision-style file name whose stem ends in a sha256 prefix (``resnet20-12fca82f.th``,
    ``squeezenet1_1-5d96dd9a.pth``) is checked against the file's bytes: a mismatch (a damaged or
    swapped file) is a ValueError naming both digests."""
    m = _NAME_DIGEST.search(Path(path).stem)
    if m is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise ValueError(f"{path}: its name says sha256 {m.group(1)}..., the file's is "
                         f"{h.hexdigest()[:len(m.group(1))]}...: the file is damaged or not the one named")


def load_torch_state_dict(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a ``.th``/``.pth`` file with ``torch.load(weights_only=True)`` and return its state_dict.

    Accepts a plain state_dict or a dict holding one under ``state_dict`` / ``model_state_dict`` /
    ``model`` (akamaster's ``.th`` files keep ``best_prec1`` next to ``state_dict``).
    """
    try:
        import torch
    except ImportError as e:  # optional dependency
        raise ImportError(_TORCH_HINT) from e
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file (expected a PyTorch .th/.pth checkpoint)")
    check_name_digest(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... by format
        hint = ""
        if "Weights only load failed" in str(e):
            hint = (
                " (weights_only=True refuses pickled Python objects; if the file holds a whole "
                "nn.Module, re-save its state_dict() instead)"
            )
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or not a torch.save file){hint}: "
            f"{type(e).__name__}: {first_line}"
        ) from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(hasattr(v, "shape") for v in obj.values()):
            return obj
    keys = f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else ""
    raise ValueError(f"{path}: no state_dict found (got a {type(obj).__name__}{keys})")


def convert_torch_checkpoint(
    path: str | os.PathLike, model_name: str, num_classes: int | None = None
) -> tuple[dict, dict]:
    """Read a PyTorch checkpoint file and convert it: returns ``(params, batch_stats)``.

    ``model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)`` then reproduces
    the PyTorch model's eval-mode logits. Errors: FileNotFoundError, ValueError (unreadable /
    non-checkpoint file, named), CheckpointMismatchError (architecture mismatch), ImportError (no torch).
    """
    get_model(model_name)  # fail on a bad name before reading a large file
    variables = convert_torch_state_dict(load_torch_state_dict(path), model_name, num_classes, source=os.fspath(path))
    return variables["params"], variables["batch_stats"]
