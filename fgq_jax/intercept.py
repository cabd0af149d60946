"""Quantized forward passes and layer I/O capture, added to any Flax Linen model from outside.

`flax.linen.intercept_methods` wraps the `__call__` of every `nn.Conv` / `nn.Dense`: the layers listed
in an `ActConfig` get their input quantized with a per-layer step passed as an array argument, and
any layer's input or output can be captured. Nothing in the model code changes, and because weights
and steps are traced arguments one compiled forward serves every group size, method and calibration.
Evaluation, calibration, the repairs and fine-tuning all run the model through this module.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgq_jax import activations
from fgq_jax.activations import ActConfig

LINEAR_LAYERS = (nn.Conv, nn.Dense)

__all__ = [
    "LINEAR_LAYERS",
    "layer_path",
    "intercepting",
    "quantized_apply",
    "capture_layer_io",
    "linear_layer_paths",
    "linear_layer_modules",
]


def layer_path(module: nn.Module) -> str:
    """'/'-joined path of a bound module: its parameter path without the leaf name ("fc", not
    "fc/kernel"). `fgq_jax.transforms.path_to_str` writes the leaf paths of the same tree."""
    return "/".join(module.path)


def intercepting(
    fn: Callable[[], Any],
    act_cfg: ActConfig | None,
    act_steps: Mapping[str, jax.Array] | None,
    captured: dict[str, jax.Array] | None = None,
    capture: str = "input",
    enabled: Mapping[str, jax.Array] | None = None,
    observer: Callable | None = None,
):
    """Run `fn()` (which applies a Linen module) with activation quantization at conv/dense layers.

    act_cfg / act_steps: the quantized layer inputs and their steps (None: no quantization).
    captured: if a dict is given, every conv/dense layer's (quantized) input -- or output, with
      capture="output" -- is stored in it under the layer path (filled while tracing; jit-able).
    enabled: optional {layer_path: bool scalar array}; a layer whose flag is False passes its input
      through unquantized. Lets sequential calibration switch layers on without recompiling.
    observer: an extra flax method interceptor ``(next_fun, args, kwargs, context)`` that sees every
      module call inside the quantizing one (e.g. to read BatchNorm inputs).
    """
    spec = (act_cfg or ActConfig()).spec()

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
        if observer is None:
            return fn()
        with nn.intercept_methods(observer):
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
    return intercepting(
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
    intercepting(
        lambda: module.apply(variables, x, train=False), act_cfg, act_steps, captured, capture, enabled
    )
    return captured


def linear_layer_modules(
    module: nn.Module, variables: Mapping[str, Any], input_shape
) -> dict[str, nn.Module]:
    """{layer_path: bound conv/dense module} in call order (abstract evaluation, no FLOPs)."""
    order: dict[str, nn.Module] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, LINEAR_LAYERS):
            order.setdefault(layer_path(context.module), context.module)
        return next_fun(*args, **kwargs)

    def run(v):
        with nn.intercept_methods(interceptor):
            return module.apply(v, jnp.zeros((1, *input_shape), jnp.float32), train=False)

    jax.eval_shape(run, variables)
    return order


def linear_layer_paths(module: nn.Module, variables: Mapping[str, Any], input_shape) -> list[str]:
    """Paths of every conv/dense layer in call order (found by abstract evaluation, no FLOPs)."""
    return list(linear_layer_modules(module, variables, input_shape))
