"""Post-training quantization of one model at one configuration: the unit a sweep point evaluates.

    ternarize weights (rules) -> calibrate activation steps -> [fit scales] -> [bias correction]
    -> [BN re-estimation] -> (recalibrate) -> variables + activation config for `Evaluator`

Everything here is label-free: calibration and repairs see training images, never their labels.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from fgq_jax import repairs, transforms
from fgq_jax.evaluate import ActConfig, Calibration, calibrate_steps, linear_layer_paths
from fgq_jax.ternary import TernaryTensor

GROUP_SIZE_NAMES = {"channel": "channel", "tensor": None}


@dataclasses.dataclass(frozen=True)
class PTQConfig:
    """One quantization setting (hashable; every field is a sweep column).

    method: "fp" (no weight quantization) or a ternary method of `fgq_jax.ternary`.
    group_size: int N, "channel" (one group per output channel) or None (whole tensor).
    act_bits: None for full-precision activations, else bits of every quantized layer's input.
    first_last: "fp" keeps the first conv and last dense in full precision, "8" makes them int8.
    """

    method: str = "exact"
    group_size: int | str | None = 4
    asymmetric: bool = False
    grouping: str = "input"
    act_bits: int | None = 8
    first_last: str = "fp"
    bn_reestimate: bool = False
    bias_correct: bool = False
    scale_fit: bool = False
    calibration: Calibration = Calibration()
    num_fit: int = 512  # images (of the repair images) for scale fitting: L x L moments need few
    # Repairs see the unlabeled images with the training augmentation (CIFAR: pad-4 random crop +
    # flip). The published BatchNorm statistics were gathered on augmented images; re-estimating
    # them on plain images costs the FP ResNet-20 ~1.4 points, on augmented ones it gains ~2.
    augment_repair_images: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.first_last not in ("fp", "8"):
            raise ValueError(f"first_last must be 'fp' or '8', got {self.first_last!r}")
        if self.act_bits is not None and (
            isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or self.act_bits < 2
        ):
            raise ValueError(f"act_bits must be None or an int >= 2, got {self.act_bits!r}")


@dataclasses.dataclass
class QuantizedModel:
    variables: dict  # {"params": fake-quant float params, "batch_stats": ...}
    act_cfg: ActConfig
    act_steps: dict[str, jax.Array]
    ternary_params: Any  # params tree with TernaryTensor leaves (None for method "fp")
    quantized_layers: tuple[str, ...]  # layer paths whose weights are quantized


def dequantize_tree(tree):
    """Replace every TernaryTensor leaf by its float kernel (the fake-quant tree for model.apply)."""
    return jax.tree.map(
        lambda x: x.dequantize() if isinstance(x, TernaryTensor) else x,
        tree,
        is_leaf=lambda x: isinstance(x, TernaryTensor),
    )


def weight_rules(spec, cfg: PTQConfig):
    wq = transforms.WeightQuant(
        method=cfg.method, group_size=cfg.group_size, asymmetric=cfg.asymmetric, grouping=cfg.grouping
    )
    return transforms.default_rules(wq, spec.first_layer, spec.last_layer, first_last=cfg.first_last)


def quantize_model(
    spec,
    variables_fp: Mapping[str, Any],
    cfg: PTQConfig,
    calib_images: np.ndarray | None = None,
    repair_images: np.ndarray | None = None,
) -> QuantizedModel:
    """Quantize `variables_fp` of model `spec` (a ModelSpec) as `cfg` says.

    calib_images: uint8 [n, H, W, C] training images for activation calibration (needed when
      act_bits is set). repair_images: uint8 training images for the repairs (needed when any is on).
    """
    module, family = spec.module, spec.dataset_family
    needs_repair = cfg.bn_reestimate or cfg.bias_correct or cfg.scale_fit
    if cfg.act_bits is not None and calib_images is None:
        raise ValueError("quantize_model: act_bits is set but no calibration images were given")
    if needs_repair and repair_images is None:
        raise ValueError("quantize_model: a repair is enabled but no repair images were given")
    if cfg.method == "fp" and (cfg.bias_correct or cfg.scale_fit or cfg.first_last == "8"):
        raise ValueError(
            "quantize_model: method 'fp' takes only bn_reestimate (no weight error to correct) and "
            "no 8-bit first/last layer"
        )
    if needs_repair and cfg.augment_repair_images and family == "cifar":
        from fgq_jax.data import augment_cifar

        repair_images = np.asarray(
            augment_cifar(jax.random.key(cfg.seed), jax.numpy.asarray(repair_images))
        )

    params_fp = variables_fp["params"]
    order = linear_layer_paths(module, variables_fp, spec.input_shape)
    if cfg.method == "fp":
        ternary_params, quantized = None, ()
        variables = dict(variables_fp)
        # FP weights with quantized activations: quantize every layer input but the network input.
        act_layers = [p for p in order if p != spec.first_layer]
    else:
        rules = weight_rules(spec, cfg)
        ternary_params = transforms.quantize_params(params_fp, rules, mode="ternary")
        kernel_paths = transforms.quantized_paths(params_fp, rules)
        quantized = tuple(p for p in order if f"{p}/kernel" in kernel_paths)
        variables = {**variables_fp, "params": dequantize_tree(ternary_params)}
        act_layers = [p for p in quantized if p != spec.first_layer]

    def calibrate(v):
        if cfg.act_bits is None:
            return ActConfig(), {}
        return calibrate_steps(
            module, v, calib_images, cfg.act_bits, act_layers, family, cfg.calibration
        )

    act_cfg, steps = calibrate(variables)
    if cfg.scale_fit:
        ternary_params = repairs.fit_scales(
            module, ternary_params, variables_fp, repair_images[: cfg.num_fit], family,
            dequantize_tree, act_cfg, steps,
        )
        variables = {**variables, "params": dequantize_tree(ternary_params)}
    if cfg.bias_correct:
        variables = repairs.bias_correction(
            module, variables, params_fp, repair_images, family, list(quantized), act_cfg, steps
        )
    if cfg.bn_reestimate:
        variables = repairs.reestimate_bn(module, variables, repair_images, family, act_cfg, steps)
    if needs_repair:  # the repaired network's activations moved: recalibrate their steps
        act_cfg, steps = calibrate(variables)
    return QuantizedModel(variables, act_cfg, steps, ternary_params, quantized)
