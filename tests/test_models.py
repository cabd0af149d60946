"""Model registry, architecture facts and PyTorch-faithful layers (pooling, BatchNorm)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from fgq_jax.models import (
    MODEL_NAMES,
    ModelSpec,
    TorchBatchNorm,
    adaptive_avg_pool,
    get_model,
    max_pool,
    variable_shapes,
)
from fgq_jax.models.cifar_resnet import option_a_shortcut

# Parameter counts (weights + biases + BN affine, no running stats): torchvision's model docs /
# sum(p.numel() for p in model.parameters()); CIFAR: akamaster's README (0.27M ... 1.7M).
PARAM_COUNTS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "alexnet": 61_100_840,
    "squeezenet1_0": 1_248_424,
    "squeezenet1_1": 1_235_496,
}
LAYERS = {n: ("conv_init", "fc") for n in MODEL_NAMES} | {
    "alexnet": ("conv1", "fc8"),
    "squeezenet1_0": ("features_0", "classifier_1"),
    "squeezenet1_1": ("features_0", "classifier_1"),
}
SQUEEZENETS = ("squeezenet1_0", "squeezenet1_1")
BN_FREE = ("alexnet", *SQUEEZENETS)


def test_registry_names():
    assert set(MODEL_NAMES) == set(PARAM_COUNTS)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as e:
        get_model("resnet19")
    msg = str(e.value)
    assert "resnet19" in msg
    assert all(n in msg for n in MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_spec_and_param_count(name):
    spec = get_model(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    cifar = name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
    assert spec.dataset_family == spec.family == ("cifar" if cifar else "imagenet")
    # SqueezeNet: 227, the crop of the original Caffe models and of the shared ImageNet subset.
    hw = 32 if cifar else 227 if name in SQUEEZENETS else 224
    assert spec.input_shape == (hw, hw, 3)
    assert spec.num_classes == (10 if cifar else 1000)
    assert (spec.first_layer, spec.last_layer) == LAYERS[name]

    shapes = variable_shapes(name)
    params = traverse_util.flatten_dict(shapes["params"], sep="/")
    assert sum(math.prod(s.shape) for s in params.values()) == PARAM_COUNTS[name]
    assert all(s.dtype == jnp.float32 for s in params.values())
    first, last = params[f"{spec.first_layer}/kernel"], params[f"{spec.last_layer}/kernel"]
    assert first.ndim == 4 and first.shape[2] == 3  # reads the RGB input
    assert last.shape[-1] == spec.num_classes and f"{spec.last_layer}/bias" in params
    # BN-free AlexNet / SqueezeNet have no batch_stats; every ResNet BN has running mean/var.
    assert ("batch_stats" in shapes) == (name not in BN_FREE)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "alexnet", "squeezenet1_1"])
def test_first_and_last_layer_are_the_first_conv_and_last_dense_called(name):
    """Interceptors see every conv/dense as a plain nn.Conv / nn.Dense, in execution order
    (SqueezeNet's classifier, its last layer, is a 1x1 conv)."""
    spec = get_model(name)
    calls = []

    def record(f, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Conv, nn.Dense)):
            calls.append(("/".join(ctx.module.path), type(ctx.module)))
        return f(*args, **kwargs)

    def init(x):
        with nn.intercept_methods(record):
            return spec.module.init(jax.random.key(0), x)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32))
    assert calls[0] == (spec.first_layer, nn.Conv)
    assert calls[-1] == (spec.last_layer, nn.Conv if name in SQUEEZENETS else nn.Dense)
    n_kernels = sum(k.endswith("kernel") for k in traverse_util.flatten_dict(variable_shapes(name)["params"], sep="/"))
    assert len(calls) == n_kernels  # no conv/dense hidden from interceptors


def test_num_classes_override():
    spec = get_model("resnet20", num_classes=100)
    assert spec.num_classes == 100
    assert variable_shapes("resnet20", 100)["params"]["fc"]["kernel"].shape == (64, 100)
    assert get_model("alexnet", 7).num_classes == 7
    assert variable_shapes("resnet18", 5)["params"]["fc"]["bias"].shape == (5,)


