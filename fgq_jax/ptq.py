"""Post-training quantization of one model by one recipe: the unit a sweep point evaluates and the
starting point of fine-tuning.

    ternarize weights (recipe rules) -> calibrate activation steps -> [fit scales] [-> recalibrate]
    -> [reconstruct blocks] [-> recalibrate] -> [bias correction] -> [BN re-estimation] ->
    (recalibrate) -> QuantizedModel (variables + steps for `Evaluator`)

(the bracketed recalibrations only with the `recalibrate` repair; the last one after any repair)

Reconstruction runs before bias correction and BN re-estimation: it matches each quantized block to
the FP block *with the FP network's BatchNorm statistics* (so the quantized network imitates the
FP one), and the two cheap repairs then act on the reconstructed network as on any other (BN
re-estimation on augmented images moves the statistics as it does for the FP network).

Everything here is label-free: calibration and repairs see training images, never their labels.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax import activations, reconstruct, repairs, transforms
from fgq_jax.activations import ActConfig, Calibration
from fgq_jax.data import augment_cifar
from fgq_jax.equalize import equalize_params
from fgq_jax.intercept import LINEAR_LAYERS, capture_layer_io, layer_path, linear_layer_paths
from fgq_jax.recipe import QuantRecipe
from fgq_jax.ternary import dequantize_tree

__all__ = ["QuantizedModel", "quantize_model", "quantized_layers", "calibrate_steps"]


@dataclasses.dataclass
class QuantizedModel:
    """What `quantize_model` returns.

    variables: {"params": fake-quant float params, "batch_stats": ...} for `Evaluator` / apply.
    act_cfg, act_steps: the quantized layer inputs and their calibrated steps.
    ternary_params: params tree with TernaryTensor leaves (None for method "fp"): export, integer path.
    quantized_layers: layer paths whose weights are quantized, in call order.
    seconds: wall seconds of each repair that ran, by name (e.g. {"reconstruct": 95.2}).
    recon_log: what `fgq_jax.reconstruct.reconstruct` logged per block ([] without it).
    """

    recipe: QuantRecipe
    variables: dict
    act_cfg: ActConfig
    act_steps: dict[str, jax.Array]
    ternary_params: Any
    quantized_layers: tuple[str, ...]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    recon_log: list = dataclasses.field(default_factory=list)


def quantized_layers(spec, variables: Mapping[str, Any], recipe: QuantRecipe) -> tuple[list[str], list[str]]:
    """(layers whose weights the recipe quantizes, layers whose inputs it quantizes), in call order.

    Activations: the inputs of the quantized layers but the network input; with FP weights, every
    conv/dense input but the first (see `fgq_jax.recipe.ActivationSpec`).
    """
    order = linear_layer_paths(spec.module, variables, spec.input_shape)
    if not recipe.weights.quantized:
        return [], [p for p in order if p != spec.first_layer]
    kernels = transforms.quantized_paths(variables["params"], recipe.rules(spec.first_layer, spec.last_layer))
    quantized = [p for p in order if f"{p}/kernel" in kernels]
    return quantized, [p for p in quantized if p != spec.first_layer]


def quantize_model(
    spec,
    variables_fp: Mapping[str, Any],
    recipe: QuantRecipe,
    calib_images: np.ndarray | None = None,
    repair_images: np.ndarray | None = None,
    calibrations: dict | None = None,
) -> QuantizedModel:
    """Quantize `variables_fp` of model `spec` (a `fgq_jax.models.ModelSpec`) as `recipe` says.

    calib_images: uint8 [n, H, W, C] unlabeled images for activation calibration (needed when
      act_bits is set). repair_images: uint8 unlabeled images for the repairs (needed when any is on).
    calibrations: optional memo shared by several calls on the same model (a sweep's points): a
      calibration of a bit-identical network on the same images with the same settings is taken from
      it (calibration is deterministic), not recomputed. E.g. a repaired point first calibrates the
      network its plain twin calibrated.
    """
    if not isinstance(recipe, QuantRecipe):
        raise TypeError(f"quantize_model takes a QuantRecipe, got {type(recipe).__name__}")
    module, family = spec.module, spec.dataset_family
    act, rep = recipe.activations, recipe.repairs
    if act.bits is not None and calib_images is None:
        raise ValueError("quantize_model: act_bits is set but no calibration images were given")
    if rep.any and repair_images is None:
        raise ValueError("quantize_model: a repair is enabled but no repair images were given")
    if rep.any and rep.augment_images and family == "cifar":
        repair_images = np.asarray(augment_cifar(jax.random.key(recipe.seed), jnp.asarray(repair_images)))

    if rep.equalize:  # a reparametrization of the FP model: every later step sees the equalized one
        variables_fp = {**variables_fp, "params": equalize_params(variables_fp["params"], spec.equalization_pairs)}
    quantized, act_layers = quantized_layers(spec, variables_fp, recipe)
    ternary_params = None
    variables = dict(variables_fp)
    if recipe.weights.quantized:
        rules = recipe.rules(spec.first_layer, spec.last_layer)
        ternary_params = transforms.quantize_params(variables_fp["params"], rules, mode="ternary")
        variables["params"] = dequantize_tree(ternary_params)

    def calibrate(v):
        if act.bits is None:
            return ActConfig(), {}
        key = None
        if calibrations is not None:
            key = (id(module), family, act.bits, tuple(act_layers), act.calibration,
                   transforms.tree_fingerprint((v, calib_images)))
            if key in calibrations:
                cfg, steps = calibrations[key]
                return cfg, dict(steps)
        cfg, steps = calibrate_steps(module, v, calib_images, act.bits, act_layers, family, act.calibration)
        if key is not None:
            calibrations[key] = (cfg, dict(steps))
        return cfg, steps

    act_cfg, steps = calibrate(variables)
    seconds, recon_log = {}, []
    t0 = time.perf_counter()
    if rep.scale_fit:
        ternary_params = repairs.fit_scales(
            module, ternary_params, variables_fp, repair_images[: rep.num_fit], family,
            dequantize_tree, act_cfg, steps,
        )
        variables = {**variables, "params": dequantize_tree(ternary_params)}
        seconds["scale_fit"], t0 = time.perf_counter() - t0, time.perf_counter()
        if rep.recalibrate:
            act_cfg, steps = calibrate(variables)
            seconds["recalibrate"] = time.perf_counter() - t0
            t0 = time.perf_counter()
    if rep.reconstruct:
        settings = reconstruct.ReconSettings(
            iterations=rep.recon_iters, batch_size=rep.recon_batch, qdrop=float(rep.recon_qdrop),
            unit=rep.recon_unit,
        )
        ternary_params = reconstruct.reconstruct(
            module, ternary_params, variables_fp, repair_images[: rep.num_recon], family, act_cfg,
            steps, settings, seed=recipe.seed, variables_q=variables, log=recon_log,
        )
        variables = {**variables, "params": dequantize_tree(ternary_params)}
        seconds["reconstruct"], t0 = time.perf_counter() - t0, time.perf_counter()
        if rep.recalibrate:
            act_cfg, steps = calibrate(variables)
            seconds["recalibrate"] = seconds.get("recalibrate", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
    if rep.bias_correct and not _bias_correction_overwritten(spec, variables, quantized, rep):
        variables = repairs.bias_correction(
            module, variables, variables_fp["params"], repair_images, family, quantized, act_cfg, steps
        )
        seconds["bias_correct"], t0 = time.perf_counter() - t0, time.perf_counter()
    if rep.bn_reestimate:
        variables = repairs.reestimate_bn(module, variables, repair_images, family, act_cfg, steps)
        seconds["bn_reestimate"], t0 = time.perf_counter() - t0, time.perf_counter()
    if rep.any:  # the repaired network's activations moved: recalibrate their steps
        act_cfg, steps = calibrate(variables)
    return QuantizedModel(recipe, variables, act_cfg, steps, ternary_params, tuple(quantized),
                          seconds, recon_log)


def _bias_correction_overwritten(spec, variables, layers, rep) -> bool:
    """True when bias correction cannot change the quantized model, so it need not run: BN
    re-estimation follows it (no other repair in between) and every corrected layer folds its
    shift into the running mean of the BatchNorm consuming it. The re-estimation's train-mode
    forward normalises with batch statistics (it never reads a running mean), then overwrites
    every running mean and variance: the result is the same bit for bit."""
    # (recalibration happens after scale fitting, before bias correction: it changes nothing here)
    if not rep.bn_reestimate or not set(rep.names) <= {"scale_fit", "bias_correct", "bn_reestimate",
                                                        "recalibrate"}:
        return False
    consumers = repairs.bn_consumers(spec.module, variables, spec.input_shape)
    return all(p in consumers for p in layers)


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
    batches = list(repairs.normalized_batches(images, family, batch_size))
    # Signedness first, from one unquantized pass: inputs that follow a ReLU are never negative
    # whatever happens upstream, so this decides each quantizer's range once and for all.
    mins = [_input_minima(module, variables, xb) for xb in batches]
    cfg = ActConfig(tuple((p, act_bits, bool(min(float(m[p]) for m in mins) < 0)) for p in layers))
    if len(batches) == 1 and layers:  # the sweep's case (256 images): one forward, one program
        return cfg, _steps_one_pass(module, cfg, calibration, variables, batches[0])
    return cfg, _steps_layer_by_layer(module, cfg, calibration, variables, batches)


def _steps_layer_by_layer(module, cfg: ActConfig, calibration: Calibration, variables, batches):
    """The steps of `cfg`'s layers, one layer at a time: capture its input over all ``batches``
    (float32 [B, H, W, C] each) with the earlier layers quantized, subsample, calibrate.
    Returns {layer_path: float32 scalar step} in call order."""
    # Steps and enable flags are arrays, so one compiled capture serves every layer in turn.
    steps = {p: jnp.ones((), jnp.float32) for p in cfg.paths}
    enabled = {p: jnp.zeros((), bool) for p in cfg.paths}
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
    return steps


@jax.jit(static_argnums=(0, 1, 2))
def _calibrate_in_forward(module, act_cfg, calibration, variables, x):
    """The loop of `calibrate_steps` for one batch as a single forward: at each quantized layer, in
    call order, calibrate its step on its input (earlier layers already quantized) and quantize
    that input with it. Same subsample, calibrator and quantizer as the loop, so the same steps;
    one compiled program and one forward instead of one prefix forward (and program) per layer.

    x: float32 [B, H, W, C] normalised. Returns ({path: f32 step}, {path: bool all-finite sample}).
    """
    spec = act_cfg.spec()
    steps, finite = {}, {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, LINEAR_LAYERS):
            return next_fun(*args, **kwargs)
        path = layer_path(context.module)
        h = args[0]
        if path in spec:
            bits, signed = spec[path]
            sample = _subsample(h.reshape(-1), calibration.max_samples)
            finite[path] = jnp.all(jnp.isfinite(sample))
            steps[path] = jnp.asarray(
                activations.calibrate(sample, bits, method=calibration.method, signed=signed,
                                      percentile=calibration.percentile, pow2=calibration.pow2),
                jnp.float32,
            )
            h = activations.quantize_activation(h, bits, steps[path], signed=signed)
        return next_fun(h, *args[1:], **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, x, train=False)
    return steps, finite


def _steps_one_pass(module, act_cfg, calibration, variables, x) -> dict[str, jax.Array]:
    """`_calibrate_in_forward`, with the eager calibrator's check of the samples."""
    steps, finite = _calibrate_in_forward(module, act_cfg, calibration, variables, x)
    bad = [p for p in act_cfg.paths if not bool(finite[p])]
    if bad:
        raise ValueError(f"calibration sample contains NaN or Inf (inputs of {bad})")
    return {p: steps[p] for p in act_cfg.paths}
