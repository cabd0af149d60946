"""Tests of the label-free repairs against direct numpy computations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import repairs
from fgq_jax.data import normalize
from fgq_jax.activations import ActConfig
from fgq_jax.intercept import capture_layer_io
from fgq_jax.ternary import group_onehot
from fgq_jax.ptq import dequantize_tree
from fgq_jax.ternary import ternarize


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x)
        return nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def setup():
    module = ConvBN()
    variables = module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
    images = np.random.default_rng(0).integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    return module, variables, images


@pytest.mark.parametrize("strides,padding", [((1, 1), ((1, 1), (1, 1))), ((2, 2), "SAME"), ((1, 1), "VALID")])
def test_patches_reproduce_the_conv(strides, padding):
    conv = nn.Conv(5, (3, 3), strides=strides, padding=padding, use_bias=False)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    v = conv.init(jax.random.key(1), x)
    p = repairs._patches(conv, x)
    y = conv.apply(v, x)
    np.testing.assert_allclose(p @ v["params"]["kernel"].reshape(-1, 5), y.reshape(-1, 5), atol=1e-5)


def test_bn_reestimation_gives_population_statistics(setup):
    module, variables, images = setup
    new = repairs.reestimate_bn(module, variables, images, "cifar", batch_size=17)  # uneven batches
    x = normalize(jnp.asarray(images), "cifar")
    h = np.asarray(capture_layer_io(module, variables, x, capture="output")["conv"], np.float64)
    h = h.reshape(-1, h.shape[-1])
    stats = new["batch_stats"]["bn"]
    # pooled over batches of unequal size the estimate is the mean of batch means; check the
    # definition directly with the same batching
    means = [h.reshape(60, -1, 8)[i : i + 17].reshape(-1, 8).mean(0) for i in range(0, 60, 17)]
    vars_ = [h.reshape(60, -1, 8)[i : i + 17].reshape(-1, 8).var(0) for i in range(0, 60, 17)]
    np.testing.assert_allclose(stats["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean(vars_, 0) + np.var(means, 0), rtol=1e-4, atol=1e-5)
    # with equal batches this is exactly the statistics of the whole sample
    new20 = repairs.reestimate_bn(module, variables, images, "cifar", batch_size=20)
    np.testing.assert_allclose(new20["batch_stats"]["bn"]["mean"], h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new20["batch_stats"]["bn"]["var"], h.var(0), rtol=1e-4, atol=1e-5)
    assert variables["batch_stats"]["bn"]["mean"] is not new20["batch_stats"]["bn"]["mean"]  # pure


def _quantize(variables, n=4):
    p = variables["params"]
    tp = {**p, "conv": {"kernel": ternarize(p["conv"]["kernel"], n)},
          "fc": {**p["fc"], "kernel": ternarize(p["fc"]["kernel"], n)}}
    return tp


def test_bias_correction_removes_the_mean_shift(setup):
    module, variables, images = setup
    tp = _quantize(variables)
    vq = {**variables, "params": dequantize_tree(tp)}
    new = repairs.bias_correction(module, vq, variables["params"], images, "cifar", ["conv", "fc"],
                                  batch_size=20)
    x = normalize(jnp.asarray(images), "cifar")
    y_fp = np.asarray(capture_layer_io(module, variables, x, capture="output")["conv"]).reshape(-1, 8)
    y_q = np.asarray(capture_layer_io(module, vq, x, capture="output")["conv"]).reshape(-1, 8)
    shift = y_fp.mean(0) - y_q.mean(0)
    # conv has no bias: folded into the BN that consumes it
    np.testing.assert_allclose(
        new["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"] - shift, atol=1e-4
    )
    # fc has a bias: shift measured on the quantized network's own fc inputs
    xin = np.asarray(capture_layer_io(module, vq, x)["fc"])  # one shot: inputs before correction
    w_fp, w_q = variables["params"]["fc"]["kernel"], vq["params"]["fc"]["kernel"]
    np.testing.assert_allclose(
        new["params"]["fc"]["bias"], vq["params"]["fc"]["bias"] + (xin @ (w_fp - w_q)).mean(0), atol=1e-4
    )


@pytest.mark.parametrize("group_size,asym", [(4, False), (5, True), ("channel", False), (None, False)])
def test_fit_scales_is_the_least_squares_solution(setup, group_size, asym):
    module, variables, images = setup
    p = variables["params"]
    tt = ternarize(p["conv"]["kernel"], group_size, asymmetric=asym)
    tp = {**p, "conv": {"kernel": tt}}
    new = repairs.fit_scales(module, tp, variables, images, "cifar", dequantize_tree, ridge=0.0,
                             batch_size=25)
    fitted = new["conv"]["kernel"]
    assert np.array_equal(fitted.codes, tt.codes)  # codes kept, only scales move
    # brute force: numpy least squares on the explicit design matrix
    x = normalize(jnp.asarray(images), "cifar")
    conv = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
    patches = np.asarray(repairs._patches(conv, x), np.float64)  # FP input (first layer)
    w = np.asarray(p["conv"]["kernel"], np.float64).reshape(-1, 8)
    target = patches @ w
    codes = np.asarray(tt.codes, np.float64).reshape(-1, 8)
    E = group_onehot(tt.codes.shape, group_size)
    err_fit = err_orig = 0.0
    for k in range(8):
        cols = [E * (codes[:, k:k + 1] == 1), -E * (codes[:, k:k + 1] == -1)] if asym else [E * codes[:, k:k + 1]]
        B = np.concatenate(cols, axis=1)
        if group_size is None:
            continue
        A = patches @ B
        sol = np.linalg.lstsq(A, target[:, k], rcond=None)[0]
        got = np.concatenate([fitted.scales[:, k], fitted.neg_scales[:, k]]) if asym else fitted.scales[:, k]
        excited = np.abs(A).sum(0) > 0
        np.testing.assert_allclose(got[excited], np.maximum(sol[excited], 0), rtol=2e-3, atol=2e-4)
    w_fit = np.asarray(fitted.dequantize(), np.float64).reshape(-1, 8)
    w_orig = np.asarray(tt.dequantize(), np.float64).reshape(-1, 8)
    err_fit = np.sum((patches @ w_fit - target) ** 2)
    err_orig = np.sum((patches @ w_orig - target) ** 2)
    assert err_fit <= err_orig * (1 + 1e-6)


def test_fit_scales_uses_quantized_activations(setup):
    module, variables, images = setup
    p = variables["params"]
    tp = {**p, "fc": {**p["fc"], "kernel": ternarize(p["fc"]["kernel"], 4)}}
    cfg = ActConfig((("fc", 2, False),))
    steps = {"fc": jnp.float32(0.5)}
    a = repairs.fit_scales(module, tp, variables, images, "cifar", dequantize_tree, cfg, steps)
    b = repairs.fit_scales(module, tp, variables, images, "cifar", dequantize_tree)
    assert not np.allclose(a["fc"]["kernel"].scales, b["fc"]["kernel"].scales)
