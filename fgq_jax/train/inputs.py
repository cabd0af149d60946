"""The images of a fine-tuning run: the training and test splits (or a synthetic set), the subsets
of small runs, the recipe's unlabeled calibration/repair sample, and the batches of each epoch
(placed on a device mesh when one is given).

The calibration/repair sample is drawn from the whole training split exactly as the sweep draws it
(:func:`fgq_jax.loading.unlabeled_sample`), and a test subset of n images is the sweep's
``test_limit=n`` selection (:func:`fgq_jax.loading.balanced_subset`): the fine-tune's start is the
sweep's point.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from fgq_jax import distributed
from fgq_jax.data import epoch_permutation, load_arrays
from fgq_jax.loading import balanced_subset, unlabeled_sample
from fgq_jax.train.config import TrainConfig

__all__ = ["synthetic_arrays", "load_data", "RunData", "prepare_data", "place_batch", "check_mesh"]

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2048, 512


def synthetic_arrays(n: int, shape=(16, 16, 3), num_classes: int = 10, seed: int = 0, split: str = "train"):
    """A small learnable classification set (uint8 images [n, *shape], int32 labels [n]): each class
    has its own mean colour, plus pixel noise, so it survives crop/flip augmentation. For tests and
    for timing without the real data. The train/test splits share the class colours."""
    colours = np.random.default_rng([seed, 7]).uniform(40, 215, size=(num_classes, shape[-1]))
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    noise = rng.normal(0, 40, size=(n, *shape))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def load_data(config: TrainConfig, spec):
    """((train images, labels), (test images, labels)) of ``config.dataset``: the whole splits
    (uint8 / int32 numpy arrays), or a synthetic set shaped for ``spec``."""
    if config.dataset == "synthetic":
        shape, nc = tuple(spec.input_shape), spec.num_classes
        return (synthetic_arrays(config.train_subset or SYNTHETIC_TRAIN, shape, nc, split="train"),
                synthetic_arrays(config.test_subset or SYNTHETIC_TEST, shape, nc, split="test"))
    return load_arrays(config.dataset, "train"), load_arrays(config.dataset, "test")


@dataclasses.dataclass(frozen=True)
class RunData:
    """The arrays of one run and its epoch geometry."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    calib: np.ndarray | None  # unlabeled calibration images (None: no activation quantization)
    repair: np.ndarray | None  # unlabeled repair images (None: no repair)
    batch_size: int
    steps_per_epoch: int
    seed: int

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    def batch(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` of ``epoch``: its order is a function of (seed, epoch, n) only, so a resumed
        run replays it."""
        idx = _order(self.n_train, self.seed, epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return self.train_x[idx], self.train_y[idx]


@functools.lru_cache(maxsize=2)
def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return epoch_permutation(n, seed, epoch)


def prepare_data(config: TrainConfig, train_data, test_data) -> RunData:
    """Subsets, the recipe's sample and the steps per epoch of ``config`` on the given splits."""
    train_x, train_y = train_data
    test_x, test_y = test_data
    recipe = config.recipe
    calib = repair = None
    if recipe.activations.bits is not None or recipe.repairs.any:
        calib, repair = unlabeled_sample(train_x, recipe, f"the {config.dataset} training split")
    if config.train_subset:
        idx = balanced_subset(train_y, config.train_subset)
        train_x, train_y = train_x[idx], train_y[idx]
    if config.test_subset:
        idx = balanced_subset(test_y, config.test_subset)
        test_x, test_y = test_x[idx], test_y[idx]
    steps = int(train_x.shape[0]) // config.batch_size
    if steps < 1:
        raise ValueError(f"{train_x.shape[0]} training images do not fill one batch of {config.batch_size}")
    return RunData(
        train_x, np.asarray(train_y, np.int32), test_x, np.asarray(test_y, np.int32),
        calib if recipe.activations.bits is not None else None, repair if recipe.repairs.any else None,
        config.batch_size, min(steps, config.steps_per_epoch or steps), config.seed,
    )


def check_mesh(batch_size: int, mesh) -> None:
    """A training batch must split evenly over the mesh's devices (a padded batch would change the
    loss and the BatchNorm statistics)."""
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the {mesh.devices.size} devices of the mesh "
            "(a padded training batch would change the loss and the BN statistics)"
        )


def place_batch(batch, mesh):
    """``batch`` as the step takes it: unchanged without a mesh; else this process's rows of the
    global batch, split over its devices."""
    if mesh is None:
        return batch
    per_process = batch[0].shape[0] // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    return distributed.shard_batch(tuple(b[rows] for b in batch), mesh)
