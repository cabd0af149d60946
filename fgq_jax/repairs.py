"""Label-free, gradient-free repairs of a ternarized network (beyond the FGQ paper).

All three use a few thousand *unlabeled* training images and forward passes only:

- `reestimate_bn`: recompute every BatchNorm's running mean/variance on the quantized network
  (train-mode forward, exact population statistics pooled over batches).
- `bias_correction`: per output channel, the expected output shift E[(W - W_q) x] of each quantized
  layer, measured on the inputs the quantized network really feeds it, folded into the BatchNorm that
  consumes the layer's output (its running mean) or into the layer's bias.
- `fit_scales`: per layer, in call order, re-fit every group's scale (the ternary codes stay) by least
  squares so the quantized layer's output on the *quantized* network's inputs matches the full-precision
  layer's output on the *full-precision* network's inputs. Only two L x L input-moment matrices per
  layer are accumulated (L = kh*kw*cin), so the fit is cheap and exact for the given sample.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax.data import normalize, pixel_batch_size
from fgq_jax.activations import ActConfig
from fgq_jax.intercept import LINEAR_LAYERS, intercepting, layer_path, linear_layer_paths
from fgq_jax.ternary import group_onehot, is_ternary
from fgq_jax.transforms import get_at, path_to_str, set_at


def normalized_batches(images: np.ndarray, family: str, batch_size: int):
    """Normalised batches of at most `batch_size` images (fewer for large images: pixel budget)."""
    batch_size = pixel_batch_size(images.shape[1:], batch_size)
    for i in range(0, images.shape[0], batch_size):
        yield normalize(jnp.asarray(images[i : i + batch_size]), family)


def _apply_quantized(module, v, x, act_cfg, act_steps, observer, *, train=False, captured=None):
    """module.apply(v, x) with activation quantization, `observer` seeing every module call;
    train=True runs with batch statistics. Traced inside the jitted helpers."""
    if train:
        fn = lambda: module.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
    else:
        fn = lambda: module.apply(v, x, train=False)  # noqa: E731
    return intercepting(fn, act_cfg, act_steps, captured, observer=observer)


# --------------------------------------------------------------------------------------------------
# BatchNorm re-estimation


@jax.jit(static_argnums=(0, 1))
def _bn_moments(module, act_cfg, v, act_steps, x):
    """Per-channel mean and variance of every BatchNorm's input in one train-mode forward."""
    moments = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.BatchNorm):
            h = args[0].astype(jnp.float32)
            axes = tuple(range(h.ndim - 1))
            moments[layer_path(context.module)] = (jnp.mean(h, axes), jnp.var(h, axes))
        return next_fun(*args, **kwargs)

    _apply_quantized(module, v, x, act_cfg, act_steps, interceptor, train=True)
    return moments


def reestimate_bn(
    module: nn.Module,
    variables: Mapping[str, Any],
    images: np.ndarray,
    family: str,
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    batch_size: int = 500,
) -> dict:
    """New `batch_stats` measured on the quantized network; returns updated variables.

    Every BatchNorm sees batch statistics (train-mode forward, as during training) and its input's
    per-channel mean and variance are pooled over batches: mean = E[batch means], var = E[batch vars] +
    Var[batch means] (law of total variance), i.e. the statistics of the whole sample.
    images: uint8 [N, H, W, C], unlabeled.
    """
    act_cfg = act_cfg or ActConfig()

    per_batch = [_bn_moments(module, act_cfg, variables, act_steps, x) for x in normalized_batches(images, family, batch_size)]
    if not per_batch or not per_batch[0]:
        raise ValueError("reestimate_bn: the model has no BatchNorm layers or no images were given")
    stats = variables["batch_stats"]
    for path in per_batch[0]:
        means = jnp.stack([m[path][0] for m in per_batch])
        vars_ = jnp.stack([m[path][1] for m in per_batch])
        entry = dict(get_at(stats, path))
        entry["mean"] = jnp.mean(means, 0)
        entry["var"] = jnp.mean(vars_, 0) + jnp.var(means, 0)
        stats = set_at(stats, path, entry)
    return {**variables, "batch_stats": stats}


# --------------------------------------------------------------------------------------------------
# Bias correction


