"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, Sec. 4.2) as in akamaster/pytorch_resnet_cifar10.

Layout (see ../shared/README.md), inputs NHWC [B, 32, 32, 3] already normalised:

    conv_init 3x3/1, 16 (no bias) -> bn_init -> relu
    stage1: n BasicBlocks, 16 channels, stride 1     (module names stage1_block0 .. stage1_block{n-1})
    stage2: n BasicBlocks, 32 channels, first stride 2
    stage3: n BasicBlocks, 64 channels, first stride 2
    global average pool -> fc (Dense 64 -> classes, with bias)

with depth = 6n + 2. The shortcut is "option A": identity, or, when the shape changes,
``x[:, ::2, ::2, :]`` zero-padded by planes//4 channels on each side (no parameters).

Parameter paths (as in ``variables["params"]``): ``conv_init/kernel`` [3,3,3,16], ``bn_init/{scale,bias}``,
``stage{s}_block{b}/{conv1,conv2}/kernel``, ``stage{s}_block{b}/{bn1,bn2}/...``, ``fc/{kernel,bias}``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from fgq_jax.models.layers import TorchBatchNorm, kaiming_fan_in, pad2d, torch_linear_init

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def option_a_shortcut(x: jax.Array, planes: int) -> jax.Array:
    """Parameter-free shortcut [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C + 2*(planes//4)]."""
    x = x[:, ::2, ::2, :]
    pad = planes // 4
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, pad)))


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut, ReLU. [B,H,W,Cin] -> [B,H/s,W/s,planes]."""

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = functools.partial(
            nn.Conv, kernel_size=(3, 3), padding=pad2d(1), use_bias=False, kernel_init=kaiming_fan_in
        )
        bn = functools.partial(TorchBatchNorm, use_running_average=not train)
        y = conv(self.planes, strides=(self.stride, self.stride), name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = conv(self.planes, name="conv2")(y)
        y = bn(name="bn2")(y)
        # akamaster applies option A whenever stride != 1 or the width changes (always together here).
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = option_a_shortcut(x, self.planes)
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2. [B, H, W, 3] -> logits [B, num_classes]."""

    depth: int = 20
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        n = (self.depth - 2) // 6
        x = nn.Conv(
            self.widths[0],
            (3, 3),
            padding=pad2d(1),
            use_bias=False,
            kernel_init=kaiming_fan_in,
            name="conv_init",
        )(x)
        x = nn.relu(TorchBatchNorm(use_running_average=not train, name="bn_init")(x))
        for s, planes in enumerate(self.widths):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = CifarBasicBlock(planes, stride, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # == F.avg_pool2d(x, x.size(3)) for square maps
        return nn.Dense(self.num_classes, kernel_init=torch_linear_init, name="fc")(x)
