"""Where an experiment's model and images come from: one loader for the sweep, fine-tuning and the
peer comparison, so that they quantize the same weights from the same unlabeled sample and evaluate
on the same test images."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from fgq_jax.data import default_shared_dir, load_arrays
from fgq_jax.models import get_model
from fgq_jax.recipe import QuantRecipe
from fgq_jax.fileio import REPO_ROOT

__all__ = [
    "resolve_path",
    "resolve_spec",
    "load_model",
    "sample_images",
    "unlabeled_sample",
    "balanced_subset",
    "load_labeled",
]


def resolve_path(path: str) -> Path:
    """A config path: "{shared}" expands to the shared data root; relative paths are relative to the
    repository root."""
    p = Path(str(path).format(shared=default_shared_dir()))
    return p if p.is_absolute() else REPO_ROOT / p


def resolve_spec(model: str, num_classes: int | None = None):
    """The ModelSpec of a registry name (`fgq_jax.models.get_model`) or of a
    ``"package.module:attr"`` reference naming a ModelSpec or a function ``num_classes -> ModelSpec``
    (a model defined outside the registry, e.g. in a test)."""
    if ":" not in model:
        return get_model(model, num_classes)
    module_name, attr = model.split(":", 1)
    obj = getattr(importlib.import_module(module_name), attr)
    return obj(num_classes) if callable(obj) and not hasattr(obj, "module") else obj


def load_model(model: str, checkpoint: str | None, num_classes: int | None = None):
    """(ModelSpec, FP variables {"params", "batch_stats"}) of model `model` (see `resolve_spec`).

    checkpoint: a PyTorch checkpoint (.th/.pth, converted on the fly) or an orbax directory written
    by `python -m fgq_jax.convert` / saved by fine-tuning; None -> (spec, None).
    """
    spec = resolve_spec(model, num_classes)
    if checkpoint is None:
        return spec, None
    path = resolve_path(checkpoint)
    if path.is_dir():
        from fgq_jax.checkpoint import load_variables

        variables, _ = load_variables(path)
    else:
        from fgq_jax.convert import convert_torch_checkpoint

        params, batch_stats = convert_torch_checkpoint(path, model, num_classes=num_classes)
        variables = {"params": params, "batch_stats": batch_stats}
    return spec, {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def sample_images(dataset: str, split: str, recipe: QuantRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Unlabeled images for calibration (the first `num_calib`) and repairs (`num_repair`) of a
    uniformly random sample of `split` drawn with the recipe's seed (labels are never returned)."""
    images, _ = load_arrays(dataset, split)
    return unlabeled_sample(images, recipe, f"{dataset}/{split}")


def unlabeled_sample(images: np.ndarray, recipe: QuantRecipe, what: str = "the split"):
    """`sample_images` of a split already in memory (all of its images, in their stored order)."""
    num_calib, num_repair = recipe.activations.num_calib, recipe.repairs.num_repair
    n = max(num_calib, num_repair)
    if n > images.shape[0]:
        raise ValueError(f"{what} has {images.shape[0]} images; {n} requested")
    # A uniformly random subset in random order: the split is stored sorted by class, so any
    # prefix of a sorted index set would be a class-biased sample (BN statistics then suffer).
    idx = np.random.default_rng(recipe.seed).permutation(images.shape[0])[:n]
    sample = images[idx]
    return sample[:num_calib], sample[:num_repair]


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of `n` examples, as many of each class as the class sizes allow (the
    remainder goes to the first classes), spread evenly over each class's examples.

    A split stored class by class (CIFAR-10-JPEG) would give one class only with its first n.
    Deterministic: a function of the labels and n only.
    """
    labels = np.asarray(labels)
    if n >= labels.shape[0]:
        return np.arange(labels.shape[0])
    if n < 1:
        raise ValueError(f"a subset needs n >= 1 examples, got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    quota, left = np.zeros_like(counts), int(n)
    while left:  # water-filling: equal shares, a class that runs out leaves its share to the others
        open_classes = np.flatnonzero(quota < counts)
        share = max(left // len(open_classes), 1)
        for c in open_classes[:left] if share == 1 else open_classes:
            take = min(share, counts[c] - quota[c], left)
            quota[c] += take
            left -= take
    picks = []
    for c, q in zip(classes, quota):
        members = np.flatnonzero(labels == c)
        picks.append(members[(np.arange(q) * len(members)) // q] if q else members[:0])
    return np.sort(np.concatenate(picks))


def load_labeled(dataset: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `split`, or of its `balanced_subset` of `limit` examples: the test images
    of the sweep's ``test_limit`` and of fine-tuning's ``test_subset`` (the same ones for the same n).
    The whole split is read (and cached) first."""
    images, labels = load_arrays(dataset, split)
    if limit is None:
        return images, labels
    idx = balanced_subset(labels, limit)
    return images[idx], labels[idx]