def bn_consumers(module: nn.Module, variables: Mapping[str, Any], input_shape) -> dict[str, str]:
    """{conv/dense path: path of the BatchNorm that directly consumes its output} (abstract pass)."""
    outputs, consumer = {}, {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(mod, nn.BatchNorm):
            for p, y in outputs.items():
                if args[0] is y:  # the very array the layer returned: nothing in between
                    consumer[p] = layer_path(mod)
        y = next_fun(*args, **kwargs)
        if isinstance(mod, LINEAR_LAYERS):
            outputs[layer_path(mod)] = y
        return y

    def run(v):
        with nn.intercept_methods(interceptor):
            return module.apply(v, jnp.zeros((1, *input_shape), jnp.float32), train=False)

    jax.eval_shape(run, variables)
    return consumer


@jax.jit(static_argnums=(0, 1))
def _output_shifts(module, act_cfg, v, diffs, act_steps, x):
    """Per-channel mean of layer(x; W_fp - W_q) for each layer in `diffs`, x as the quantized
    network feeds it."""
    shifts = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, LINEAR_LAYERS):
            path = layer_path(mod)
            if path in diffs:
                # Same layer, same input, kernel replaced by W_fp - W_q (bias dropped): by
                # linearity this is exactly the part of the FP output the quantized kernel misses.
                clone = mod.clone(parent=None, use_bias=False)
                d = clone.apply({"params": diffs[path]}, args[0])
                shifts[path] = jnp.mean(d.reshape(-1, d.shape[-1]), 0)
        return next_fun(*args, **kwargs)

    _apply_quantized(module, v, x, act_cfg, act_steps, interceptor)
    return shifts


def bias_correction(
    module: nn.Module,
    variables_q: Mapping[str, Any],
    params_fp: Mapping[str, Any],
    images: np.ndarray,
    family: str,
    layers: list[str],
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    batch_size: int = 500,
) -> dict:
    """Remove each quantized layer's expected per-channel output shift; returns updated variables.

    shift_k = mean over images and positions of [layer(x; W_fp) - layer(x; W_q)]_k with x the input
    the quantized network feeds the layer. It is folded into the BatchNorm that directly consumes
    the layer's output (running mean -= shift) or, failing that, into the layer's bias.
    layers: layer paths whose kernels were quantized.
    """
    act_cfg = act_cfg or ActConfig()
    layers = list(layers)
    diffs = {
        p: {"kernel": get_at(params_fp, p)["kernel"] - get_at(variables_q["params"], p)["kernel"]}
        for p in layers
    }

    results = [
        _output_shifts(module, act_cfg, variables_q, diffs, act_steps, x)
        for x in normalized_batches(images, family, batch_size)
    ]
    if not results:
        raise ValueError("bias_correction: no images given")
    consumers = bn_consumers(module, variables_q, images.shape[1:])
    params, stats = variables_q["params"], variables_q.get("batch_stats", {})
    for path in layers:
        shift = jnp.mean(jnp.stack([r[path] for r in results]), 0)
        if path in consumers:
            bn = consumers[path]
            entry = dict(get_at(stats, bn))
            entry["mean"] = entry["mean"] - shift
            stats = set_at(stats, bn, entry)
        elif "bias" in get_at(params, path):
            layer = dict(get_at(params, path))
            layer["bias"] = layer["bias"] + shift
            params = set_at(params, path, layer)
        else:
            raise ValueError(
                f"bias_correction: layer {path!r} has neither a bias nor a BatchNorm consuming its "
                "output to fold the correction into"
            )
    return {**variables_q, "params": params, "batch_stats": stats}


# --------------------------------------------------------------------------------------------------
# Least-squares scale fitting