def test_option_a_shortcut():
    x = jnp.arange(2 * 6 * 6 * 16, dtype=jnp.float32).reshape(2, 6, 6, 16)
    y = option_a_shortcut(x, 32)
    assert y.shape == (2, 3, 3, 32)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert not np.any(y[..., :8]) and not np.any(y[..., 24:])


def _random_variables(name: str, seed: int = 0) -> dict:
    """He-scaled random kernels and non-trivial BN statistics, drawn with numpy.

    (model.init draws with threefry, whose per-shape compiles cost seconds each on a shared CPU.)
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variable_shapes(name))
    out = {}
    for path, s in flat.items():
        if path[-1] == "kernel":
            v = rng.normal(0, math.sqrt(2 / math.prod(s.shape[:-1])), s.shape)
        elif path[-1] in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, s.shape)
        else:  # bias, mean
            v = rng.normal(0, 0.1, s.shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def test_cifar_resnet_forward_and_train_step():
    spec = get_model("resnet20")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _random_variables("resnet20")
    logits = spec.module.apply(variables, x)
    assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
    # Eval mode uses running stats: a sample's logits do not depend on the rest of the batch.
    np.testing.assert_allclose(spec.module.apply(variables, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)
    # Train mode uses batch stats and updates only batch_stats (momentum 0.9).
    out, upd = spec.module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (4, 10) and set(upd) == {"batch_stats"}
    conv = variables["params"]["conv_init"]["kernel"]
    h = jax.lax.conv_general_dilated(x, conv, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    n = h.shape[0] * h.shape[1] * h.shape[2]
    old = variables["batch_stats"]["bn_init"]
    np.testing.assert_allclose(
        upd["batch_stats"]["bn_init"]["mean"], 0.9 * old["mean"] + 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(  # PyTorch convention: unbiased batch variance in the running average
        upd["batch_stats"]["bn_init"]["var"], 0.9 * old["var"] + 0.1 * h.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-4
    )


def test_alexnet_dropout_only_in_train_mode():
    spec = get_model("alexnet", num_classes=10)
    x = jax.random.normal(jax.random.key(2), (2, 67, 67, 3))  # smallest-ish input: 1x1 before the adaptive pool
    # numpy weights: much faster than init's 61M threefry draws on a shared CPU.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.random(s.shape, dtype=np.float32) * 0.02 - 0.01, variable_shapes("alexnet", 10)
    )
    a = spec.module.apply(variables, x)
    np.testing.assert_array_equal(a, spec.module.apply(variables, x))  # no rng needed, deterministic
    b = spec.module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert a.shape == b.shape == (2, 10) and not np.allclose(a, b)


def test_squeezenet_names_mirror_torchvision_and_dropout_only_in_train_mode():
    spec = get_model("squeezenet1_1", num_classes=10)
    params = traverse_util.flatten_dict(variable_shapes("squeezenet1_1", 10)["params"], sep="/")
    # Fire modules at torchvision's features indices 3, 4, 6, 7, 9..12; pools (2, 5, 8) have no params.
    fires = sorted({int(p.split("/")[0].split("_")[1]) for p in params if p.count("/") == 2})
    assert fires == [3, 4, 6, 7, 9, 10, 11, 12]
    assert params["features_0/kernel"].shape == (3, 3, 3, 64)
    assert params["features_3/expand3x3/kernel"].shape == (3, 3, 16, 64)
    assert params["features_12/expand1x1/kernel"].shape == (1, 1, 64, 256)
    assert params["classifier_1/kernel"].shape == (1, 1, 512, 10)
    x = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), variable_shapes("squeezenet1_1", 10)
    )
    a = spec.module.apply(variables, x)
    np.testing.assert_array_equal(a, spec.module.apply(variables, x))  # no rng needed, deterministic
    b = spec.module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(5)})
    assert a.shape == b.shape == (2, 10) and not np.allclose(a, b)


def test_squeezenet_unknown_version():
    from fgq_jax.models import SqueezeNet

    with pytest.raises(ValueError, match="'1_2'.*1_0.*1_1"):
        SqueezeNet(version="1_2").init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


# --- PyTorch-faithful layers, checked against torch itself -------------------------------------

torch = pytest.importorskip("torch", reason="PyTorch is needed for the layer-equivalence checks")
F = torch.nn.functional


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize(
    "hw,out",
    [((6, 6), (6, 6)), ((13, 13), (6, 6)), ((7, 9), (6, 6)), ((3, 4), (6, 6)), ((10, 7), (3, 2)), ((1, 1), (6, 6))],
)
def test_adaptive_avg_pool_matches_torch(hw, out):
    x = np.random.default_rng(0).normal(size=(2, *hw, 5)).astype(np.float32)
    got = np.asarray(adaptive_avg_pool(jnp.asarray(x), out))
    want = F.adaptive_avg_pool2d(_nchw(x), out).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,pad", [(8, 1), (9, 1), (13, 0), (27, 0)])
def test_max_pool_matches_torch_with_negative_inputs(size, pad):
    # All-negative inputs: zero padding (instead of -inf) would show up at the borders.
    x = -np.abs(np.random.default_rng(1).normal(size=(2, size, size, 4)).astype(np.float32)) - 1.0
    got = np.asarray(max_pool(jnp.asarray(x), 3, 2, padding=pad))
    want = F.max_pool2d(_nchw(x), 3, 2, padding=pad).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [5, 8, 13, 14, 27, 28, 54, 55, 56, 109, 111, 113])
@pytest.mark.parametrize("pad", [0, 1])
def test_max_pool_ceil_mode_matches_torch(size, pad):
    """SqueezeNet's MaxPool2d(3, 2, ceil_mode=True): even sizes get one more, partial, window."""
    from fgq_jax.models.layers import pool_output_size

    x = -np.abs(np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)) - 1.0
    want = F.max_pool2d(_nchw(x), 3, 2, padding=pad, ceil_mode=True).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(max_pool(jnp.asarray(x), 3, 2, padding=pad, ceil_mode=True))
    np.testing.assert_array_equal(got, want)
    assert want.shape[1:3] == (pool_output_size(size, 3, 2, pad, True), pool_output_size(size + 1, 3, 2, pad, True))


