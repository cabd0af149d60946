"""ImageNet ResNet-18/34/50/101/152 in torchvision's layout (ResNet v1.5).

Inputs NHWC [B, H, W, 3] already normalised (224x224 for ImageNet; any size >= 32 works).

    conv_init 7x7/2 pad 3, 64 (no bias) -> bn_init -> relu -> maxpool 3x3/2 pad 1
    stage1..stage4 (torchvision layer1..layer4), widths 64/128/256/512, first block of stages 2-4 stride 2
    global average pool -> fc (Dense 512*expansion -> classes)

BasicBlock (18/34): conv1 3x3/s - bn1 - relu - conv2 3x3 - bn2 (+ shortcut) relu.
Bottleneck (50/101/152, v1.5): conv1 1x1 - bn1 - relu - conv2 3x3/s - bn2 - relu - conv3 1x1 - bn3
(+ shortcut) relu; the stride sits on the 3x3 conv, as in torchvision.
Shortcut: identity, or ``downsample_conv`` (1x1/s, no bias) + ``downsample_bn`` when the shape
changes (torchvision ``downsample.0`` / ``downsample.1``).

Parameter paths: ``conv_init/kernel`` [7,7,3,64], ``stage{s}_block{b}/conv{i}/kernel``,
``stage{s}_block{b}/downsample_conv/kernel``, ``fc/{kernel,bias}``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from fgq_jax.models.layers import TorchBatchNorm, kaiming_fan_out, max_pool, pad2d, torch_linear_init

# name -> (block kind, blocks per stage)
RESNET_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_fan_out)


class BasicBlock(nn.Module):
    """Two 3x3 convs. [B,H,W,Cin] -> [B,H/s,W/s,planes]."""

    planes: int
    stride: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = functools.partial(TorchBatchNorm, use_running_average=not train)
        s = (self.stride, self.stride)
        y = _conv(self.planes, (3, 3), strides=s, padding=pad2d(1), name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = _conv(self.planes, (3, 3), padding=pad2d(1), name="conv2")(y)
        y = bn(name="bn2")(y)
        return nn.relu(y + _shortcut(x, self.planes * self.expansion, self.stride, bn))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4). [B,H,W,Cin] -> [B,H/s,W/s,4*planes]."""

    planes: int
    stride: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = functools.partial(TorchBatchNorm, use_running_average=not train)
        s = (self.stride, self.stride)
        y = _conv(self.planes, (1, 1), name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = _conv(self.planes, (3, 3), strides=s, padding=pad2d(1), name="conv2")(y)
        y = nn.relu(bn(name="bn2")(y))
        y = _conv(self.planes * self.expansion, (1, 1), name="conv3")(y)
        y = bn(name="bn3")(y)
        return nn.relu(y + _shortcut(x, self.planes * self.expansion, self.stride, bn))


def _shortcut(x: jax.Array, out_ch: int, stride: int, bn) -> jax.Array:
    """Identity, or 1x1 conv (stride) + BN when the shape changes (torchvision's downsample).

    Called from inside a compact block, so the submodules are named inside that block.
    """
    if stride == 1 and x.shape[-1] == out_ch:
        return x
    x = _conv(out_ch, (1, 1), strides=(stride, stride), name="downsample_conv")(x)
    return bn(name="downsample_bn")(x)


class ResNet(nn.Module):
    """torchvision ResNet. [B, H, W, 3] -> logits [B, num_classes]."""

    block: str = "basic"  # "basic" | "bottleneck"
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        x = _conv(64, (7, 7), strides=(2, 2), padding=pad2d(3), name="conv_init")(x)
        x = nn.relu(TorchBatchNorm(use_running_average=not train, name="bn_init")(x))
        x = max_pool(x, 3, 2, padding=1)
        for s, n_blocks in enumerate(self.stage_sizes):
            planes = 64 * 2**s
            for b in range(n_blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                x = block_cls(planes, stride, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        return nn.Dense(self.num_classes, kernel_init=torch_linear_init, name="fc")(x)
