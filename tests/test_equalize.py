"""Cross-layer equalization (fgq_jax.equalize): the FP function is unchanged, the ranges are equal,
the scales match a numpy reference, and bad pairs are named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax.equalize import EqualizationPair, channel_ranges, equalization_scales, equalize_params
from fgq_jax.models import get_model
from fgq_jax.ptq import quantize_model
from fgq_jax.recipe import QuantRecipe


def _squeezenet(hw=48, seed=0):
    spec = get_model("squeezenet1_1", num_classes=10)
    x = jax.random.normal(jax.random.key(seed), (2, hw, hw, 3))
    variables = spec.module.init(jax.random.key(seed + 1), x)
    # random init gives every channel the same range; spread them as trained nets have them
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda k: k * rng.lognormal(0.0, 1.0, k.shape[-1]).astype(np.float32),
                          dict(variables["params"]))
    return spec, {"params": params}, x


def test_numpy_reference_two_dense_layers():
    rng = np.random.default_rng(0)
    w1, b1, w2 = rng.normal(size=(5, 4)), rng.normal(size=4), rng.normal(size=(4, 3))
    w1[:, 2] *= 30.0  # one loud producer channel
    params = {"a": {"kernel": jnp.asarray(w1, jnp.float32), "bias": jnp.asarray(b1, jnp.float32)},
              "b": {"kernel": jnp.asarray(w2, jnp.float32)}}
    out = equalize_params(params, (EqualizationPair(("a",), ("b",)),))
    s = np.sqrt(np.abs(w1).max(0) / np.abs(w2).max(1))
    np.testing.assert_allclose(out["a"]["kernel"], w1 / s, rtol=1e-5)
    np.testing.assert_allclose(out["a"]["bias"], b1 / s, rtol=1e-5)
    np.testing.assert_allclose(out["b"]["kernel"], w2 * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(np.abs(out["a"]["kernel"]).max(0), np.abs(out["b"]["kernel"]).max(1), rtol=1e-5)
    x = rng.normal(size=(7, 5))
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    np.testing.assert_allclose(relu(x @ out["a"]["kernel"] + out["a"]["bias"]) @ out["b"]["kernel"],
                               relu(x @ w1 + b1) @ w2, rtol=1e-4, atol=1e-5)


def test_dead_channels_keep_scale_one():
    s = equalization_scales(jnp.array([0.0, 4.0, 2.0]), jnp.array([1.0, 0.0, 0.5]))
    np.testing.assert_allclose(s, [1.0, 1.0, 2.0])


def test_squeezenet_function_unchanged_and_ranges_equal():
    spec, v, x = _squeezenet()
    out = equalize_params(v["params"], spec.equalization_pairs)
    ref = spec.module.apply(v, x)
    got = spec.module.apply({"params": out}, x)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(ref))))
    get = lambda path: out[path.split("/")[0]][path.split("/")[1]] if "/" in path else out[path]  # noqa: E731
    for pair in spec.equalization_pairs:
        r1 = jnp.concatenate([channel_ranges(get(p)["kernel"], -1) for p in pair.producers])
        r2 = jnp.max(jnp.stack([channel_ranges(get(c)["kernel"], -2) for c in pair.consumers]), 0)
        np.testing.assert_allclose(r1, r2, rtol=1e-2)  # iterated to a 1e-4 step, not to the fixed point
    # the spread the equalization removes was really there
    r = channel_ranges(v["params"]["features_3"]["squeeze"]["kernel"], -1)
    assert float(r.max() / r.min()) > 5


def test_squeezenet_pairs_cover_every_fire():
    for name, fires in (("squeezenet1_1", 8), ("squeezenet1_0", 8)):
        pairs = get_model(name).equalization_pairs
        assert len(pairs) == 2 * fires + 1
        assert pairs[0].producers == ("features_0",) and pairs[-1].consumers == ("classifier_1",)


def test_errors_are_named():
    spec, v, _ = _squeezenet()
    with pytest.raises(ValueError, match="declares no equalization pairs"):
        equalize_params(v["params"], get_model("resnet20").equalization_pairs)
    bad = (EqualizationPair(("features_3/squeeze",), ("features_4/squeeze",)),)
    with pytest.raises(ValueError, match="features_4/squeeze"):
        equalize_params(v["params"], bad)
    with pytest.raises(KeyError, match="nope"):
        equalize_params(v["params"], (EqualizationPair(("nope",), ("features_3/squeeze",)),))


def test_recipe_column_and_ptq():
    r = QuantRecipe.make(method="exact", group_size=4, act_bits=None, equalize=True)
    assert r.key()["equalize"] is True
    assert QuantRecipe.from_key({**r.key(), "equalize": "true"}) == r
    assert QuantRecipe.from_key({k: v for k, v in r.key().items() if k != "equalize"}).repairs.equalize is False
    with pytest.raises(ValueError, match="equalization"):
        QuantRecipe.make(method="fp", equalize=True)
    # N=1 ternary is exact (each weight its own scale): the equalized quantized network must still
    # compute the FP function, with the FP first layer rescaled as the pairs say
    spec, v, x = _squeezenet()
    q = quantize_model(spec, v, r.replace(group_size=1))
    ref = spec.module.apply(v, x)
    np.testing.assert_allclose(spec.module.apply(q.variables, x), ref, rtol=1e-3,
                               atol=1e-3 * float(jnp.max(jnp.abs(ref))))
    assert not np.allclose(q.variables["params"]["features_0"]["kernel"], v["params"]["features_0"]["kernel"])
