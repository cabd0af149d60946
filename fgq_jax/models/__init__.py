"""Flax Linen models (NHWC float32 inputs, already normalised) and the model registry.

    spec = get_model("resnet20")
    variables = spec.module.init(jax.random.key(0), jnp.zeros((1, *spec.input_shape)))
    logits = spec.module.apply(variables, x, train=False)                       # [B, classes]
    logits, upd = spec.module.apply(variables, x, train=True, mutable=["batch_stats"])

All layers are plain ``nn.Conv`` / ``nn.Dense`` / ``nn.BatchNorm`` (subclass) submodules, so method
interceptors see every conv/dense call. BatchNorm: running statistics at eval, momentum 0.9
(= PyTorch 0.1), epsilon 1e-5, running variance updated with the unbiased batch variance (as PyTorch).
SqueezeNet has no dense layer: its classifier (``last_layer``) is a 1x1 ``nn.Conv``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from fgq_jax.models.alexnet import AlexNet
from fgq_jax.models.cifar_resnet import CIFAR_DEPTHS, CifarResNet
from fgq_jax.models.layers import TorchBatchNorm, adaptive_avg_pool, max_pool
from fgq_jax.models.resnet import RESNET_CONFIGS, ResNet
from fgq_jax.models.squeezenet import SQUEEZENET_VERSIONS, SqueezeNet, squeezenet_equalization_pairs

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "get_model",
    "variable_shapes",
    "AlexNet",
    "CifarResNet",
    "ResNet",
    "SqueezeNet",
    "TorchBatchNorm",
    "adaptive_avg_pool",
    "max_pool",
]

CIFAR_MODELS = tuple(CIFAR_DEPTHS)
IMAGENET_MODELS = (*RESNET_CONFIGS, "alexnet", *SQUEEZENET_VERSIONS)
MODEL_NAMES: tuple[str, ...] = (*CIFAR_MODELS, *IMAGENET_MODELS)
# DeepScale's Caffe SqueezeNets were trained and evaluated on 227x227 crops, the published FP
# reference (../shared/README.md) is measured on 227x227 images, and every split of the
# imagenet_subset dataset is 227x227; MACs and calibration shapes therefore use 227.
SQUEEZENET_INPUT_SHAPE = (227, 227, 3)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model and the facts other modules need about it.

    Attributes:
      module: the Flax Linen module; ``apply(variables, x [B, H, W, C], train=False) -> [B, classes]``.
      name: registry name, e.g. "resnet20".
      first_layer: '/'-joined params path of the first conv ("conv_init", "conv1" for AlexNet,
        "features_0" for SqueezeNet).
      last_layer: '/'-joined params path of the classifier: the last dense ("fc", "fc8" for
        AlexNet) or SqueezeNet's final 1x1 conv ("classifier_1").
      input_shape: (H, W, C) the model is meant for: (32, 32, 3) CIFAR, (224, 224, 3) ImageNet,
        (227, 227, 3) for SqueezeNet (the crop of the original Caffe models and of the shared
        ImageNet subset; the net is fully convolutional, so 224 inputs work too).
      num_classes: number of logits.
      dataset_family: "cifar" | "imagenet" (selects the normalisation in fgq_jax.data).
      equalization_pairs: the layer pairs cross-layer equalization may rescale
        (`fgq_jax.equalize`): producers -> consumers joined by positive-homogeneous operations only.
        () for models with BatchNorm between their convolutions (the ResNets, where BN
        re-estimation repairs the shift instead).
    """

    module: nn.Module
    name: str
    first_layer: str
    last_layer: str
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset_family: str
    equalization_pairs: tuple = ()

    @property
    def family(self) -> str:
        """Alias of ``dataset_family``."""
        return self.dataset_family


def get_model(name: str, num_classes: int | None = None) -> ModelSpec:
    """Return the ModelSpec for ``name`` (one of MODEL_NAMES); ``num_classes`` overrides 10 / 1000."""
    key = name.lower() if isinstance(name, str) else name
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")
    if key in CIFAR_DEPTHS:
        nc = 10 if num_classes is None else int(num_classes)
        return ModelSpec(
            CifarResNet(depth=CIFAR_DEPTHS[key], num_classes=nc),
            key,
            "conv_init",
            "fc",
            (32, 32, 3),
            nc,
            "cifar",
        )
    if key in RESNET_CONFIGS:
        nc = 1000 if num_classes is None else int(num_classes)
        block, sizes = RESNET_CONFIGS[key]
        return ModelSpec(
            ResNet(block=block, stage_sizes=sizes, num_classes=nc),
            key,
            "conv_init",
            "fc",
            (224, 224, 3),
            nc,
            "imagenet",
        )
    if key == "alexnet":
        nc = 1000 if num_classes is None else int(num_classes)
        return ModelSpec(AlexNet(num_classes=nc), key, "conv1", "fc8", (224, 224, 3), nc, "imagenet")
    if key in SQUEEZENET_VERSIONS:
        nc = 1000 if num_classes is None else int(num_classes)
        module = SqueezeNet(version=SQUEEZENET_VERSIONS[key], num_classes=nc)
        return ModelSpec(module, key, "features_0", "classifier_1", SQUEEZENET_INPUT_SHAPE, nc, "imagenet",
                         squeezenet_equalization_pairs(SQUEEZENET_VERSIONS[key]))
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")


def variable_shapes(name: str, num_classes: int | None = None) -> dict:
    """Abstract ``{"params": ..., "batch_stats": ...}`` tree (jax.ShapeDtypeStruct leaves) of a model.

    Computed with jax.eval_shape, so no weights are materialised (cheap even for ResNet-152).
    Returns a fresh nested dict (callers may modify it).
    """
    return jax.tree.map(lambda s: s, _variable_shapes(name, num_classes))


@functools.cache
def _variable_shapes(name: str, num_classes: int | None) -> dict:
    spec = get_model(name, num_classes)
    x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
    return dict(jax.eval_shape(lambda x: spec.module.init(jax.random.key(0), x, train=False), x))