def _patches(module: nn.Module, x: jax.Array) -> jax.Array:
    """Input patches of a conv/dense layer, [M, L] with L ordered like the Flax kernel's (kh, kw, cin).

    For a conv, row m is the receptive field of one output position, so layer output = patches @
    kernel.reshape(L, cout) (up to bias).
    """
    if isinstance(module, nn.Dense):
        return x.reshape(-1, x.shape[-1])
    ks = tuple(module.kernel_size)

    def per_dim(v):  # Flax accepts an int, a sequence or None for strides / dilations
        return (1,) * len(ks) if v is None else (v,) * len(ks) if isinstance(v, int) else tuple(v)

    if module.feature_group_count != 1 or any(d != 1 for d in per_dim(module.kernel_dilation)):
        raise NotImplementedError(f"fit_scales: grouped or dilated conv {layer_path(module)!r}")
    strides = per_dim(module.strides)
    padding = module.padding
    if not isinstance(padding, str):
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    cin = x.shape[-1]
    p = jax.lax.conv_general_dilated_patches(
        x, ks, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    # conv_general_dilated_patches orders features (cin, kh, kw); reorder to the kernel's (kh, kw, cin).
    p = p.reshape(-1, cin, *ks)
    p = jnp.moveaxis(p, 1, -1)
    return p.reshape(p.shape[0], -1)


def _fit_layer_scales(tt, c_qq, c_qf, kernel_fp, ridge: float):
    """Least-squares scales for one TernaryTensor given input moments.

    c_qq = P_q^T P_q, c_qf = P_q^T P_fp  ([L, L]); target = P_fp @ W_fp. Returns a new TernaryTensor.
    """
    shape = tt.codes.shape
    L, K = int(np.prod(shape[:-1])), shape[-1]
    E = jnp.asarray(group_onehot(shape, tt.group_size, tt.grouping))  # [L, G]
    t = tt.codes.reshape(L, K).astype(jnp.float32)
    asym = tt.neg_scales is not None
    if asym:  # w = a_p*[t=1] - a_n*[t=-1]: two columns per group
        B = jnp.concatenate(
            [E[None] * (t.T == 1)[:, :, None], -E[None] * (t.T == -1)[:, :, None]], axis=2
        )
    else:
        B = E[None] * t.T[:, :, None]  # [K, L, G']
    w_fp = kernel_fp.reshape(L, K)
    gram = jnp.einsum("klg,lm,kmh->kgh", B, c_qq, B)  # [K, G', G']
    rhs = jnp.einsum("klg,lm,mk->kg", B, c_qf, w_fp)  # [K, G']
    shared = tt.group_size is None and tt.grouping != "kernel"
    if shared:  # one scale for the whole tensor: pool the normal equations over channels
        gram, rhs = gram.sum(0, keepdims=True), rhs.sum(0, keepdims=True)
    G = E.shape[1]
    old = (
        jnp.concatenate([tt.scales, tt.neg_scales], axis=0) if asym else tt.scales
    )  # [G', K] (or [G', 1])
    old = old.T  # [K or 1, G']
    # Ridge toward the current scales keeps groups that the sample barely excites where they were.
    diag = jnp.diagonal(gram, axis1=1, axis2=2)
    # A floor on the ridge keeps groups with no codes of a sign (zero columns) well-posed: their
    # scale stays at its old value instead of becoming NaN.
    lam = max(ridge, 1e-7) * jnp.maximum(jnp.mean(diag, axis=1, keepdims=True), 1e-12)
    eye = jnp.eye(gram.shape[-1])
    new = jnp.linalg.solve(gram + lam[:, :, None] * eye, (rhs + lam * old)[..., None])[..., 0]
    new = jnp.maximum(new, 0.0).T  # scales are magnitudes
    if asym:
        return dataclasses.replace(tt, scales=new[:G], neg_scales=new[G:])
    return dataclasses.replace(tt, scales=new)


@jax.jit(static_argnums=(0, 1, 2))
def _layer_moments(module, act_cfg, path, v_q, v_fp, act_steps, x):
    """(P_q^T P_q, P_q^T P_fp) for one layer and one batch: its input patches in the quantized
    network (P_q, after activation quantization) and in the full-precision network (P_fp)."""
    captured_q: dict = {}
    captured_fp: dict = {}
    mods: dict = {}

    def remember(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, LINEAR_LAYERS):
            mods[layer_path(context.module)] = context.module
        return next_fun(*args, **kwargs)

    _apply_quantized(module, v_q, x, act_cfg, act_steps, remember, captured=captured_q)
    intercepting(lambda: module.apply(v_fp, x, train=False), None, None, captured_fp)
    pq = _patches(mods[path], captured_q[path])
    pf = _patches(mods[path], captured_fp[path])
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(pq.T, pq, precision=hi), jnp.matmul(pq.T, pf, precision=hi)


def layer_moments(module, act_cfg, path, v_q, v_fp, act_steps, batches) -> tuple[jax.Array, jax.Array]:
    """(P_q^T P_q, P_q^T P_fp) of layer `path` summed over `batches` (normalised images): the input
    moments of scale fitting and of layer-wise reconstruction. [L, L] each, float32."""
    c_qq = c_qf = 0.0
    for x in batches:
        m = _layer_moments(module, act_cfg, path, v_q, v_fp, act_steps, x)
        c_qq, c_qf = c_qq + m[0], c_qf + m[1]
    return c_qq, c_qf


def fit_scales(
    module: nn.Module,
    ternary_params: Mapping[str, Any],
    variables_fp: Mapping[str, Any],
    images: np.ndarray,
    family: str,
    dequantize,
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    batch_size: int = 250,
    ridge: float = 1e-3,
) -> dict:
    """Re-fit the group scales of every ternary layer, in call order; returns new ternary params.

    ternary_params: params tree whose quantized kernels are TernaryTensor leaves.
    dequantize: callable(ternary_params) -> float params tree (the fake-quant tree for model.apply).
    Layer l is fitted with layers < l already fitted, so errors upstream are compensated downstream.
    """
    act_cfg = act_cfg or ActConfig()
    flat = jax.tree_util.tree_flatten_with_path(ternary_params, is_leaf=is_ternary)[0]
    ternary_layers = {path_to_str(path[:-1]): leaf for path, leaf in flat if is_ternary(leaf)}
    order = [
        p
        for p in linear_layer_paths(module, variables_fp, images.shape[1:])
        if p in ternary_layers
    ]

    params = dict(ternary_params)
    xs = list(normalized_batches(images, family, batch_size))
    for path in order:
        # One pass per layer: the quantized inputs depend on the scales fitted so far.
        v_q = {**variables_fp, "params": dequantize(params)}
        c_qq, c_qf = layer_moments(module, act_cfg, path, v_q, variables_fp, act_steps, xs)
        layer = get_at(params, path)
        kernel_fp = get_at(variables_fp["params"], path)["kernel"]
        new_layer = dict(layer)
        new_layer["kernel"] = _fit_layer_scales(layer["kernel"], c_qq, c_qf, kernel_fp, ridge)
        params = set_at(params, path, new_layer)
    return params
