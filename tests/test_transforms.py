"""Tests for fgq_jax.transforms: rules, Linen params dicts, NNX States, purity, errors, STE."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fgq_jax import transforms as tr
from fgq_jax.ternary import TernaryTensor, quantize_int8_weights, ternarize

WQ = tr.WeightQuant("exact", group_size=4)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), name="conv_init")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn_init")(x)
        x = nn.relu(x)
        y = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
        y = nn.Conv(8, (1, 1), name="conv2")(y)
        x = x + y
        return nn.Dense(5, name="fc")(x.mean((1, 2)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv_init = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv1 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv_init(x), use_running_average=True))
        x = x + self.conv1(x)
        return self.fc(x.mean((1, 2)))


@pytest.fixture(scope="module")
def linen():
    model = LinenNet()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def _np_tree(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_default_rules_paths(linen):
    _, variables, _ = linen
    params = variables["params"]
    rules = tr.default_rules(WQ, "conv_init", "fc")
    assert tr.quantized_paths(params, rules) == {"conv1/kernel": WQ, "conv2/kernel": WQ}
    rules8 = tr.default_rules(WQ, "conv_init", "fc", first_last="8")
    paths8 = tr.quantized_paths(params, rules8)
    assert paths8["conv_init/kernel"] == tr.Int8Weights() and paths8["fc/kernel"] == tr.Int8Weights()
    assert paths8["conv1/kernel"] == WQ
    assert not any("bias" in p or "bn" in p for p in paths8)
    # the same rules work on the full variables dict ("params/..." paths)
    assert set(tr.quantized_paths(variables, rules8)) == {"params/" + p for p in paths8}


def test_fake_quant_linen(linen):
    model, variables, x = linen
    params = variables["params"]
    before = _np_tree(params)
    q = tr.quantize_params(params, tr.default_rules(WQ, "conv_init", "fc"))
    _assert_tree_equal(params, before)  # pure: the input is untouched
    assert jax.tree.structure(q) == jax.tree.structure(params)
    for name in ("conv1", "conv2"):
        expect = ternarize(params[name]["kernel"], 4).dequantize()
        np.testing.assert_array_equal(np.asarray(q[name]["kernel"]), np.asarray(expect))
    # first/last layer, biases and batch-norm parameters untouched
    for path in (("conv_init", "kernel"), ("fc", "kernel"), ("conv2", "bias"), ("bn_init", "scale")):
        np.testing.assert_array_equal(np.asarray(q[path[0]][path[1]]), before[path[0]][path[1]])
    out = model.apply({**variables, "params": q}, x)
    assert out.shape == (2, 5) and np.all(np.isfinite(np.asarray(out)))


def test_first_last_int8_linen(linen):
    _, variables, _ = linen
    params = variables["params"]
    q = tr.ternarize_params(params, WQ, first_layer="conv_init", last_layer="fc", first_last="8")
    for name in ("conv_init", "fc"):
        np.testing.assert_array_equal(
            np.asarray(q[name]["kernel"]), np.asarray(quantize_int8_weights(params[name]["kernel"])))
    same = tr.quantize_params(params, tr.default_rules(WQ, "conv_init", "fc", first_last="8"))
    _assert_tree_equal(q, same)


def test_ternary_mode_linen(linen):
    _, variables, _ = linen
    params = variables["params"]
    rules = tr.default_rules(tr.WeightQuant("twn", group_size="channel", asymmetric=True), "conv_init", "fc")
    tq = tr.quantize_params(params, rules, mode="ternary")
    fake = tr.quantize_params(params, rules, mode="fake")
    for name in ("conv1", "conv2"):
        leaf = tq[name]["kernel"]
        assert isinstance(leaf, TernaryTensor)
        assert leaf.method == "twn" and leaf.group_size == "channel" and leaf.neg_scales is not None
        np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(fake[name]["kernel"]))
    assert not isinstance(tq["conv_init"]["kernel"], TernaryTensor)
    # a tree with TernaryTensor leaves is a pytree: jit-able, and quantized_paths skips them
    jax.jit(lambda t: t)(tq)
    assert tr.quantized_paths(tq, rules) == {}


def test_nnx_state_roundtrip():
    model = NnxNet(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
    state = nnx.state(model, nnx.Param)
    before = _np_tree(state)
    rules = tr.default_rules(WQ, "conv_init", "fc")
    assert set(tr.quantized_paths(state, rules)) == {"conv1/kernel"}
    q = tr.quantize_params(state, rules)
    _assert_tree_equal(state, before)  # pure
    assert isinstance(q, nnx.State)
    clone = nnx.clone(model)
    nnx.update(clone, q)
    # original model untouched, clone has the ternary kernel
    np.testing.assert_array_equal(np.asarray(model.conv1.kernel[...]), before["conv1"]["kernel"])
    expect = ternarize(model.conv1.kernel[...], 4).dequantize()
    np.testing.assert_array_equal(np.asarray(clone.conv1.kernel[...]), np.asarray(expect))
    np.testing.assert_array_equal(np.asarray(clone.fc.kernel[...]), np.asarray(model.fc.kernel[...]))
    # the clone computes with the fake-quantized kernel
    ref = nnx.clone(model)
    ref.conv1.kernel[...] = expect
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(ref(x)), rtol=1e-6, atol=1e-6)
    # ternary mode: TernaryTensor inside the Param
    tq = tr.quantize_params(state, rules, mode="ternary")
    assert isinstance(tq["conv1"]["kernel"].get_value(), TernaryTensor)


def test_rules_first_match_wins_and_regex(linen):
    _, variables, _ = linen
    params = variables["params"]
    rules = (
        tr.Rule(r"conv1/kernel$", None),  # keep conv1 in FP ...
        tr.Rule(r"conv\d/kernel$", tr.WeightQuant("binary", 8)),  # ... though this would match
        tr.Rule(r"kernel$", tr.WeightQuant("absmean", None)),
        tr.Rule(r"bias$", WQ),  # 1-d: never quantized
    )
    paths = tr.quantized_paths(params, rules)
    assert paths == {
        "conv_init/kernel": tr.WeightQuant("absmean", None),
        "conv2/kernel": tr.WeightQuant("binary", 8),
        "fc/kernel": tr.WeightQuant("absmean", None),
    }
    q = tr.quantize_params(params, rules)
    np.testing.assert_array_equal(np.asarray(q["conv1"]["kernel"]), np.asarray(params["conv1"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(q["conv2"]["bias"]), np.asarray(params["conv2"]["bias"]))
    assert len(np.unique(np.abs(np.asarray(q["conv_init"]["kernel"])))) <= 2  # per-tensor: {0, alpha}


def test_nan_inf_names_the_path(linen):
    _, variables, _ = linen
    params = copy.deepcopy(_np_tree(variables["params"]))
    params["conv2"]["kernel"][0, 0, 1, 2] = np.nan
    before = copy.deepcopy(params)
    rules = tr.default_rules(WQ, "conv_init", "fc")
    with pytest.raises(ValueError, match=r"conv2/kernel.*NaN/Inf"):
        tr.quantize_params(params, rules)
    _assert_tree_equal(params, before)
    params["conv2"]["kernel"][0, 0, 1, 2] = 1.0
    params["fc"]["kernel"][0, 0] = np.inf  # full-precision layer: not checked, kept as is
    q = tr.quantize_params(params, rules)
    assert np.isinf(np.asarray(q["fc"]["kernel"])[0, 0])
    params["conv1"]["kernel"][1, 1, 0, 0] = -np.inf
    with pytest.raises(ValueError, match="conv1/kernel"):
        tr.quantize_params(params, rules, mode="ternary")


def test_ste_gradient_is_identity(linen):
    _, variables, _ = linen
    params = variables["params"]
    rules = tr.default_rules(WQ, "conv_init", "fc", first_last="8")
    g = jax.tree.map(lambda a: jnp.full_like(a, 0.5), params)

    def loss(p):
        q = tr.quantize_params(p, rules, ste=True)
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(g)))

    grads = jax.jit(jax.grad(loss))(params)
    _assert_tree_equal(grads, g)
    # forward values inside jit equal the eager fake-quant tree
    fwd = jax.jit(lambda p: tr.quantize_params(p, rules, ste=True))(params)
    ref = tr.quantize_params(params, rules)
    for a, b in zip(jax.tree.leaves(fwd), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_bad_arguments(linen):
    _, variables, _ = linen
    params = variables["params"]
    rules = tr.default_rules(WQ, "conv_init", "fc")
    with pytest.raises(ValueError, match="mode"):
        tr.quantize_params(params, rules, mode="int4")
    with pytest.raises(ValueError, match="ste"):
        tr.quantize_params(params, rules, mode="ternary", ste=True)
    with pytest.raises(ValueError, match="first_last"):
        tr.default_rules(WQ, "conv_init", "fc", first_last="4")
    with pytest.raises(TypeError):
        tr.default_rules("exact", "conv_init", "fc")
    with pytest.raises(TypeError):
        tr.quantize_params(params, [("kernel", WQ)])
    with pytest.raises(ValueError, match="invalid rule pattern"):
        tr.Rule("conv(", WQ)
    with pytest.raises(ValueError, match="unknown ternarization method"):
        tr.WeightQuant("ternary")
    with pytest.raises(ValueError, match=">= 1"):
        tr.WeightQuant(group_size=0)
    with pytest.raises(TypeError, match="bool"):
        tr.WeightQuant(group_size=True)
    with pytest.raises(ValueError, match="grouping"):
        tr.WeightQuant(grouping="row")
    assert tr.WeightQuant(group_size=4, grouping="kernel").group_size is None


def test_path_strings():
    tree = {"a": [np.zeros((2, 2)), {"kernel": np.zeros((2, 2))}]}
    paths = [tr.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0", "a/1/kernel"]
    assert tr.quantized_paths(tree, tr.default_rules(WQ, "x", "y")) == {"a/1/kernel": WQ}
