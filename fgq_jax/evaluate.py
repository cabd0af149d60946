"""jit-compiled (quantized) evaluation of any Flax Linen classifier.

Activation quantization is added *from outside the model*: `flax.linen.intercept_methods` wraps the
`__call__` of every `nn.Conv` / `nn.Dense` whose path is listed in an `ActConfig`, and quantizes that
layer's input with a per-layer step passed as an array argument. Nothing in the model code changes,
and because weights and steps are traced arguments, one compiled forward serves every group size,
method and calibration of a sweep (`Evaluator` counts its compilations so tests can check this).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax import activations
from fgq_jax.data import normalize

LINEAR_LAYERS = (nn.Conv, nn.Dense)


def layer_path(module: nn.Module) -> str:
    """'/'-joined path of a bound module, matching its parameter path without the leaf name."""
    return "/".join(module.path)


@dataclasses.dataclass(frozen=True)
class ActConfig:
    """Which layer inputs are quantized, to how many bits, and signed or not.

    Static (hashable): changing it means a different compiled forward. The per-layer *steps* are not
    part of it; they travel as arrays.

    Attributes:
      layers: tuple of (layer_path, bits, signed), one per quantized layer input.
    """

    layers: tuple[tuple[str, int, bool], ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p, _, _ in self.layers)

    def spec(self) -> dict[str, tuple[int, bool]]:
        return {p: (b, s) for p, b, s in self.layers}


def _intercepting(
    fn: Callable,
    act_cfg: ActConfig,
    act_steps: Mapping[str, jax.Array] | None,
    captured: dict[str, jax.Array] | None = None,
    capture: str = "input",
    enabled: Mapping[str, jax.Array] | None = None,
):
    """Run `fn()` with activation quantization (and optionally capture) at conv/dense layers.

    captured: if a dict is given, every conv/dense layer's (quantized) input -- or output, with
      capture="output" -- is stored in it under the layer path. Used by calibration and repairs.
    enabled: optional {layer_path: bool scalar array}; a layer whose flag is False passes its input
      through unquantized. Lets sequential calibration switch layers on without recompiling.
    """
    spec = act_cfg.spec()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, LINEAR_LAYERS):
            return next_fun(*args, **kwargs)
        path = layer_path(module)
        x = args[0]
        if act_steps is not None and path in spec:
            bits, signed = spec[path]
            q = activations.quantize_activation(x, bits, act_steps[path], signed=signed)
            x = q if enabled is None else jnp.where(enabled[path], q, x)
        if captured is not None and capture == "input":
            captured[path] = x
        y = next_fun(x, *args[1:], **kwargs)
        if captured is not None and capture == "output":
            captured[path] = y
        return y

    with nn.intercept_methods(interceptor):
        return fn()


def quantized_apply(
    module: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    *,
    train: bool = False,
    mutable: Any = False,
):
    """`module.apply(variables, x, train=train)` with the inputs of `act_cfg`'s layers quantized.

    x: float32 [B, H, W, C], already normalised. act_steps: {layer_path: scalar step} (float32 arrays).
    Returns what `module.apply` returns (logits, or (logits, updates) when mutable).
    """
    act_cfg = act_cfg or ActConfig()
    return _intercepting(
        lambda: module.apply(variables, x, train=train, mutable=mutable), act_cfg, act_steps
    )


def capture_layer_io(
    module: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    capture: str = "input",
    enabled: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Inputs (as the layer sees them, after activation quantization) or outputs of every conv/dense.

    Returns {layer_path: array}. Pure and jit-able (the dict is filled while tracing).
    """
    captured: dict[str, jax.Array] = {}
    _intercepting(
        lambda: module.apply(variables, x, train=False),
        act_cfg or ActConfig(),
        act_steps,
        captured,
        capture,
        enabled,
    )
    return captured


def linear_layer_paths(module: nn.Module, variables: Mapping[str, Any], input_shape) -> list[str]:
    """Paths of every conv/dense layer in call order (found by abstract evaluation, no FLOPs)."""
    order: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, LINEAR_LAYERS):
            path = layer_path(context.module)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    def run(v):
        with nn.intercept_methods(interceptor):
            return module.apply(v, jnp.zeros((1, *input_shape), jnp.float32), train=False)

    jax.eval_shape(run, variables)
    return order


# --------------------------------------------------------------------------------------------------
# Calibration of activation steps