def test_pool_output_size_rules():
    from fgq_jax.models.layers import pool_output_size

    assert [pool_output_size(n, 3, 2) for n in (111, 112, 113)] == [55, 55, 56]
    assert [pool_output_size(n, 3, 2, ceil_mode=True) for n in (111, 112, 113)] == [55, 56, 56]
    # ceil mode drops a last window that would start in the right padding: 5 + 2*1 wide, window 2,
    # stride 2 -> ceil(5/2) + 1 = 4 windows, the 4th starting at 6 = the padding -> 3 (as torch)
    assert pool_output_size(5, 2, 2, padding=1, ceil_mode=True) == 3
    assert pool_output_size(4, 2, 2, padding=1, ceil_mode=True) == 3
    x = -np.abs(np.random.default_rng(3).normal(size=(1, 5, 4, 2)).astype(np.float32)) - 1.0
    want = F.max_pool2d(_nchw(x), 2, 2, padding=1, ceil_mode=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(max_pool(jnp.asarray(x), 2, 2, padding=1, ceil_mode=True), want)
    with pytest.raises(ValueError, match="window 3"):
        pool_output_size(2, 3, 2)


def test_torch_batchnorm_matches_torch_train_and_eval():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(3, 4, 5, 6)) * 2 + 3).astype(np.float32)  # n = 60 per channel
    bn_t = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn_t.weight.uniform_(0.5, 1.5)
        bn_t.bias.normal_()
    bn = TorchBatchNorm(use_running_average=False)
    assert isinstance(bn, nn.BatchNorm) and bn.momentum == 0.9 and bn.epsilon == 1e-5
    variables = {
        "params": {"scale": jnp.asarray(bn_t.weight.detach().numpy()), "bias": jnp.asarray(bn_t.bias.detach().numpy())},
        "batch_stats": {"mean": jnp.zeros(6), "var": jnp.ones(6)},
    }
    y, upd = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    bn_t.train()
    y_t = bn_t(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, y_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], bn_t.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], bn_t.running_var.numpy(), rtol=1e-5)  # unbiased
    # Eval: normalise with the running statistics.
    bn_t.eval()
    variables["batch_stats"] = upd["batch_stats"]
    y_eval = TorchBatchNorm(use_running_average=True).apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(y_eval, bn_t(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
