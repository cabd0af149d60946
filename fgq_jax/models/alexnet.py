"""AlexNet in torchvision's variant (one-tower, 64/192/384/256/256 filters, no LRN).

Inputs NHWC [B, 224, 224, 3] already normalised (any size >= 63 works: the adaptive pool fixes 6x6).

    conv1 11x11/4 pad 2, 64   relu  maxpool 3/2     (torchvision features.0)
    conv2 5x5 pad 2, 192      relu  maxpool 3/2     (features.3)
    conv3 3x3 pad 1, 384      relu                  (features.6)
    conv4 3x3 pad 1, 256      relu                  (features.8)
    conv5 3x3 pad 1, 256      relu  maxpool 3/2     (features.10)
    adaptive avg pool -> 6x6, flatten (NHWC order: [B, 6*6*256], channel fastest)
    dropout fc6 9216->4096 relu dropout fc7 4096->4096 relu fc8 4096->classes
                                                    (classifier.1 / .4 / .6)

Dropout (p=0.5) is active only with ``train=True`` and then needs a ``"dropout"`` rng.
Note: fc6's input is flattened in NHWC order; the converter permutes torchvision's (C, H, W) rows.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from fgq_jax.models.layers import adaptive_avg_pool, max_pool, pad2d, torch_linear_init

ALEXNET_POOL = (6, 6)
# torch.nn.Conv2d default init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = torch_linear_init


class AlexNet(nn.Module):
    """torchvision AlexNet. [B, H, W, 3] -> logits [B, num_classes]."""

    num_classes: int = 1000
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv(features, k, stride, pad, name):
            return nn.Conv(
                features,
                (k, k),
                strides=(stride, stride),
                padding=pad2d(pad),
                kernel_init=_torch_conv_init,
                name=name,
            )

        x = nn.relu(conv(64, 11, 4, 2, "conv1")(x))
        x = max_pool(x, 3, 2)
        x = nn.relu(conv(192, 5, 1, 2, "conv2")(x))
        x = max_pool(x, 3, 2)
        x = nn.relu(conv(384, 3, 1, 1, "conv3")(x))
        x = nn.relu(conv(256, 3, 1, 1, "conv4")(x))
        x = nn.relu(conv(256, 3, 1, 1, "conv5")(x))
        x = max_pool(x, 3, 2)
        x = adaptive_avg_pool(x, ALEXNET_POOL)
        x = x.reshape(x.shape[0], -1)  # [B, 6*6*256], (h, w, c) order
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(4096, kernel_init=torch_linear_init, name="fc6")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(4096, kernel_init=torch_linear_init, name="fc7")(x))
        return nn.Dense(self.num_classes, kernel_init=torch_linear_init, name="fc8")(x)
