"""Optimizers, learning-rate schedules and losses of fine-tuning.

optax SGD (+momentum, nesterov) or AdamW with a cosine / step / constant schedule and an optional
linear warmup; weight decay on the latent conv/dense kernels only (:func:`decay_mask`); cross-entropy
and the distillation loss against a frozen teacher.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "check_lr",
    "make_schedule",
    "decay_mask",
    "make_optimizer",
    "cross_entropy",
    "distillation_loss",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def check_lr(lr) -> None:
    """ValueError unless ``lr`` is a finite number > 0."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise ValueError(f"learning rate (lr) must be a number > 0, got {lr!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"learning rate (lr) must be finite and > 0, got {lr!r}")


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
    check_lr(lr)
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
    check_lr(lr)
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
