"""Tests of fgq_jax.evaluate: interception-based activation quantization, calibration, compile-once."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import activations
from fgq_jax.data import normalize
from fgq_jax.evaluate import (
    ActConfig,
    Calibration,
    Evaluator,
    calibrate_steps,
    capture_layer_io,
    linear_layer_paths,
    quantized_apply,
)


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


def _reference_accuracy(module, variables, images, labels):
    logits = np.asarray(module.apply(variables, normalize(jnp.asarray(images), "cifar")))
    order = np.argsort(-logits, axis=1)
    top1 = np.mean(order[:, 0] == labels) * 100
    top5 = np.mean(np.any(order[:, :5] == labels[:, None], axis=1)) * 100
    return top1, top5


def test_evaluator_matches_numpy_and_compiles_once(tiny):
    module, variables, images, labels = tiny
    ev = Evaluator(module, "cifar")
    r = ev(variables, images, labels, batch_size=16, progress=False)  # 37 = 16 + 16 + 5 (padded tail)
    top1, top5 = _reference_accuracy(module, variables, images, labels)
    assert r.num_images == 37
    assert r.top1 == pytest.approx(top1) and r.top5 == pytest.approx(top5)
    # other weights: same compiled step
    other = jax.tree.map(lambda a: a * 1.5, variables)
    r2 = ev(other, images, labels, batch_size=16, progress=False)
    top1b, _ = _reference_accuracy(module, other, images, labels)
    assert r2.top1 == pytest.approx(top1b)
    assert ev.compilations == 1


def test_quantized_evaluator_reuses_compilation_across_steps(tiny):
    module, variables, images, labels = tiny
    cfg, steps = calibrate_steps(module, variables, images, 8, ["conv_b", "fc"], "cifar",
                                 Calibration("max"))
    ev = Evaluator(module, "cifar", cfg)
    ev(variables, images, labels, steps, batch_size=16, progress=False)
    ev(variables, images, labels, {k: v * 2 for k, v in steps.items()}, batch_size=16, progress=False)
    assert ev.compilations == 1
    with pytest.raises(ValueError, match="conv_b"):
        ev(variables, images, labels, {"fc": steps["fc"]}, batch_size=16, progress=False)


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


def test_quantizer_used_is_the_core_one(tiny):
    module, variables, images, _ = tiny
    x = normalize(jnp.asarray(images), "cifar")
    step = jnp.float32(0.02)
    got = capture_layer_io(module, variables, x, ActConfig((("conv_a", 4, True),)), {"conv_a": step})
    np.testing.assert_array_equal(got["conv_a"], activations.quantize_activation(x, 4, step, signed=True))
