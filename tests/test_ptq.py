"""Tests of fgq_jax.ptq: activation calibration and quantize_model by a recipe."""
import jax.numpy as jnp
import pytest

from fgq_jax.activations import ActConfig, Calibration
from fgq_jax.data import normalize
from fgq_jax.intercept import capture_layer_io
from fgq_jax.ptq import calibrate_steps


def test_calibration_signedness_and_max_steps(tiny):
    module, variables, images, _ = tiny
    cfg, steps = calibrate_steps(module, variables, images, 8, ["conv_a", "conv_b"], "cifar",
                                 Calibration("max"))
    spec = cfg.spec()
    assert spec["conv_a"] == (8, True)  # normalised image: signed
    assert spec["conv_b"] == (8, False)  # after ReLU: unsigned
    x = normalize(jnp.asarray(images), "cifar")
    plain = capture_layer_io(module, variables, x)
    assert float(steps["conv_a"]) == pytest.approx(float(jnp.max(jnp.abs(x))) / 127, rel=1e-6)
    # conv_b is calibrated on the input produced with conv_a's input already quantized
    xq = capture_layer_io(module, variables, x, ActConfig((("conv_a", 8, True),)),
                          {"conv_a": steps["conv_a"]})
    assert float(steps["conv_b"]) == pytest.approx(float(jnp.max(xq["conv_b"])) / 255, rel=1e-6)
    assert float(jnp.max(xq["conv_b"])) != float(jnp.max(plain["conv_b"]))
