"""Low-precision fine-tuning: STE training of ternary-weight / low-bit-activation networks.

The pieces, from the inside out:

* :func:`make_schedule` / :func:`make_optimizer` -- optax SGD(+momentum, nesterov) or AdamW with a
  cosine / step / constant learning-rate schedule, optional linear warmup, and weight decay applied to
  the latent conv/dense kernels only (:func:`decay_mask`).
* :class:`TrainState` -- the whole training state as one pytree (latent float params, BN running
  statistics, optimizer state, step, rng, the calibrated activation steps, running epoch metrics).
  Everything that influences the result of the next step is in it, so a checkpoint of it makes a
  resume exact.
* :func:`make_train_step` -- one jitted step: on-device CIFAR augmentation (:func:`random_crop_flip`),
  normalisation, forward with fake-quantized weights (``weight_quant``: ternary with a straight-through
  gradient to the latent weights) and fake-quantized activations (``apply_fn``, e.g.
  :func:`fgq_jax.evaluate.quantized_apply`: clipped STE, fixed calibrated steps), BatchNorm in train
  mode, cross-entropy or distillation loss (:func:`distillation_loss`) against a frozen teacher.
* :func:`fit` -- the epoch loop: deterministic data order from ``(seed, epoch)``, orbax checkpoints
  every K steps / at each epoch end / at the end (atomic, last few kept), exact ``resume``, per-epoch
  metrics as JSON lines, a tqdm bar, training-overhead accounting and the quantized-vs-FP step time.
* :func:`write_results` -- ``results/<dataset>/<model>/finetune_<name>.{csv,json,png}``.

Everything model-specific is injected (``spec`` with ``module``/``first_layer``/``last_layer``,
``weight_quant``, ``apply_fn``), so any Linen classifier whose conv/dense layers are ``nn.Conv`` /
``nn.Dense`` can be fine-tuned.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "TrainConfig",
    "validate_config",
    "TrainState",
    "OPTIMIZERS",
    "SCHEDULES",
    "make_schedule",
    "make_optimizer",
    "decay_mask",
    "cross_entropy",
    "distillation_loss",
    "random_crop_flip",
    "make_train_step",
    "create_train_state",
    "epoch_permutation",
    "time_train_steps",
    "overhead_pct",
    "make_apply_fn",
    "make_eval_fn",
    "make_weight_quant",
    "quantized_layer_paths",
    "calibrate_act_steps",
    "CheckpointMismatchError",
    "latest_checkpoint_meta",
    "check_resume_compatible",
    "fit",
    "CSV_COLUMNS",
    "write_results",
    "synthetic_arrays",
    "load_config",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


# ==================================================================================================
# configuration
# ==================================================================================================
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Frozen and JSON-serialisable; stored in every checkpoint.

    Groups of fields: what is trained (architecture / init), how it is quantized, the recipe, and
    run-time knobs (the last group may change between a run and its resume; see ``RUNTIME_FIELDS``).
    """

    # --- what is trained
    name: str = "run"  # results file stem: finetune_<name>.*
    model: str = "resnet20"  # fgq_jax.models name, or "package.module:factory" returning a spec
    num_classes: int | None = None
    dataset: str = "cifar10_jpeg"  # fgq_jax.data name, or "synthetic"
    init_checkpoint: str | None = None  # converted variables dir or torch .th; None -> random init
    # --- weights (quantize=False: full-precision fine-tuning, activations untouched too)
    quantize: bool = True
    method: str = "exact"
    group_size: int | str | None = 64
    asymmetric: bool = False
    grouping: str = "input"
    first_last: str = "fp"  # "fp" or "8"
    # --- activations: inputs of every layer whose weights are quantized (None -> float activations)
    act_bits: int | None = 8
    act_calibration: str = "percentile"  # activations.calibrate method: max | percentile | mse
    act_percentile: float = 99.99
    act_pow2: bool = False
    calib_images: int = 512  # first images of the seed's epoch-0 order, labels unused
    bn_reestimate: bool = True  # re-estimate BN statistics of the ternary network before calibrating
    bn_images: int = 1024  # (fgq_jax.repairs.reestimate_bn, unlabeled training images)
    # --- distillation: alpha*CE + (1-alpha)*T^2*KL(teacher || student); teacher frozen, eval mode
    distill: bool = False
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    teacher_model: str | None = None  # None -> same architecture as the student
    teacher_checkpoint: str | None = None  # None -> init_checkpoint (the FP starting point)
    # --- recipe
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
    seed: int = 0
    train_subset: int | None = None  # a fixed random subset of n training images (tiny runs / tests)
    test_subset: int | None = None
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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        d = dict(d)
        if "step_boundaries" in d and d["step_boundaries"] is not None:
            d["step_boundaries"] = tuple(d["step_boundaries"])
        return cls(**d)


ARCH_FIELDS = ("model", "num_classes", "dataset", "init_checkpoint")
QUANT_FIELDS = (
    "quantize", "method", "group_size", "asymmetric", "grouping", "first_last", "act_bits",
    "act_calibration", "act_percentile", "act_pow2", "calib_images", "bn_reestimate", "bn_images",
)
RUNTIME_FIELDS = (
    "name", "checkpoint_every", "max_to_keep", "eval_batch_size", "progress", "log_every",
    "time_steps", "results_dir", "fp_reference", "export",
)


