"""What fine-tuning costs: wall-clock per training step (quantized vs FP, in the same run) and the
fine-tuning images as a share of the original training schedule."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["overhead_pct", "time_train_steps"]


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
