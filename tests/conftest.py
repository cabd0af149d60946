"""Shared fixtures: a tiny conv net (conv-BN-ReLU, strided conv, dense) and random images."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv_a")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn_a")(x)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv_b")(x)
        x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(10, name="fc")(x)


@pytest.fixture(scope="module")
def tiny():
    module = TinyNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 37).astype(np.int32)
    return module, variables, images, labels


