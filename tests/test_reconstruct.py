"""Tests of fgq_jax.reconstruct: block reconstruction of a ternarized network (small model, CPU)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import integer as I
from fgq_jax import reconstruct as R
from fgq_jax.activations import ActConfig
from fgq_jax.data import normalize
from fgq_jax.intercept import quantized_apply
from fgq_jax.models import ModelSpec
from fgq_jax.packing import load_ternary, save_ternary
from fgq_jax.ptq import calibrate_steps, quantize_model
from fgq_jax.recipe import REPAIRS, QuantRecipe
from fgq_jax.ternary import dequantize_tree, is_ternary
from fgq_jax.transforms import WeightQuant, default_rules, quantize_params

FAST = R.ReconSettings(iterations=60, batch_size=8, lr_codes=5e-2)
FAST_LAYER = R.ReconSettings(iterations=200, unit="layer")


class Block(nn.Module):
    """conv-BN-ReLU-conv + identity shortcut, ReLU (a ResNet basic block)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(y))
        y = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv2")(y)
        return nn.relu(y + x)


class BlockNet(nn.Module):
    """stem (first layer) -> block0 -> mid (a top-level conv: a unit of its own) -> head (last)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="stem")(x))
        x = Block(name="block0")(x, train)
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="mid")(x))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def net():
    module = BlockNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    images = np.random.default_rng(0).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    spec = ModelSpec(module, "blocknet", "stem", "head", (8, 8, 3), 10, "cifar")
    return spec, variables, images


def _ternary(variables, n, asymmetric=False, method="exact"):
    rules = default_rules(WeightQuant(method, n, asymmetric), "stem", "head")
    return quantize_params(variables["params"], rules, mode="ternary")


def _act(spec, variables, tparams, images, bits=8):
    v = {**variables, "params": dequantize_tree(tparams)}
    return calibrate_steps(spec.module, v, images, bits, ["block0/conv1", "block0/conv2", "mid"], "cifar")


def _kernels(tparams):
    flat = jax.tree_util.tree_flatten_with_path(tparams, is_leaf=is_ternary)[0]
    return {jax.tree_util.keystr(p): leaf for p, leaf in flat if is_ternary(leaf)}


def test_units_follow_the_model_structure(net):
    spec, variables, images = net
    units = R.find_units(spec.module, variables, spec.input_shape, ["block0/conv1", "block0/conv2", "mid"])
    assert units == [R.Unit("block0", ("block0/conv1", "block0/conv2")), R.Unit("mid", ("mid",))]
    with pytest.raises(ValueError, match="never called"):
        R.find_units(spec.module, variables, spec.input_shape, ["block0/nope"])


@pytest.mark.parametrize("method,n,asym,bits", [
    ("exact", 4, False, 8), ("exact", "channel", True, 4), ("twn", None, False, None), ("binary", 16, False, 8),
])
def test_codes_exactly_ternary_and_loss_decreases(net, method, n, asym, bits):
    spec, variables, images = net
    tparams = _ternary(variables, n, asym, method)
    cfg, steps = _act(spec, variables, tparams, images, bits) if bits else (ActConfig(), {})
    log = []
    out = R.reconstruct(spec.module, tparams, variables, images, "cifar", cfg, steps, FAST, seed=0, log=log)
    before, after = _kernels(tparams), _kernels(out)
    assert before.keys() == after.keys() and len(after) == 3
    for k, tt in after.items():
        ref = before[k]
        assert tt.codes.dtype == jnp.int8 and tt.codes.shape == ref.codes.shape
        allowed = {-1, 1} if method == "binary" else {-1, 0, 1}
        assert set(np.unique(np.asarray(tt.codes)).tolist()) <= allowed
        assert tt.scales.shape == ref.scales.shape and bool(jnp.all(tt.scales > 0))
        assert (tt.neg_scales is None) == (ref.neg_scales is None)
        assert (tt.group_size, tt.grouping, tt.method) == (ref.group_size, ref.grouping, ref.method)
    assert [entry["unit"] for entry in log] == ["block0", "mid"]
    for entry in log:
        assert entry["curve"].shape == (FAST.iterations,)
        if entry["kept"]:  # a result worse than the input ternarization (on the sample) is dropped
            assert entry["loss_after"] <= entry["loss_before"]
    if method == "exact" and n == 4:  # the block fits the FP block better than plain ternarization
        assert all(e["kept"] and e["loss_after"] < 0.95 * e["loss_before"] for e in log)
    # the non-ternary layers are untouched
    np.testing.assert_array_equal(out["stem"]["kernel"], tparams["stem"]["kernel"])


def test_layer_units_reduce_each_layers_output_error(net):
    spec, variables, images = net
    tparams = _ternary(variables, 4)
    cfg, steps = _act(spec, variables, tparams, images)
    log = []
    out = R.reconstruct(spec.module, tparams, variables, images, "cifar", cfg, steps, FAST_LAYER, log=log)
    assert [e["unit"] for e in log] == ["block0/conv1", "block0/conv2", "mid"]
    assert all(e["kept"] and e["loss_after"] < e["loss_before"] for e in log)
    for tt in _kernels(out).values():
        assert set(np.unique(np.asarray(tt.codes)).tolist()) <= {-1, 0, 1}


def test_deterministic_for_a_seed(net):
    spec, variables, images = net
    tparams = _ternary(variables, 4)
    cfg, steps = _act(spec, variables, tparams, images)
    run = lambda seed: R.reconstruct(spec.module, tparams, variables, images, "cifar", cfg, steps,  # noqa: E731
                                     dataclasses.replace(FAST, iterations=20), seed=seed)
    a, b, c = _kernels(run(3)), _kernels(run(3)), _kernels(run(4))
    for k in a:
        np.testing.assert_array_equal(a[k].codes, b[k].codes)
        np.testing.assert_array_equal(a[k].scales, b[k].scales)
    assert any(not np.array_equal(a[k].scales, c[k].scales) for k in a)


def test_exports_and_runs_the_integer_path_bit_exactly(net, tmp_path):
    spec, variables, images = net
    recipe = QuantRecipe.make(method="exact", group_size=4, act_bits=8, reconstruct=True, num_calib=48,
                              num_repair=48, num_recon=48, recon_iters=40, recon_batch=8,
                              augment_repair_images=False)
    q = quantize_model(spec, variables, recipe, images, images)
    assert "reconstruct" in q.seconds and [e["unit"] for e in q.recon_log] == ["block0", "mid"]
    out = save_ternary(tmp_path / "export", q.ternary_params)
    back = load_ternary(out)
    for k, tt in _kernels(back).items():
        ref = _kernels(q.ternary_params)[k]
        np.testing.assert_array_equal(tt.codes, ref.codes)
        assert set(np.unique(np.asarray(tt.codes)).tolist()) <= {-1, 0, 1}
    folded = I.fold_params(back)
    assert sorted(folded) == ["block0/conv1", "block0/conv2", "mid"]
    x = normalize(jnp.asarray(images[:8]), "cifar")
    # the exported scales are float16: the rounded fake-quant reference is built from the same tree
    rounded = {**q.variables, "params": I.rounded_fake_quant_tree(back)}
    steps = {p: q.act_steps[p] for p in folded}
    y_int = I.make_integer_forward(spec.module, "integer", act_cfg=q.act_cfg)(q.variables, folded, q.act_steps, x)
    y_emu = I.make_integer_forward(spec.module, "emulate", act_cfg=q.act_cfg)(q.variables, folded, q.act_steps, x)
    np.testing.assert_array_equal(np.asarray(y_int), np.asarray(y_emu))
    with jax.default_matmul_precision("highest"):
        y_fq = quantized_apply(spec.module, rounded, x, q.act_cfg, q.act_steps)
    np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_fq), atol=1e-4 * float(jnp.abs(y_fq).max()))
    assert steps  # every folded layer has its calibrated step


def test_recipe_key_column_round_trip():
    assert "reconstruct" in REPAIRS
    r = QuantRecipe.make(group_size=64, reconstruct=True, bn_reestimate=True, recon_iters=300, recon_qdrop=0.0)
    assert r.key()["reconstruct"] is True and "reconstruct" in r.repairs.names
    back = QuantRecipe.from_key({k: str(v).lower() for k, v in r.key().items()}, base=r)
    assert back == r
    old_row = {k: v for k, v in QuantRecipe.make(group_size=64).key().items() if k != "reconstruct"}
    assert QuantRecipe.from_key(old_row).repairs.reconstruct is False  # rows from before the column
    assert QuantRecipe.make(**r.flat()) == r
    with pytest.raises(ValueError, match="num_recon"):
        QuantRecipe.make(reconstruct=True, num_repair=256, num_recon=512)
    with pytest.raises(ValueError, match="recon_qdrop"):
        QuantRecipe.make(recon_qdrop=1.5)
    with pytest.raises(ValueError, match="method 'fp'"):
        QuantRecipe.make(method="fp", reconstruct=True)
