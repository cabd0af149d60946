"""SqueezeNet 1.0 and 1.1 in torchvision's layout (Iandola et al. 2016; DeepScale's v1.1).

Inputs NHWC [B, H, W, 3] already normalised. The nets are fully convolutional (any H, W >= 25 for
1.1 and >= 29 for 1.0 works); the registry says 227 x 227, the crop the original Caffe models were
trained and published with (see ``fgq_jax.models.get_model``).

Module names mirror torchvision's ``features.<i>`` / ``classifier.<i>`` indices, so a Flax path
reads as the PyTorch key: ``features_0/kernel`` <-> ``features.0.weight``,
``features_3/expand3x3/bias`` <-> ``features.3.expand3x3.bias``, ``classifier_1/kernel`` <->
``classifier.1.weight``. Indices without parameters (ReLU, max pool, dropout) are skipped, as in
torchvision's state_dict.

    1.0: features_0 conv 7x7/2, 96   relu  maxpool 3/2 (ceil)            (features.0 .. .2)
         fire 16/64/64 (features_3), fire 16/64/64 (_4), fire 32/128/128 (_5), maxpool (features.6)
         fire 32/128/128 (_7), 48/192/192 (_8), 48/192/192 (_9), 64/256/256 (_10), maxpool (.11)
         fire 64/256/256 (_12)
    1.1: features_0 conv 3x3/2, 64   relu  maxpool 3/2 (ceil)            (features.0 .. .2)
         fire 16/64/64 (_3), 16/64/64 (_4), maxpool (.5), fire 32/128/128 (_6), 32/128/128 (_7),
         maxpool (.8), fire 48/192/192 (_9), 48/192/192 (_10), 64/256/256 (_11), 64/256/256 (_12)
    classifier: dropout (p=0.5, classifier.0) -> classifier_1 conv 1x1 -> num_classes (bias) -> relu
                -> global average pool -> logits [B, num_classes]

Fire(s, e1, e3): ``squeeze`` conv 1x1 -> s, relu; ``expand1x1`` conv 1x1 -> e1 and ``expand3x3``
conv 3x3 pad 1 -> e3 on the squeezed map, each + relu; output = concat([expand1x1, expand3x3]) on
channels (torchvision's order). Every conv has a bias and no BatchNorm; the first conv and the
pools have no padding; all pools are ``MaxPool2d(3, 2, ceil_mode=True)``.

Dropout is active only with ``train=True`` and then needs a ``"dropout"`` rng.
Init as torchvision: kaiming_uniform (fan_in, gain sqrt 2) kernels, N(0, 0.01) for the final
conv, zero biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from fgq_jax.equalize import EqualizationPair
from fgq_jax.models.layers import max_pool, pad2d

# torch.nn.init.kaiming_uniform_(w) (a=0, fan_in, leaky_relu gain sqrt(2)): U(-sqrt(6/fan_in), +).
_kaiming_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
_final_init = nn.initializers.normal(0.01)

# torchvision's features.<i>, in order: ("conv", out, kernel, stride), "relu", "pool", or a Fire as
# (squeeze, expand1x1, expand3x3) planes.
SQUEEZENET_FEATURES = {
    "1_0": (
        ("conv", 96, 7, 2), "relu", "pool",
        (16, 64, 64), (16, 64, 64), (32, 128, 128), "pool",
        (32, 128, 128), (48, 192, 192), (48, 192, 192), (64, 256, 256), "pool",
        (64, 256, 256),
    ),
    "1_1": (
        ("conv", 64, 3, 2), "relu", "pool",
        (16, 64, 64), (16, 64, 64), "pool",
        (32, 128, 128), (32, 128, 128), "pool",
        (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256),
    ),
}
# registry name -> version
SQUEEZENET_VERSIONS = {"squeezenet1_0": "1_0", "squeezenet1_1": "1_1"}


def _conv(features: int, k: int, stride: int = 1, pad: int = 0, *, name: str, kernel_init=_kaiming_uniform):
    return nn.Conv(
        features, (k, k), strides=(stride, stride), padding=pad2d(pad), kernel_init=kernel_init, name=name
    )


class Fire(nn.Module):
    """torchvision Fire module. [B, H, W, Cin] -> [B, H, W, expand1x1_planes + expand3x3_planes]."""

    squeeze_planes: int
    expand1x1_planes: int
    expand3x3_planes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = nn.relu(_conv(self.squeeze_planes, 1, name="squeeze")(x))
        e1 = nn.relu(_conv(self.expand1x1_planes, 1, name="expand1x1")(s))
        e3 = nn.relu(_conv(self.expand3x3_planes, 3, pad=1, name="expand3x3")(s))
        return jnp.concatenate([e1, e3], axis=-1)


class SqueezeNet(nn.Module):
    """torchvision SqueezeNet ``version`` "1_0" | "1_1". [B, H, W, 3] -> logits [B, num_classes]."""

    version: str = "1_1"
    num_classes: int = 1000
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.version not in SQUEEZENET_FEATURES:
            raise ValueError(
                f"unknown SqueezeNet version {self.version!r}; expected one of {sorted(SQUEEZENET_FEATURES)}"
            )
        for i, layer in enumerate(SQUEEZENET_FEATURES[self.version]):
            if layer == "relu":
                x = nn.relu(x)
            elif layer == "pool":
                x = max_pool(x, 3, 2, ceil_mode=True)
            elif layer[0] == "conv":
                _, features, k, stride = layer
                x = _conv(features, k, stride, name=f"features_{i}")(x)
            else:
                x = Fire(*layer, name=f"features_{i}")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)  # classifier.0
        x = nn.relu(_conv(self.num_classes, 1, name="classifier_1", kernel_init=_final_init)(x))
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten


def squeezenet_equalization_pairs(version: str):
    """The cross-layer-equalization pairs of SqueezeNet ``version`` (`fgq_jax.equalize`).

    Between the layers of each pair there are only ReLU, ceil-mode max pools, the channel concat and
    dropout, all positive-homogeneous: the first conv -> the first squeeze; in each fire, the squeeze
    -> both expands; the concat of a fire's expands -> the next squeeze, and the last fire's -> the
    classifier's 1x1 conv (its ReLU and the average pool come after it, so its output is unchanged).
    """
    names = [f"features_{i}" for i, layer in enumerate(SQUEEZENET_FEATURES[version])
             if isinstance(layer, tuple)]
    pairs, outputs = [], (names[0],)  # the layers whose concatenated outputs feed the next layer
    for fire in names[1:]:
        pairs.append(EqualizationPair(outputs, (f"{fire}/squeeze",)))
        pairs.append(EqualizationPair((f"{fire}/squeeze",), (f"{fire}/expand1x1", f"{fire}/expand3x3")))
        outputs = (f"{fire}/expand1x1", f"{fire}/expand3x3")
    pairs.append(EqualizationPair(outputs, ("classifier_1",)))
    return tuple(pairs)
