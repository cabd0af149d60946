"""Where an experiment's model and images come from: one loader for the sweep, fine-tuning and the
peer comparison, so that they quantize the same weights from the same unlabeled sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fgq_jax.data import default_shared_dir, load_arrays
from fgq_jax.models import get_model
from fgq_jax.recipe import QuantRecipe
from fgq_jax.fileio import REPO_ROOT

__all__ = ["resolve_path", "load_model", "sample_images"]


def resolve_path(path: str) -> Path:
    """A config path: "{shared}" expands to the shared data root; relative paths are relative to the
    repository root."""
    p = Path(str(path).format(shared=default_shared_dir()))
    return p if p.is_absolute() else REPO_ROOT / p


def load_model(model: str, checkpoint: str | None, num_classes: int | None = None):
    """(ModelSpec, FP variables {"params", "batch_stats"}) of registry model `model`.

    checkpoint: a PyTorch checkpoint (.th/.pth, converted on the fly) or an orbax directory written
    by `python -m fgq_jax.convert` / saved by fine-tuning; None -> (spec, None).
    """
    spec = get_model(model, num_classes)
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
    num_calib, num_repair = recipe.activations.num_calib, recipe.repairs.num_repair
    n = max(num_calib, num_repair)
    if n > images.shape[0]:
        raise ValueError(f"{dataset}/{split} has {images.shape[0]} images; {n} requested")
    # A uniformly random subset in random order: the split is stored sorted by class, so any
    # prefix of a sorted index set would be a class-biased sample (BN statistics then suffer).
    idx = np.random.default_rng(recipe.seed).permutation(images.shape[0])[:n]
    sample = images[idx]
    return sample[:num_calib], sample[:num_repair]
