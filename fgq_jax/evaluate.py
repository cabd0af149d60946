"""The one evaluation loop: jit-compiled top-1/top-5 of any (quantized) Flax Linen classifier.

The forward is `fgq_jax.intercept.quantized_apply`; weights and activation steps are traced
arguments, so one compiled step serves every group size, method and calibration of a sweep
(`Evaluator.compilations` counts its traces so tests can check this). Post-training quantization,
fine-tuning and the peer comparison all evaluate with it.

Without a mesh, whole batches go round robin to the local devices, each running the same
single-device program: the counts are those of one device bit for bit, and on a CPU split into one
device per core (`experiments.cli`, ``--cpu-devices``) both cores work. (XLA's convolutions at
ResNet-20's widths mostly run on one thread.) A mesh instead shards each batch (SPMD), which XLA
may compile differently: it has rewritten the quantizer's ``x / step`` as ``x * (1 / step)``.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax import distributed
from fgq_jax.activations import ActConfig
from fgq_jax.data import normalize
from fgq_jax.intercept import quantized_apply


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    correct1: int
    correct5: int
    num_images: int
    seconds: float
    images_per_s: float


class Evaluator:
    """A compiled evaluation step for one (model, activation config); reused across sweep points.

    `compilations` counts how often the step was traced: changing weights (group size, method) or
    activation steps must leave it at 1.
    mesh: shard each batch over it (SPMD). devices (without a mesh): the devices that take whole
      batches in turn; default every local device.
    """

    def __init__(self, module: nn.Module, family: str, act_cfg: ActConfig | None = None, mesh=None,
                 devices: Sequence[jax.Device] | None = None):
        self.module = module
        self.family = family
        self.act_cfg = act_cfg or ActConfig()
        self.mesh = mesh
        if mesh is not None and devices is not None:
            raise ValueError("Evaluator: give a mesh or devices, not both")
        self.devices = () if mesh is not None else tuple(devices or jax.local_devices())
        self.compilations = 0
        self._step = jax.jit(self._eval_step)

    def _eval_step(self, variables, act_steps, images_u8, labels, valid):
        self.compilations += 1  # Python side effect: runs once per trace
        x = normalize(images_u8, self.family)
        logits = quantized_apply(self.module, variables, x, self.act_cfg, act_steps)
        top5 = jax.lax.top_k(logits, 5)[1]
        hit = top5 == labels[:, None]
        correct1 = jnp.sum(hit[:, 0] & valid)
        correct5 = jnp.sum(jnp.any(hit, axis=1) & valid)
        return correct1, correct5

    def __call__(
        self,
        variables: Mapping[str, Any],
        images: np.ndarray,
        labels: np.ndarray,
        act_steps: Mapping[str, jax.Array] | None = None,
        *,
        batch_size: int = 500,
        progress: bool | str = True,
    ) -> EvalResult:
        """Top-1/top-5 over all `images` (uint8 [N,H,W,C]) with integer `labels` [N]."""
        from tqdm.auto import tqdm

        act_steps = dict(act_steps or {})
        missing = set(self.act_cfg.paths) - set(act_steps)
        if missing:
            raise ValueError(f"act_steps lacks steps for quantized layers: {sorted(missing)}")
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("evaluate: no images given")
        if self.mesh is not None:
            weights = [(distributed.replicate(variables, self.mesh),
                        distributed.replicate(act_steps, self.mesh))]
        else:  # one copy per device; batch k runs on device k mod len(devices)
            weights = [jax.device_put((variables, act_steps), d) for d in self.devices]
        c1 = c5 = 0
        start = time.perf_counter()
        desc = progress if isinstance(progress, str) else "eval"
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
        # counts of dispatched batches, read once every device has a later batch queued (one
        # device: the host prepares batch i+1 while batch i computes)
        pending = deque()

        def collect(counts):
            nonlocal c1, c5
            (k1, k5), done = counts
            c1 += int(k1)
            c5 += int(k5)
            bar.update(done)
            bar.set_postfix(img_s=f"{bar.n / (time.perf_counter() - start):.0f}")

        for k, i in enumerate(range(0, n, batch_size)):
            xb, yb = images[i : i + batch_size], labels[i : i + batch_size]
            valid = np.ones(batch_size, bool)
            pad = batch_size - xb.shape[0]
            if pad:  # fixed shapes: pad the tail batch instead of compiling a new step for it
                valid[batch_size - pad :] = False
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            batch = (xb, np.asarray(yb, np.int32), valid)
            if self.mesh is not None:
                batch = distributed.shard_batch(batch, self.mesh)
            else:
                batch = jax.device_put(batch, self.devices[k % len(self.devices)])
            pending.append((self._step(*weights[k % len(weights)], *batch), batch_size - pad))
            if len(pending) > len(weights):
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
        bar.close()
        seconds = time.perf_counter() - start
        return EvalResult(
            top1=100.0 * c1 / n,
            top5=100.0 * c5 / n,
            correct1=c1,
            correct5=c5,
            num_images=n,
            seconds=seconds,
            images_per_s=n / seconds,
        )


def evaluate(
    module: nn.Module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    family: str,
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    **kwargs,
) -> EvalResult:
    """One-off evaluation (builds an `Evaluator`; reuse an `Evaluator` to avoid recompiling)."""
    mesh, devices = kwargs.pop("mesh", None), kwargs.pop("devices", None)
    return Evaluator(module, family, act_cfg, mesh=mesh, devices=devices)(variables, images, labels, act_steps, **kwargs)
