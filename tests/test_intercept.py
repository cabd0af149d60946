"""Tests of fgq_jax.intercept: activation quantization and capture at conv/dense layers."""
import jax.numpy as jnp
import numpy as np

from fgq_jax import activations
from fgq_jax.activations import ActConfig
from fgq_jax.data import normalize
from fgq_jax.intercept import capture_layer_io, linear_layer_paths, quantized_apply


def test_layer_paths_in_call_order(tiny):
    module, variables, _, _ = tiny
    assert linear_layer_paths(module, variables, (8, 8, 3)) == ["conv_a", "conv_b", "fc"]


def test_no_quantization_is_plain_apply(tiny):
    module, variables, images, _ = tiny
    x = normalize(jnp.asarray(images), "cifar")
    np.testing.assert_array_equal(
        quantized_apply(module, variables, x), module.apply(variables, x, train=False)
    )


def test_only_listed_layer_inputs_are_quantized(tiny):
    module, variables, images, _ = tiny
    x = normalize(jnp.asarray(images), "cifar")
    cfg = ActConfig((("conv_b", 4, False),))
    step = jnp.float32(0.05)
    got = capture_layer_io(module, variables, x, cfg, {"conv_b": step})
    plain = capture_layer_io(module, variables, x)
    np.testing.assert_array_equal(got["conv_a"], plain["conv_a"])
    expect = np.clip(np.round(np.asarray(plain["conv_b"]) / 0.05), 0, 15) * np.float32(0.05)
    np.testing.assert_allclose(got["conv_b"], expect, rtol=0, atol=1e-6)
    # and the quantized input really is what the layer consumed
    logits = quantized_apply(module, variables, x, cfg, {"conv_b": step})
    assert not np.allclose(logits, module.apply(variables, x))


def test_quantizer_used_is_the_core_one(tiny):
    module, variables, images, _ = tiny
    x = normalize(jnp.asarray(images), "cifar")
    step = jnp.float32(0.02)
    got = capture_layer_io(module, variables, x, ActConfig((("conv_a", 4, True),)), {"conv_a": step})
    np.testing.assert_array_equal(got["conv_a"], activations.quantize_activation(x, 4, step, signed=True))