def _subsample(sample: jax.Array, k: int) -> jax.Array:
    """At most k values of `sample`, drawn uniformly (fixed key), plus its extremes.

    Calibrators cost O(candidates x samples); a few hundred thousand values pin a step down as well
    as millions, and keeping the min and max leaves the "max" calibrator exact.
    """
    if sample.size <= k:
        return sample
    idx = jax.random.randint(jax.random.key(0), (k,), 0, sample.size)
    return jnp.concatenate([sample[idx], jnp.stack([jnp.min(sample), jnp.max(sample)])])


@jax.jit(static_argnums=0)
def _input_minima(module, variables, x):
    return {p: jnp.min(a) for p, a in capture_layer_io(module, variables, x).items()}


@jax.jit(static_argnums=(0, 1, 2))
def _capture(module, act_cfg, path, variables, x, steps, enabled):
    return capture_layer_io(module, variables, x, act_cfg, steps, enabled=enabled)[path]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How activation steps are chosen from sample activations (see `activations.calibrate`)."""

    method: str = "mse"
    percentile: float = 99.99
    pow2: bool = False
    max_samples: int = 1 << 18  # per layer; larger samples are subsampled (the maximum is kept)


def calibrate_steps(
    module: nn.Module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    act_bits: int,
    layers: Iterable[str],
    family: str,
    calibration: Calibration = Calibration(),
    batch_size: int = 256,
) -> tuple[ActConfig, dict[str, jax.Array]]:
    """Calibrate one step per layer input from sample images.

    Layers are calibrated in call order with the earlier layers already quantized, so each step sees
    the activations the quantized network really produces. A layer whose sample inputs are never
    negative (after ReLU) gets an unsigned quantizer, otherwise a signed one.

    images: uint8 [N, H, W, C] (training images; labels are never used).
    Returns (ActConfig, {layer_path: float32 scalar step}).
    """
    layers = list(layers)
    x = normalize(jnp.asarray(images), family)
    batches = [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
    # Signedness first, from one unquantized pass: inputs that follow a ReLU are never negative
    # whatever happens upstream, so this decides each quantizer's range once and for all.
    mins = [_input_minima(module, variables, xb) for xb in batches]
    cfg = ActConfig(tuple((p, act_bits, bool(min(float(m[p]) for m in mins) < 0)) for p in layers))
    # Steps and enable flags are arrays, so one compiled capture serves every layer in turn.
    steps = {p: jnp.ones((), jnp.float32) for p in layers}
    enabled = {p: jnp.zeros((), bool) for p in layers}
    for path, bits, signed in cfg.layers:
        sample = jnp.concatenate(
            [_capture(module, cfg, path, variables, xb, steps, enabled).reshape(-1) for xb in batches]
        )
        sample = _subsample(sample, calibration.max_samples)
        steps[path] = jnp.asarray(
            activations.calibrate(
                sample,
                bits,
                method=calibration.method,
                signed=signed,
                percentile=calibration.percentile,
                pow2=calibration.pow2,
            ),
            jnp.float32,
        )
        enabled[path] = jnp.ones((), bool)
    return cfg, steps


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
    """

    def __init__(self, module: nn.Module, family: str, act_cfg: ActConfig | None = None, mesh=None):
        self.module = module
        self.family = family
        self.act_cfg = act_cfg or ActConfig()
        self.mesh = mesh
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
            from fgq_jax import distributed  # only multi-device runs need it

            variables = distributed.replicate(variables, self.mesh)
            act_steps = distributed.replicate(act_steps, self.mesh)
        c1 = c5 = 0
        start = time.perf_counter()
        desc = progress if isinstance(progress, str) else "eval"
        bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
        for i in range(0, n, batch_size):
            xb, yb = images[i : i + batch_size], labels[i : i + batch_size]
            valid = np.ones(batch_size, bool)
            pad = batch_size - xb.shape[0]
            if pad:  # fixed shapes: pad the tail batch instead of compiling a new step for it
                valid[batch_size - pad :] = False
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            batch = (jnp.asarray(xb), jnp.asarray(yb, jnp.int32), jnp.asarray(valid))
            if self.mesh is not None:
                batch = distributed.shard_batch(batch, self.mesh)
            k1, k5 = self._step(variables, act_steps, *batch)
            c1 += int(k1)
            c5 += int(k5)
            bar.update(batch_size - pad)
            bar.set_postfix(img_s=f"{bar.n / (time.perf_counter() - start):.0f}")
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
    mesh = kwargs.pop("mesh", None)
    return Evaluator(module, family, act_cfg, mesh=mesh)(variables, images, labels, act_steps, **kwargs)