def validate_config(c: TrainConfig) -> None:
    """Raise ValueError with a clear message for any bad setting (before any work is done)."""
    if c.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {c.optimizer!r}; expected one of {OPTIMIZERS}")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {c.schedule!r}; expected one of {SCHEDULES}")
    _check_lr(c.lr)
    checks = [
        (isinstance(c.epochs, int) and c.epochs >= 1, f"epochs must be an int >= 1, got {c.epochs!r}"),
        (isinstance(c.batch_size, int) and c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size!r}"),
        (c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay!r}"),
        (0 <= c.momentum < 1, f"momentum must be in [0, 1), got {c.momentum!r}"),
        (c.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {c.warmup_epochs!r}"),
        (0 < c.step_factor <= 1, f"step_factor must be in (0, 1], got {c.step_factor!r}"),
        (all(0 < b < 1 for b in c.step_boundaries), f"step_boundaries must be fractions in (0, 1), got {c.step_boundaries!r}"),
        (0 <= c.distill_alpha <= 1, f"distill_alpha must be in [0, 1], got {c.distill_alpha!r}"),
        (c.distill_temperature > 0, f"distill_temperature must be > 0, got {c.distill_temperature!r}"),
        (c.act_bits is None or (isinstance(c.act_bits, int) and 2 <= c.act_bits <= 16), f"act_bits must be None or an int in [2, 16], got {c.act_bits!r}"),
        (c.first_last in ("fp", "8"), f"first_last must be 'fp' or '8', got {c.first_last!r}"),
        (c.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {c.checkpoint_every!r}"),
        (c.max_to_keep >= 1, f"max_to_keep must be >= 1, got {c.max_to_keep!r}"),
        (c.calib_images >= 1, f"calib_images must be >= 1, got {c.calib_images!r}"),
        (c.bn_images >= 1, f"bn_images must be >= 1, got {c.bn_images!r}"),
        (c.steps_per_epoch is None or c.steps_per_epoch >= 1, f"steps_per_epoch must be None or >= 1, got {c.steps_per_epoch!r}"),
        (c.original_epochs > 0 and c.original_train_size > 0, "original_epochs and original_train_size must be > 0"),
        (c.log_every >= 1, f"log_every must be >= 1, got {c.log_every!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _check_lr(lr) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise ValueError(f"learning rate must be a number > 0, got {lr!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"learning rate must be finite and > 0, got {lr!r}")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load ``get_config()`` from a Python config file; apply ``key=value`` overrides.

    ``get_config`` may return a :class:`TrainConfig` or an ``ml_collections.ConfigDict`` / dict with
    its fields. Override values are parsed as Python literals when possible (``lr=0.1``,
    ``group_size=None``, ``step_boundaries=(0.3,0.6)``), else taken as strings.
    """
    import ast

    from fgq_jax.configfile import load_get_config

    cfg = load_get_config(path)
    if not isinstance(cfg, TrainConfig):
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        cfg = TrainConfig.from_dict(d)
    updates = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must be key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"unknown config field {key!r} in override {item!r}")
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = raw
        if key == "step_boundaries":
            val = tuple(val)
        updates[key] = val
    return dataclasses.replace(cfg, **updates)


# ==================================================================================================
# optimizer
# ==================================================================================================
def make_schedule(
    name: str,
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    boundaries: Sequence[float] = (0.5, 0.75),
    factor: float = 0.1,
) -> optax.Schedule:
    """Learning-rate schedule ``step -> lr``.

    cosine: ``lr`` decayed to 0 over ``total_steps`` (after the warmup); step: ``lr`` multiplied by
    ``factor`` at each of ``boundaries`` (fractions of ``total_steps``); constant: ``lr``.
    warmup: linear from 0 to ``lr`` over ``warmup_steps`` (0 -> none).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    _check_lr(lr)
    total_steps = int(total_steps)
    warmup_steps = int(warmup_steps)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps}")
    lr = float(lr)
    rest = total_steps - warmup_steps
    if name == "cosine":
        main = optax.cosine_decay_schedule(lr, rest)
    elif name == "step":
        bounds = {}
        for b in boundaries:
            if not 0 < b < 1:
                raise ValueError(f"step boundaries must be fractions in (0, 1), got {b!r}")
            s = max(1, int(round(b * total_steps)) - warmup_steps)
            bounds[s] = bounds.get(s, 1.0) * float(factor)
        main = optax.piecewise_constant_schedule(lr, bounds)
    else:
        main = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


def decay_mask(params) -> Any:
    """True for latent conv/dense kernels (leaves named ``kernel`` with ndim >= 2), False for
    biases, BatchNorm scales/offsets and anything else."""

    def is_kernel(path, leaf) -> bool:
        last = path[-1] if path else None
        key = getattr(last, "key", getattr(last, "name", None))
        return key == "kernel" and jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(
    name: str,
    lr: float,
    schedule: str = "cosine",
    *,
    total_steps: int,
    warmup_steps: int = 0,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    boundaries: Sequence[float] = (0.5, 0.75),
    factor: float = 0.1,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """optax optimizer with a schedule and kernel-only weight decay.

    sgd: PyTorch-style SGD (coupled L2: ``g + wd * w`` on kernels, then momentum / nesterov).
    adamw: decoupled weight decay on kernels; ``momentum`` is b1.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    _check_lr(lr)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    sched = make_schedule(
        schedule, lr, total_steps, warmup_steps=warmup_steps, boundaries=boundaries, factor=factor
    )
    if name == "sgd":
        parts = []
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        parts.append(optax.sgd(sched, momentum=momentum or None, nesterov=nesterov))
        return optax.chain(*parts)
    return optax.adamw(sched, b1=momentum, b2=b2, weight_decay=weight_decay, mask=decay_mask)


# ==================================================================================================
# losses
# ==================================================================================================
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float,
    temperature: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``alpha * CE(labels) + (1 - alpha) * T^2 * KL(p_T || q_T)`` (Hinton et al. 2015).

    p_T = softmax(teacher / T), q_T = softmax(student / T); KL summed over classes, averaged over the
    batch. The teacher logits are treated as constants. Returns (loss, (ce, kl)).
    """
    t = temperature
    s = student_logits.astype(jnp.float32)
    tl = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    ce = cross_entropy(s, labels)
    log_p = jax.nn.log_softmax(tl / t, axis=-1)
    log_q = jax.nn.log_softmax(s / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean()
    return alpha * ce + (1.0 - alpha) * (t * t) * kl, (ce, kl)


# ==================================================================================================
# augmentation and data order (fgq_jax.data's, re-exported)
# ==================================================================================================
def random_crop_flip(rng: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """CIFAR augmentation on device (:func:`fgq_jax.data.augment_cifar`): zero-pad by ``pad``, random
    crop back to H x W, random horizontal flip; uint8 in -> uint8 out (black padding, as
    torchvision's ``RandomCrop(32, padding=4)``), normalise afterwards."""
    from fgq_jax.data import augment_cifar

    return augment_cifar(rng, images, padding=pad)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch, a function of (seed, epoch, n) only (so a resume replays it):
    :func:`fgq_jax.data.epoch_permutation`."""
    from fgq_jax.data import epoch_permutation as _perm

    return _perm(n, seed, epoch)


# ==================================================================================================
# state and step
# ==================================================================================================
def _zero_metrics() -> dict[str, jax.Array]:
    return {
        "loss_sum": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }


@flax.struct.dataclass
class TrainState:
    """The complete training state (a pytree; checkpointed as is).

    params: latent float parameters (what the optimizer updates; the forward pass sees their
      ternarized version). batch_stats: BN running statistics. opt_state: optax state. step: int32
      scalar, optimizer steps done. rng: PRNGKey (uint32[2]); the step key is fold_in(rng, step).
    act_steps: {layer_path: float32 step} fixed by the calibration at the start of the run.
    metrics: running sums of the current epoch (loss_sum, correct, count), reset at epoch start.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    act_steps: dict[str, jax.Array]
    metrics: dict[str, jax.Array]


def create_train_state(
    variables: Mapping[str, Any],
    tx: optax.GradientTransformation,
    seed: int,
    act_steps: Mapping[str, Any] | None = None,
) -> TrainState:
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, dict(variables.get("batch_stats", {})))
    act_steps = {k: jnp.asarray(v, jnp.float32) for k, v in dict(act_steps or {}).items()}

    @jax.jit
    def build(params, batch_stats, act_steps):  # one compilation instead of many eager ops
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=jax.tree.map(jnp.copy, params),
            batch_stats=jax.tree.map(jnp.copy, batch_stats),
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            act_steps=act_steps,
            metrics=_zero_metrics(),
        )

    return build(params, batch_stats, act_steps)


ApplyFn = Callable[..., Any]  # (variables, x, act_steps, *, train, mutable) -> logits | (logits, upd)


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    weight_quant: Callable[[Any], Any] | None = None,
    augment: bool = True,
    teacher_apply: Callable[[Any, jax.Array], jax.Array] | None = None,
    distill_alpha: float = 0.5,
    distill_temperature: float = 4.0,
    donate: bool = True,
    jit: bool = True,
):
    """Build ``train_step(state, images, labels, teacher_variables=None) -> (state, metrics)``.

    apply_fn(variables, x, act_steps, train=..., mutable=...): the (activation-quantizing) forward,
      e.g. ``partial(quantized_apply, module, act_cfg=...)`` adapted by :func:`make_apply_fn`.
    preprocess(images) -> float NHWC: normalisation (after augmentation, inside the step).
    weight_quant(params) -> params: fake-quantized weights with a straight-through gradient
      (``quantize_params(p, rules, mode="fake", ste=True)``); None -> full precision.
    teacher_apply(teacher_variables, x) -> logits: the frozen teacher (eval mode); None -> plain CE.

    images: uint8 (or float) [B, H, W, C] with a fixed B (one compilation); labels int32 [B].
    The batch may be sharded over devices (data parallel): the step is a plain jitted function, so
    sharded inputs and replicated state give the same numbers as one device.
    """

    def loss_fn(params, state, x, labels, teacher_variables):
        qparams = weight_quant(params) if weight_quant is not None else params
        variables = {"params": qparams, "batch_stats": state.batch_stats}
        logits, updates = apply_fn(
            variables, x, state.act_steps, train=True, mutable=["batch_stats"]
        )
        if teacher_apply is not None:
            t_logits = jax.lax.stop_gradient(teacher_apply(teacher_variables, x))
            loss, (ce, _) = distillation_loss(
                logits, t_logits, labels, distill_alpha, distill_temperature
            )
        else:
            ce = cross_entropy(logits, labels)
            loss = ce
        new_bs = updates.get("batch_stats", state.batch_stats) if updates else state.batch_stats
        return loss, (logits, new_bs, ce)

    def step_fn(state: TrainState, images, labels, teacher_variables=None):
        key = jax.random.fold_in(state.rng, state.step)
        if augment:
            images = random_crop_flip(key, images)
        x = preprocess(images)
        (loss, (logits, new_bs, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, x, labels, teacher_variables
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32)
        b = labels.shape[0]
        m = state.metrics
        metrics = {
            "loss_sum": m["loss_sum"] + loss.astype(jnp.float32) * b,
            "correct": m["correct"] + correct,
            "count": m["count"] + jnp.int32(b),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_bs,
            opt_state=opt_state,
            metrics=metrics,
        )
        return new_state, {"loss": loss, "ce": ce, "correct": correct}

    if not jit:
        return step_fn
    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def make_apply_fn(module, act_cfg=None) -> ApplyFn:
    """The default forward: :func:`fgq_jax.evaluate.quantized_apply` (activation quantization at the
    inputs of ``act_cfg``'s layers, clipped STE); plain ``module.apply`` when ``act_cfg`` is empty."""
    if act_cfg is None or not getattr(act_cfg, "layers", ()):

        def plain(variables, x, act_steps, *, train=False, mutable=False):
            return module.apply(variables, x, train=train, mutable=mutable)

        return plain
    from fgq_jax.intercept import quantized_apply

    def apply(variables, x, act_steps, *, train=False, mutable=False):
        return quantized_apply(module, variables, x, act_cfg, act_steps, train=train, mutable=mutable)

    return apply


# ==================================================================================================
# overhead accounting
# ==================================================================================================
def overhead_pct(images_seen: int, original_epochs: int = 182, original_train_size: int = 50_000) -> float:
    """Fine-tuning images as % of the original training schedule (182 x 50,000 for CIFAR ResNets)."""
    return 100.0 * float(images_seen) / (float(original_epochs) * float(original_train_size))


def time_train_steps(
    steps: Mapping[str, Callable],
    state: Any,
    batch: Sequence[Any],
    repeats: int = 10,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Wall-clock per step of several jitted steps ``fn(state, *batch)`` on the same state and batch.

    Compilation is excluded: each step first runs ``warmup`` times (the first call's time, compile
    included when not compiled yet, is reported as ``first_call_s``). Every call gets a fresh copy of
    ``state`` made outside the timed region, so steps that donate their state can be timed too (and
    the training step's own executable is reused). The steps are interleaved per repeat so that load
    changes on a shared machine hit them alike. Returns {name: {median_s, min_s, first_call_s, repeats}}.
    """

    def fresh():
        return jax.block_until_ready(jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array) else a, state))

    out: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, fn in steps.items():
        for i in range(max(1, warmup)):
            st = fresh()
            t0 = time.perf_counter()
            jax.block_until_ready(fn(st, *batch))
            if i == 0:
                out[name] = {"first_call_s": time.perf_counter() - t0}
    for _ in range(repeats):
        for name, fn in steps.items():
            st = fresh()
            t0 = time.perf_counter()
            jax.block_until_ready(fn(st, *batch))
            times[name].append(time.perf_counter() - t0)
    for name in steps:
        ts = times[name] or [float("nan")]
        out[name].update(median_s=statistics.median(ts), min_s=min(ts), repeats=len(times[name]))
    return out


# ==================================================================================================
# checkpoints
# ==================================================================================================
class CheckpointMismatchError(ValueError):
    """``resume`` found checkpoints made with another architecture / quantization / recipe."""


def _ckpt_dir(workdir) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def _manager(workdir, config: TrainConfig | None = None, read_only: bool = False):
    import orbax.checkpoint as ocp

    if read_only:
        opts = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep, create=True, enable_async_checkpointing=True
        )
    return ocp.CheckpointManager(_ckpt_dir(workdir), options=opts)


def _quiet_orbax():
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)


def latest_checkpoint_meta(workdir) -> tuple[int | None, dict | None]:
    """(step, metadata) of the newest complete checkpoint in ``workdir``; (None, None) if none.

    Opens the directory read-only: nothing is written, deleted or cleaned up."""
    import orbax.checkpoint as ocp

    d = _ckpt_dir(workdir)
    if not d.is_dir():
        return None, None
    mngr = _manager(workdir, read_only=True)
    step = mngr.latest_step()
    if step is None:
        return None, None
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    mngr.close()
    return step, meta


def check_resume_compatible(saved: Mapping[str, Any], config: TrainConfig, where: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` if ``config`` differs from the checkpoint's config in
    anything but the run-time fields. The message names the fields and both values."""
    now = config.to_dict()
    diffs = {k: (saved.get(k, "<missing>"), now[k]) for k in now if k not in RUNTIME_FIELDS and saved.get(k, "<missing>") != now[k]}
    if not diffs:
        return
    kinds = []
    if any(k in ARCH_FIELDS for k in diffs):
        kinds.append("architecture/initialisation")
    if any(k in QUANT_FIELDS for k in diffs):
        kinds.append("quantization")
    if any(k not in ARCH_FIELDS and k not in QUANT_FIELDS for k in diffs):
        kinds.append("training recipe")
    detail = "; ".join(f"{k}: checkpoint={a!r}, now={b!r}" for k, (a, b) in sorted(diffs.items()))
    raise CheckpointMismatchError(
        f"cannot resume{(' from ' + where) if where else ''}: the checkpoint was made with a different "
        f"{' and '.join(kinds)} config ({detail}). Use the original config or a fresh --workdir; "
        "the existing checkpoints were left untouched."
    )


# ==================================================================================================
# data helpers
# ==================================================================================================
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


def _subset(images, labels, n: int):
    """A fixed (seed-independent) random subset of n examples, in their original order: splits stored
    class by class would give one class only with the first n."""
    if n >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng(1234).permutation(len(labels))[:n])
    return images[idx], labels[idx]


def _default_normalize(family: str):
    """``fgq_jax.data.normalize`` (jnp-compatible, used inside jit) for ``family``."""
    from fgq_jax.data import normalize

    return functools.partial(normalize, family=family)


# ==================================================================================================
# small utilities: atomic writes, metadata
# ==================================================================================================
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    from fgq_jax.fileio import atomic_write_text

    atomic_write_text(path, text)


def _to_py(x):
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).item()
    if isinstance(x, dict):
        return {k: _to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_py(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ==================================================================================================
# weight quantization, calibration, evaluation
# ==================================================================================================
def make_weight_quant(config: TrainConfig, spec, ste: bool) -> Callable[[Any], Any] | None:
    """``params -> fake-quantized params`` for ``config`` via :mod:`fgq_jax.transforms` (None in FP
    mode). ``ste=True``: straight-through gradient to the latent weights (training)."""
    if not config.quantize:
        return None
    rules = _rules(config, spec)
    from fgq_jax import transforms

    def wq(params):
        return transforms.quantize_params(params, rules, mode="fake", ste=ste)

    return wq


def _rules(config: TrainConfig, spec):
    from fgq_jax import transforms

    wq = transforms.WeightQuant(
        method=config.method,
        group_size=config.group_size,
        asymmetric=config.asymmetric,
        grouping=config.grouping,
    )
    return transforms.default_rules(wq, spec.first_layer, spec.last_layer, first_last=config.first_last)


def quantized_layer_paths(config: TrainConfig, spec, params) -> list[str]:
    """Layer paths (no leaf name) whose kernels ``config`` quantizes (empty in FP mode).

    As in :mod:`fgq_jax.ptq`, their inputs get the activation quantizer, except the first layer's
    (the network input, the normalised image)."""
    if not config.quantize:
        return []
    from fgq_jax import transforms

    out = []
    for p, q in transforms.quantized_paths(params, _rules(config, spec)).items():
        if q is None:
            continue
        p = "/".join(p) if isinstance(p, tuple) else str(p)
        p = p[: -len("/kernel")] if p.endswith("/kernel") else p
        if p != spec.first_layer:
            out.append(p)
    return out


def calibrate_act_steps(
    module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    layers: Sequence[str],
    bits: int,
    preprocess: Callable,
    *,
    method: str = "percentile",
    percentile: float = 99.99,
    pow2: bool = False,
    batch_size: int = 256,
):
    """One activation step per layer input, calibrated in call order with the earlier layers already
    quantized (so each step sees what the quantized network really produces). A layer whose sample
    inputs are never negative gets an unsigned quantizer, otherwise a signed one. The algorithm of
    :func:`fgq_jax.evaluate.calibrate_steps`, with the normalisation injected (``preprocess``).

    images: uint8 [N, H, W, C] (no augmentation, labels unused); variables: the (fake-quantized)
    weights the training starts from. Returns (ActConfig, {layer_path: float32 step}).
    """
    from fgq_jax import activations
    from fgq_jax.activations import ActConfig
    from fgq_jax.intercept import capture_layer_io, linear_layer_paths

    wanted = set(layers)
    order = [p for p in linear_layer_paths(module, variables, images.shape[1:]) if p in wanted]
    missing = wanted - set(order)
    if missing:
        raise ValueError(f"layers not found among the model's conv/dense layers: {sorted(missing)}")
    x = preprocess(jnp.asarray(images))
    capture = jax.jit(lambda v, xb, st, cfg: capture_layer_io(module, v, xb, cfg, st), static_argnums=3)
    spec: list[tuple[str, int, bool]] = []
    steps: dict[str, jax.Array] = {}
    for path in order:
        cfg = ActConfig(tuple(spec))
        parts = [capture(variables, x[i : i + batch_size], dict(steps), cfg)[path].reshape(-1)
                 for i in range(0, x.shape[0], batch_size)]
        sample = jnp.concatenate(parts)
        signed = bool(jnp.min(sample) < 0)
        step = activations.calibrate(sample, bits, method=method, signed=signed, percentile=percentile, pow2=pow2)
        spec.append((path, int(bits), signed))
        steps[path] = jnp.asarray(step, jnp.float32)
    return ActConfig(tuple(spec)), steps


def make_eval_fn(apply_fn: ApplyFn, preprocess: Callable, weight_quant: Callable | None, batch_size: int, mesh=None):
    """``eval(params, batch_stats, act_steps, images, labels) -> top-1 %`` over all images, with fixed
    batch shapes (the tail batch is padded and masked; one compilation)."""

    @jax.jit
    def quantize(params):
        return weight_quant(params) if weight_quant is not None else params

    @jax.jit
    def correct(variables, act_steps, images, labels, valid):
        logits = apply_fn(variables, preprocess(images), act_steps, train=False, mutable=False)
        return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)

    def evaluate(params, batch_stats, act_steps, images, labels) -> float:
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("evaluation set is empty")
        variables = {"params": quantize(params), "batch_stats": batch_stats}
        bs = min(batch_size, n)
        total = 0
        for i in range(0, n, bs):
            xb, yb = images[i : i + bs], labels[i : i + bs]
            valid = np.ones(bs, bool)
            pad = bs - xb.shape[0]
            if pad:
                valid[bs - pad :] = False
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            batch = (xb, yb.astype(np.int32), valid)
            if mesh is not None:
                from fgq_jax import distributed

                batch = distributed.shard_batch(batch, mesh)
            total += int(correct(variables, act_steps, *batch))
        return 100.0 * total / n

    return evaluate


# ==================================================================================================
# the loop
# ==================================================================================================
def _history_to_jsonl(history: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(_to_py(dict(r)), sort_keys=True) + "\n" for r in history)


def fit(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    spec,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray],
    init_variables: Mapping[str, Any] | None = None,
    teacher: tuple[Any, Mapping[str, Any]] | None = None,
    resume: bool = False,
    normalize: Callable[[jax.Array], jax.Array] | None = None,
    weight_quant_factory: Callable[[bool], Callable | None] | None = None,
    act_layers: Sequence[str] | None = None,
    hooks: Sequence[Callable[[int, TrainState], None]] = (),
    mesh=None,
) -> dict[str, Any]:
    """Fine-tune ``spec.module`` from ``init_variables`` according to ``config``; return a summary.

    spec: object with ``module`` (Linen, ``__call__(x, train)``), ``first_layer``, ``last_layer``,
      ``dataset_family`` and ``input_shape`` (a :class:`fgq_jax.models.ModelSpec`).
    train_data / test_data: (uint8 images [N, H, W, C], int labels [N]); ``config.train_subset`` /
      ``test_subset`` take a fixed random subset.
    init_variables: {"params", "batch_stats"}; None -> ``module.init`` with ``config.seed``.
    teacher: (module, variables) of the frozen FP teacher for ``config.distill``; None -> the student
      architecture with ``init_variables``.
    resume: continue from the newest checkpoint in ``<workdir>/checkpoints`` (same numbers as an
      uninterrupted run); its stored config must match ``config`` except for ``RUNTIME_FIELDS``,
      else :class:`CheckpointMismatchError` (nothing written). Without ``resume``, a workdir that
      already holds checkpoints is refused (FileExistsError).
    normalize: images -> float (jnp, used inside jit); None -> ``fgq_jax.data.normalize`` for
      ``spec.dataset_family`` (the start-of-run BN re-estimation, ``fgq_jax.repairs``, always uses
      the latter).
    weight_quant_factory(ste) -> params -> params: overrides :func:`make_weight_quant` (injection).
    act_layers: overrides the layers whose inputs are quantized (default: those with quantized
      weights, when ``config.act_bits`` is set).
    hooks: called as ``hook(step, state)`` after every step (after its checkpoint save, if any).
    mesh: optional ``jax.sharding.Mesh`` (data-parallel batch sharding via ``fgq_jax.distributed``).

    Side effects in ``workdir``: ``checkpoints/`` (orbax), ``metrics.jsonl`` (one JSON object per
    epoch; epoch 0 = before fine-tuning), ``export/`` (final weights, see :func:`_export`).
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    _quiet_orbax()
    validate_config(config)
    workdir = Path(workdir).absolute()
    module = spec.module
    family = getattr(spec, "dataset_family", "cifar")
    preprocess = normalize or _default_normalize(family)

    # ---- data
    train_x, train_y = train_data
    test_x, test_y = test_data
    if config.train_subset:
        train_x, train_y = _subset(train_x, train_y, config.train_subset)
    if config.test_subset:
        test_x, test_y = _subset(test_x, test_y, config.test_subset)
    train_y = np.asarray(train_y, np.int32)
    test_y = np.asarray(test_y, np.int32)
    n_train, bsz = int(train_x.shape[0]), config.batch_size
    spe = n_train // bsz
    if spe < 1:
        raise ValueError(f"{n_train} training images do not fill one batch of {bsz}")
    if config.steps_per_epoch:
        spe = min(spe, config.steps_per_epoch)
    total_steps = spe * config.epochs
    warmup_steps = int(round(config.warmup_epochs * spe))
    schedule_kw = dict(warmup_steps=warmup_steps, boundaries=config.step_boundaries, factor=config.step_factor)
    sched = make_schedule(config.schedule, config.lr, total_steps, **schedule_kw)
    tx = make_optimizer(
        config.optimizer, config.lr, config.schedule, total_steps=total_steps,
        momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay, **schedule_kw,
    )

    # ---- existing checkpoints: validated read-only, before anything is written
    saved_step, saved_meta = latest_checkpoint_meta(workdir)
    if saved_step is not None and not resume:
        raise FileExistsError(
            f"{_ckpt_dir(workdir)} already holds checkpoints (latest step {saved_step}); pass --resume "
            "to continue that run or choose another --workdir"
        )
    if saved_step is not None:
        check_resume_compatible(saved_meta["config"], config, str(_ckpt_dir(workdir)))

    # ---- model, quantizers
    if init_variables is None:
        init_variables = jax.jit(functools.partial(module.init, train=False))(
            jax.random.PRNGKey(config.seed), jnp.zeros((1, *train_x.shape[1:]), jnp.float32)
        )
    init_variables = {k: v for k, v in dict(init_variables).items() if k in ("params", "batch_stats")}
    if weight_quant_factory is not None:
        wq_train, wq_eval = weight_quant_factory(True), weight_quant_factory(False)
    else:
        wq_train, wq_eval = make_weight_quant(config, spec, True), make_weight_quant(config, spec, False)
    if act_layers is None:
        act_layers = quantized_layer_paths(config, spec, init_variables["params"]) if config.act_bits else []
    elif not config.act_bits:
        act_layers = []
    perm0 = epoch_permutation(config.seed, 0, n_train)
    calib_x = train_x[np.sort(perm0[: min(config.calib_images, n_train)])]

    history: list[dict[str, Any]]
    if saved_step is not None:
        from fgq_jax.activations import ActConfig

        act_cfg = ActConfig(tuple((p, int(b), bool(s)) for p, b, s in saved_meta["act_layers"]))
        dummy_steps = {p: 1.0 for p in act_cfg.paths}
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, create_train_state(init_variables, tx, config.seed, dummy_steps)
        )
        mngr_ro = _manager(workdir, read_only=True)
        try:
            restored = mngr_ro.restore(
                saved_step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            ).state
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointMismatchError(
                f"cannot restore step {saved_step} from {_ckpt_dir(workdir)} into this model's state "
                f"({type(e).__name__}: {e}); the checkpoints were left untouched"
            ) from e
        finally:
            mngr_ro.close()
        state = restored
        history = [dict(r) for r in saved_meta.get("history", [])]
        resumed_from = int(saved_step)
        print(f"[fgq-train] resumed from step {saved_step} of {total_steps} ({_ckpt_dir(workdir)})", file=sys.stderr)
    else:
        resumed_from = None
        from fgq_jax.activations import ActConfig

        act_cfg, act_steps = ActConfig(), {}
        start_vars = dict(init_variables)
        if wq_eval is not None or act_layers:
            qparams = jax.jit(wq_eval)(init_variables["params"]) if wq_eval is not None else init_variables["params"]
            qvars = {"params": qparams, "batch_stats": init_variables.get("batch_stats", {})}
            t_setup = time.perf_counter()
            if wq_eval is not None and config.bn_reestimate and jax.tree.leaves(qvars["batch_stats"]):
                # the FP running statistics do not fit the ternary network (ResNet-20 at N=64: 10 % ->
                # 62 % top-1 with re-estimated ones); the activation steps are calibrated after this
                from fgq_jax.repairs import reestimate_bn

                bn_x = train_x[np.sort(perm0[: min(config.bn_images, n_train)])]
                qvars = reestimate_bn(module, qvars, bn_x, family)
                start_vars["batch_stats"] = qvars["batch_stats"]
                print(f"[fgq-train] BN statistics re-estimated on {len(bn_x)} images "
                      f"({time.perf_counter() - t_setup:.1f} s)", file=sys.stderr)
                t_setup = time.perf_counter()
            if act_layers:
                act_cfg, act_steps = calibrate_act_steps(
                    module, qvars, calib_x, act_layers, config.act_bits, preprocess,
                    method=config.act_calibration, percentile=config.act_percentile, pow2=config.act_pow2,
                )
                print(f"[fgq-train] {len(act_cfg.layers)} activation steps calibrated on {len(calib_x)} images "
                      f"({time.perf_counter() - t_setup:.1f} s)", file=sys.stderr)
        state = create_train_state(start_vars, tx, config.seed, act_steps)
        t_setup = time.perf_counter()
        # start accuracies: the quantized model the fine-tuning starts from, and the FP model
        evaluate_q = make_eval_fn(make_apply_fn(module, act_cfg), preprocess, wq_eval, config.eval_batch_size, mesh)
        top1_start = evaluate_q(state.params, state.batch_stats, state.act_steps, test_x, test_y)
        if config.quantize or act_cfg.layers:
            evaluate_fp = make_eval_fn(make_apply_fn(module), preprocess, None, config.eval_batch_size, mesh)
            fp_start = evaluate_fp(init_variables["params"], init_variables.get("batch_stats", {}), {}, test_x, test_y)
        else:
            fp_start = top1_start
        print(f"[fgq-train] start: quantized {top1_start:.2f} %, FP {fp_start:.2f} % top-1 on "
              f"{len(test_y)} test images ({time.perf_counter() - t_setup:.1f} s)", file=sys.stderr)
        history = [{
            "epoch": 0, "step": 0, "test_top1": top1_start, "fp_start_top1": fp_start,
            "lr": float(sched(0)), "images_seen": 0, "overhead_pct": 0.0,
        }]

    apply_q = make_apply_fn(module, act_cfg)
    if saved_step is not None:
        evaluate_q = make_eval_fn(apply_q, preprocess, wq_eval, config.eval_batch_size, mesh)
    teacher_apply = teacher_vars = None
    if config.distill:
        t_module, teacher_vars = teacher if teacher is not None else (module, init_variables)
        teacher_vars = {k: v for k, v in dict(teacher_vars).items() if k in ("params", "batch_stats")}

        def teacher_apply(v, x):
            return t_module.apply(v, x, train=False)

    step_kw = dict(
        preprocess=preprocess, augment=config.augment, teacher_apply=teacher_apply,
        distill_alpha=config.distill_alpha, distill_temperature=config.distill_temperature,
    )
    train_step = make_train_step(apply_q, tx, weight_quant=wq_train, **step_kw)
    local_slice = slice(None)
    if mesh is not None:
        from fgq_jax import distributed

        n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
        if bsz % (n_local * jax.process_count()):
            raise ValueError(
                f"batch_size {bsz} must be a multiple of the {n_local * jax.process_count()} devices of the "
                "mesh (a padded training batch would change the loss and the BN statistics)"
            )
        per_proc = bsz // jax.process_count()
        local_slice = slice(jax.process_index() * per_proc, (jax.process_index() + 1) * per_proc)

        state = distributed.replicate(state, mesh)
        if teacher_vars is not None:
            teacher_vars = distributed.replicate(teacher_vars, mesh)

    # ---- outputs
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "metrics.jsonl"
    _atomic_write_text(metrics_path, _history_to_jsonl(history))  # truncates lines past the checkpoint
    mngr = ocp.CheckpointManager(
        _ckpt_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        ),
    )
    meta_base = {
        "format": 1,
        "config": config.to_dict(),
        "act_layers": [list(layer) for layer in act_cfg.layers],
        "steps_per_epoch": spe,
        "total_steps": total_steps,
    }

    def save(step: int) -> None:
        if step in mngr.all_steps():
            return
        # a copy: the next (donating) step reuses the live buffers while orbax writes in background
        snapshot = jax.tree.map(jnp.copy, state)
        meta = dict(meta_base, step=step, history=_to_py(history))
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    # ---- train
    step = int(state.step)
    if step % spe != 0 and history and history[-1]["step"] > step:
        history = [r for r in history if r["step"] <= step]
    compile_s = None
    try:
        for epoch in range(step // spe, config.epochs):
            perm = epoch_permutation(config.seed, epoch, n_train)
            first = step - epoch * spe
            if first == 0:
                state = state.replace(metrics=jax.tree.map(jnp.zeros_like, state.metrics))
            bar = tqdm(total=spe, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                       disable=not config.progress, leave=False, dynamic_ncols=True)
            t0 = time.perf_counter()
            epoch_compile = 0.0
            for i in range(first, spe):
                idx = perm[i * bsz : (i + 1) * bsz]
                batch = (train_x[idx], train_y[idx])
                if mesh is not None:  # this process's rows of the global batch, split over its devices
                    batch = distributed.shard_batch((batch[0][local_slice], batch[1][local_slice]), mesh)
                if compile_s is None:
                    tc = time.perf_counter()
                    state, m = train_step(state, *batch, teacher_vars)
                    jax.block_until_ready(m)
                    compile_s = epoch_compile = time.perf_counter() - tc
                else:
                    state, m = train_step(state, *batch, teacher_vars)
                step = epoch * spe + i + 1
                bar.update(1)
                if step % config.log_every == 0 or i == spe - 1:
                    el = time.perf_counter() - t0 - epoch_compile
                    done = i + 1 - first
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}", img_s=f"{done * bsz / max(el, 1e-9):.0f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0 and i != spe - 1:
                    save(step)
                for hook in hooks:
                    hook(step, state)
            jax.block_until_ready(state)
            train_s = time.perf_counter() - t0
            bar.close()
            steps_run = spe - first
            te = time.perf_counter()
            test_top1 = evaluate_q(state.params, state.batch_stats, state.act_steps, test_x, test_y)
            eval_s = time.perf_counter() - te
            mt = jax.device_get(state.metrics)
            count = max(int(mt["count"]), 1)
            if not math.isfinite(float(mt["loss_sum"])):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1} (loss {float(mt['loss_sum']) / count}); "
                    f"lower the learning rate (lr={config.lr}). The checkpoints of earlier epochs in "
                    f"{_ckpt_dir(workdir)} are kept"
                )
            images_seen = step * bsz
            rec = {
                "epoch": epoch + 1,
                "step": step,
                "loss": float(mt["loss_sum"]) / count,
                "train_top1": 100.0 * int(mt["correct"]) / count,
                "test_top1": test_top1,
                "lr": float(sched(step - 1)),
                "images_per_s": steps_run * bsz / max(train_s - epoch_compile, 1e-9),
                "wall_s": train_s,
                "eval_s": eval_s,
                "compile_s": epoch_compile,
                "images_seen": images_seen,
                "overhead_pct": overhead_pct(images_seen, config.original_epochs, config.original_train_size),
                "resumed": first != 0,
            }
            history.append(rec)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(_to_py(rec), sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            print(
                f"[fgq-train] epoch {epoch + 1}/{config.epochs} loss {rec['loss']:.4f} "
                f"train {rec['train_top1']:.2f}% test {test_top1:.2f}% {rec['images_per_s']:.0f} img/s "
                f"({train_s:.1f} s + eval {eval_s:.1f} s)",
                file=sys.stderr,
            )
            save(step)
    finally:  # let an in-flight (async) checkpoint write finish, even on Ctrl-C
        mngr.wait_until_finished()
        mngr.close()

    # ---- step time, quantized vs FP, in this run (compile excluded)
    timing = {}
    if config.time_steps:
        idx = perm0[:bsz]
        batch = (train_x[idx], train_y[idx])
        if mesh is not None:
            batch = distributed.shard_batch((batch[0][local_slice], batch[1][local_slice]), mesh)
        batch = (*batch, teacher_vars)
        steps = {"fp": make_train_step(make_apply_fn(module), tx, **step_kw)}
        if config.quantize or act_cfg.layers:
            steps = {"quant": train_step, **steps}  # the training step itself (already compiled)
        else:
            steps = {"fp": train_step}
        timing = time_train_steps(steps, state, batch, repeats=config.time_steps)
        timing["train_step_compile_s"] = compile_s

    exported = _export(workdir, config, spec, state, act_cfg) if config.export else {}

    train_recs = [r for r in history if r["epoch"] > 0]
    summary = {
        "name": config.name,
        "model": getattr(spec, "name", None) or config.model,
        "dataset": config.dataset,
        "method": config.method if config.quantize else "fp",
        "group_size": config.group_size if config.quantize else None,
        "first_last": config.first_last if config.quantize else None,
        "act_bits": config.act_bits if act_cfg.layers else None,
        "distill": bool(config.distill),
        "epochs": config.epochs,
        "steps": total_steps,
        "batch_size": bsz,
        "top1_start": history[0]["test_top1"],
        "top1_final": history[-1]["test_top1"],
        "fp_start_top1": history[0].get("fp_start_top1"),
        "images_seen": total_steps * bsz,
        "overhead_pct": overhead_pct(total_steps * bsz, config.original_epochs, config.original_train_size),
        "train_wall_s": sum(r["wall_s"] for r in train_recs),
        "images_per_s": (sum(r["images_per_s"] for r in train_recs) / len(train_recs)) if train_recs else None,
        "step_s_quant": timing.get("quant", {}).get("median_s"),
        "step_s_fp": timing.get("fp", {}).get("median_s"),
        "step_time_ratio": (timing["quant"]["median_s"] / timing["fp"]["median_s"]) if "quant" in timing and "fp" in timing else None,
        "timing": timing,
        "act_layers": [list(layer) for layer in act_cfg.layers],
        "history": history,
        "resumed_from": resumed_from,
        "workdir": str(workdir),
        "config": config.to_dict(),
        "n_train": n_train,
        "n_test": int(test_x.shape[0]),
        "exported": {k: str(v) for k, v in exported.items()},
    }
    summary["_state"] = state
    return summary


def _replace_dir(final: Path, write: Callable[[Path], Any]) -> Path:
    """Write a directory with ``write(tmp_path)`` (which must create it), then swap it in for
    ``final``: a crash leaves the old or the new directory, never a half-written one."""
    import shutil

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _export(workdir: Path, config: TrainConfig, spec, state: TrainState, act_cfg) -> dict[str, Path]:
    """Final weights: ``export/variables`` (latent float params + BN stats, loadable with
    ``fgq_jax.checkpoint.load_variables``, e.g. as a distillation teacher) and, for quantized runs,
    ``export/ternary`` (``fgq_jax.packing.save_ternary`` of the ternary tree, codes 2 bits/weight,
    plus BN stats and activation steps)."""
    from fgq_jax.checkpoint import save_variables

    params = jax.device_get(state.params)
    batch_stats = jax.device_get(state.batch_stats)
    act_steps = {k: float(v) for k, v in jax.device_get(state.act_steps).items()}
    meta = {
        "kind": "fgq-finetune", "model": config.model, "config": config.to_dict(),
        "act_layers": [list(layer) for layer in act_cfg.layers], "act_steps": act_steps,
        "step": int(state.step),
    }
    out = {}
    out["variables"] = _replace_dir(
        workdir / "export" / "variables",
        lambda p: save_variables(p, {"params": params, "batch_stats": batch_stats}, meta),
    )
    if config.quantize:
        try:
            from fgq_jax import packing, transforms

            tree = {
                "params": transforms.quantize_params(params, _rules(config, spec), mode="ternary"),
                "batch_stats": batch_stats,
            }
            out["ternary"] = _replace_dir(workdir / "export" / "ternary", lambda p: packing.save_ternary(p, tree))
            _atomic_write_text(workdir / "export" / "ternary.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        except Exception as e:  # noqa: BLE001 - an export problem must not lose the trained run
            print(f"[fgq-train] ternary export failed: {type(e).__name__}: {e}", file=sys.stderr)
    return out


# ==================================================================================================
# results
# ==================================================================================================
CSV_COLUMNS = (
    "model", "method", "group_size", "act_bits", "distill", "epochs", "top1_start", "top1_final",
    "fp_top1", "overhead_pct", "name", "first_last", "fp_start_top1", "batch_size", "steps",
    "images_seen", "seed", "optimizer", "lr", "schedule", "train_wall_s", "images_per_s",
    "step_s_quant", "step_s_fp", "step_time_ratio", "n_train", "n_test",
)


def _results_paths(results_dir, dataset: str, model: str, name: str) -> dict[str, Path]:
    base = Path(results_dir) / dataset / model / f"finetune_{name}"
    return {ext: base.with_suffix("." + ext) for ext in ("csv", "json", "png")}


def write_results(
    summary: Mapping[str, Any],
    results_dir: str | os.PathLike = "results",
    *,
    command: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<results_dir>/<dataset>/<model>/finetune_<name>.{csv,json,png}`` atomically.

    csv: one row per finished run (a rerun with the same seed replaces its row; other seeds are
    kept), columns ``CSV_COLUMNS``. ``fp_top1`` is the final top-1 of the FP fine-tune named by
    ``config.fp_reference`` (read from its JSON), or this run's own when it is the FP run; empty when
    unknown. json: the runs with their metadata (git rev, versions, seed, date, machine, config,
    per-epoch history, step timings). png: test top-1 per epoch with the FP reference line(s).
    meta: the run's metadata (``results.run_metadata``) taken when it started, so that the git
    revision is that of the code that ran; None takes it now.
    """
    from fgq_jax import fileio
    from fgq_jax import results as results_lib

    cfg = summary["config"]
    paths = _results_paths(results_dir, summary["dataset"], summary["model"], summary["name"])
    fp_top1, fp_history, fp_note = None, None, None
    if summary["method"] == "fp":
        fp_top1, fp_note = summary["top1_final"], "this run"
    elif cfg.get("fp_reference"):
        ref = _results_paths(results_dir, summary["dataset"], summary["model"], cfg["fp_reference"])["json"]
        if ref.is_file():
            ref_runs = json.loads(ref.read_text())["runs"]
            same_seed = [r for r in ref_runs if r["config"]["seed"] == cfg["seed"]] or ref_runs
            fp_top1 = same_seed[-1]["top1_final"]
            fp_history = same_seed[-1].get("history")
            fp_note = str(ref)
        else:
            fp_note = f"missing: {ref} (run the FP fine-tune first)"
            print(f"[fgq-train] fp_top1 left empty: {fp_note}", file=sys.stderr)
    row = {k: summary.get(k) for k in CSV_COLUMNS}
    row.update(fp_top1=fp_top1, seed=cfg["seed"], optimizer=cfg["optimizer"], lr=cfg["lr"], schedule=cfg["schedule"])
    record = {k: v for k, v in summary.items() if not k.startswith("_")}
    record.update(fp_top1=fp_top1, fp_top1_source=fp_note, row=row)
    record["meta"] = dict(meta) if meta is not None else results_lib.run_metadata(seed=cfg["seed"], command=command)
    runs = []
    if paths["json"].is_file():
        try:
            runs = [r for r in json.loads(paths["json"].read_text()).get("runs", []) if r["config"]["seed"] != cfg["seed"]]
        except (ValueError, KeyError, TypeError):
            runs = []
    runs.append(_to_py(record))
    runs.sort(key=lambda r: r["config"]["seed"])
    fileio.write_json(paths["json"], {"kind": "finetune", "columns": list(CSV_COLUMNS), "runs": runs})
    fileio.write_csv(paths["csv"], [r["row"] for r in runs], CSV_COLUMNS)
    _plot(paths["png"], summary, fp_top1, fp_history)
    return paths


def _plot(path: Path, summary, fp_top1, fp_history) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker

    hist = summary["history"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    label = summary["method"] if summary["method"] == "fp" else (
        f"{summary['method']} N={summary['group_size']}, a{summary['act_bits'] or 32}" + (" +KD" if summary["distill"] else ""))
    ax.plot([r["epoch"] for r in hist], [r["test_top1"] for r in hist], "o-", label=label)
    if fp_history:
        ax.plot([r["epoch"] for r in fp_history], [r["test_top1"] for r in fp_history], "s--", color="gray", alpha=0.7, label="FP fine-tune")
    if fp_top1 is not None:
        ax.axhline(fp_top1, color="k", ls=":", label=f"FP fine-tuned {fp_top1:.2f}%")
    if hist[0].get("fp_start_top1") is not None:
        ax.axhline(hist[0]["fp_start_top1"], color="tab:red", ls="-.", lw=0.8, label=f"FP start {hist[0]['fp_start_top1']:.2f}%")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before fine-tuning)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{summary['model']} on {summary['dataset']}: finetune_{summary['name']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())
