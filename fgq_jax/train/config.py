"""TrainConfig: one fine-tuning run, validated completely at construction.

What is quantized, and how, is one :class:`fgq_jax.recipe.QuantRecipe` (the ``recipe`` field): the
same value a sweep point is, so fine-tuning starts from exactly the model the sweep evaluates
(:func:`fgq_jax.ptq.quantize_model`). Full-precision fine-tuning is the recipe with method "fp" and
act_bits None. The recipe's flat names (``group_size``, ``act_bits``, ``bn_reestimate`` ...) are
config overrides too (``--set group_size=4``, :func:`fgq_jax.configfile.replace_config`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from fgq_jax.recipe import QuantRecipe, check_fields
from fgq_jax.train.optim import OPTIMIZERS, SCHEDULES, check_lr

__all__ = ["TrainConfig", "ARCH_FIELDS", "RUNTIME_FIELDS", "DEFAULT_RECIPE"]

# The sweep's "BN+bias" point at N=64: exact FGQ, 8-bit activations, BN re-estimation + bias correction.
DEFAULT_RECIPE = QuantRecipe.make(method="exact", group_size=64, act_bits=8, bn_reestimate=True,
                                  bias_correct=True)
# A resume must match the checkpoint's config in everything but RUNTIME_FIELDS; these name the kind
# of difference in the refusal.
ARCH_FIELDS = ("model", "num_classes", "dataset", "init_checkpoint")
RUNTIME_FIELDS = (
    "name", "checkpoint_every", "max_to_keep", "eval_batch_size", "progress", "log_every",
    "time_steps", "results_dir", "fp_reference", "export",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Frozen and JSON-serialisable; stored in every checkpoint.

    Groups of fields: what is trained (architecture / init), how it is quantized (``recipe``),
    distillation, the training recipe, and run-time knobs (``RUNTIME_FIELDS``: they may change
    between a run and its resume).
    """

    # --- what is trained
    name: str = "run"  # results file stem: finetune_<name>.*
    model: str = "resnet20"  # registry name or "package.module:attr" (fgq_jax.loading.resolve_spec)
    num_classes: int | None = None
    dataset: str = "cifar10_jpeg"  # fgq_jax.data name, or "synthetic"
    init_checkpoint: str | None = None  # converted variables dir or torch .th; None -> random init
    # --- how it is quantized: the start is quantize_model(recipe) on recipe-seeded unlabeled
    # training images; the training forward re-quantizes the latent weights with the recipe's rules
    recipe: QuantRecipe = DEFAULT_RECIPE
    # --- distillation: alpha*CE + (1-alpha)*T^2*KL(teacher || student); teacher frozen, eval mode
    distill: bool = False
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    teacher_model: str | None = None  # None -> same architecture as the student
    teacher_checkpoint: str | None = None  # None -> init_checkpoint (the FP starting point)
    # --- training
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9  # sgd momentum / adamw b1
    nesterov: bool = True
    weight_decay: float = 1e-4  # on latent conv/dense kernels only
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    step_boundaries: tuple[float, ...] = (0.5, 0.75)  # "step": fractions of the total steps
    step_factor: float = 0.1
    epochs: int = 3
    batch_size: int = 128
    augment: bool = True  # random crop (pad 4) + horizontal flip
    seed: int = 0  # data order, augmentation, random init (the recipe has its own sample seed)
    train_subset: int | None = None  # n training images (loading.balanced_subset; tiny runs / tests)
    test_subset: int | None = None  # n test images: the sweep's test_limit selection
    steps_per_epoch: int | None = None  # cap on steps per epoch (None: floor(n_train / batch))
    # --- run-time (may differ on --resume)
    checkpoint_every: int = 200  # steps; 0 -> only at epoch ends and at the end
    max_to_keep: int = 3
    eval_batch_size: int = 500
    progress: bool = True
    log_every: int = 20  # steps between loss read-backs for the progress bar
    time_steps: int = 10  # repeats for the quantized-vs-FP step timing (0: skip)
    results_dir: str = "results"
    fp_reference: str | None = None  # name of the FP fine-tune run giving the fp_top1 column
    export: bool = True  # <workdir>/export/variables (latent FP + BN) and export/ternary (packed)
    original_epochs: int = 182  # the original training schedule, for the overhead in %
    original_train_size: int = 50_000

    def __post_init__(self):
        if isinstance(self.recipe, Mapping):  # flat names, as SweepConfig takes them
            object.__setattr__(self, "recipe", QuantRecipe.make(**self.recipe))
        if isinstance(self.step_boundaries, list):
            object.__setattr__(self, "step_boundaries", tuple(self.step_boundaries))
        for field, (ok, requirement) in _CHECKS.items():
            value = getattr(self, field)
            if not ok(value):
                raise ValueError(f"TrainConfig.{field} must be {requirement}, got {value!r}")
        check_lr(self.lr)
        if self.recipe.repairs.scale_fit:
            raise ValueError(
                "TrainConfig.recipe: scale_fit=True cannot be fine-tuned: the STE forward "
                "re-ternarizes the latent weights at every step with the recipe's own scales, so "
                "fitted scales would be lost at the first step (fine-tune without scale_fit)"
            )

    @property
    def quantized(self) -> bool:
        """Anything quantized (weights or activations); False for FP fine-tuning."""
        return self.recipe.weights.quantized or self.recipe.activations.bits is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (the recipe as ``QuantRecipe.to_dict``, tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown fields are an error naming the closest known one)."""
        check_fields(cls.__name__, d, [f.name for f in dataclasses.fields(cls)])
        d = dict(d)
        if isinstance(d.get("recipe"), Mapping):
            d["recipe"] = QuantRecipe.from_dict(d["recipe"])
        return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str) and bool(v)


def _optional(check):
    return lambda v: v is None or check(v)


# field -> (check, what the message says it must be)
_CHECKS = {
    "name": (_is_str, "a non-empty string"),
    "model": (_is_str, "a model name or 'package.module:attr'"),
    "num_classes": (_optional(lambda v: _is_int(v) and v >= 1), "None or an int >= 1"),
    "dataset": (_is_str, "a dataset name or 'synthetic'"),
    "init_checkpoint": (_optional(_is_str), "None or a path"),
    "recipe": (lambda v: isinstance(v, QuantRecipe), "a QuantRecipe (or a dict of its flat names)"),
    "distill": (lambda v: isinstance(v, bool), "a bool"),
    "distill_alpha": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "distill_temperature": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "teacher_model": (_optional(_is_str), "None or a model name"),
    "teacher_checkpoint": (_optional(_is_str), "None or a path"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {OPTIMIZERS} (unknown optimizer)"),
    "momentum": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "nesterov": (lambda v: isinstance(v, bool), "a bool"),
    "weight_decay": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {SCHEDULES} (unknown schedule)"),
    "warmup_epochs": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "step_boundaries": (lambda v: isinstance(v, tuple) and all(_is_num(b) and 0 < b < 1 for b in v),
                        "a tuple of fractions in (0, 1)"),
    "step_factor": (lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "augment": (lambda v: isinstance(v, bool), "a bool"),
    "seed": (_is_int, "an int"),
    "train_subset": (_optional(lambda v: _is_int(v) and v >= 1), "None or an int >= 1"),
    "test_subset": (_optional(lambda v: _is_int(v) and v >= 1), "None or an int >= 1"),
    "steps_per_epoch": (_optional(lambda v: _is_int(v) and v >= 1), "None or an int >= 1"),
    "checkpoint_every": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "max_to_keep": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "eval_batch_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "progress": (lambda v: isinstance(v, bool), "a bool"),
    "log_every": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "time_steps": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "results_dir": (_is_str, "a path"),
    "fp_reference": (_optional(_is_str), "None or a run name"),
    "export": (lambda v: isinstance(v, bool), "a bool"),
    "original_epochs": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "original_train_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
}
