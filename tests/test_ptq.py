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


def test_binary_activations_calibration_and_end_to_end_eval(tiny):
    """act_bits=1: sign quantizer on signed inputs, {0, s} after a ReLU, XNOR-Net's mean|x| steps;
    quantize_model + Evaluator run it end to end (binary weights, 1-bit activations)."""
    import types

    import numpy as np

    from fgq_jax.evaluate import Evaluator
    from fgq_jax.intercept import quantized_apply
    from fgq_jax.ptq import quantize_model
    from fgq_jax.recipe import QuantRecipe

    module, variables, images, labels = tiny
    cfg, steps = calibrate_steps(module, variables, images, 1, ["conv_a", "conv_b"], "cifar",
                                 Calibration("mean"))
    assert cfg.spec() == {"conv_a": (1, True), "conv_b": (1, False)}
    x = normalize(jnp.asarray(images), "cifar")
    s_a = float(steps["conv_a"])
    assert s_a == pytest.approx(float(jnp.mean(jnp.abs(x))), rel=1e-5)
    # conv_b: mean(max(x, 0)) of its input with conv_a's input already binarized
    xa = capture_layer_io(module, variables, x, ActConfig((("conv_a", 1, True),)), {"conv_a": steps["conv_a"]})
    assert float(steps["conv_b"]) == pytest.approx(float(jnp.mean(jnp.maximum(xa["conv_b"], 0))), rel=1e-5)
    seen = capture_layer_io(module, variables, x, cfg, steps)
    assert set(np.unique(np.asarray(seen["conv_a"]))) == {np.float32(-s_a), np.float32(s_a)}
    assert set(np.unique(np.asarray(seen["conv_b"]))) <= {0.0, np.float32(steps["conv_b"])}

    spec = types.SimpleNamespace(module=module, first_layer="conv_a", last_layer="fc",
                                 dataset_family="cifar", input_shape=(8, 8, 3))
    recipe = QuantRecipe.make(method="binary", group_size="channel", act_bits=1,
                              calibration=Calibration("mean"), num_calib=37)
    q = quantize_model(spec, variables, recipe, calib_images=images)
    assert q.act_cfg.layers == (("conv_b", 1, False),) and q.quantized_layers == ("conv_b",)
    k = np.asarray(q.variables["params"]["conv_b"]["kernel"]).reshape(-1, 6)
    assert all(len(np.unique(np.abs(k[:, c]))) == 1 for c in range(6))  # {-alpha_c, +alpha_c}
    res = Evaluator(module, "cifar", q.act_cfg)(q.variables, images, labels, q.act_steps,
                                                batch_size=16, progress=False)
    logits = quantized_apply(module, q.variables, x, q.act_cfg, q.act_steps)
    assert res.correct1 == int(np.sum(np.argmax(np.asarray(logits), -1) == labels))
    assert res.num_images == 37


@pytest.mark.parametrize("calibration", [Calibration(), Calibration("percentile", pow2=True),
                                         Calibration(max_samples=64)])
def test_one_pass_calibration_equals_the_layer_by_layer_loop(tiny, calibration):
    """One batch: calibrate_steps runs the whole sequential calibration inside one forward. The
    steps must be bit for bit those of the layer-by-layer loop (each layer's input captured with
    the earlier layers quantized, subsampled, calibrated)."""
    from fgq_jax import activations, ptq

    module, variables, images, _ = tiny
    layers = ["conv_a", "conv_b", "fc"]
    cfg, steps = calibrate_steps(module, variables, images, 4, layers, "cifar", calibration)
    x = normalize(jnp.asarray(images), "cifar")
    ref = {}
    for path, bits, signed in cfg.layers:
        sample = capture_layer_io(module, variables, x, ActConfig(cfg.layers[: len(ref)]), ref)[path]
        sample = ptq._subsample(sample.reshape(-1), calibration.max_samples)
        ref[path] = jnp.asarray(activations.calibrate(
            sample, bits, method=calibration.method, signed=signed,
            percentile=calibration.percentile, pow2=calibration.pow2), jnp.float32)
    loop = ptq._steps_layer_by_layer(module, cfg, calibration, variables, [x])
    assert list(steps) == list(loop) == layers
    for p in layers:
        assert steps[p].dtype == jnp.float32 and float(steps[p]) == float(ref[p]) == float(loop[p]), p


def test_calibration_rejects_a_non_finite_sample(tiny):
    module, variables, images, _ = tiny
    bad = {**variables, "params": {**variables["params"], "bn_a": {
        **variables["params"]["bn_a"], "bias": variables["params"]["bn_a"]["bias"] * jnp.nan}}}
    with pytest.raises(ValueError, match="NaN or Inf"):
        calibrate_steps(module, bad, images, 8, ["conv_b"], "cifar")


def test_bias_correction_before_bn_reestimation_is_skipped_only_when_it_cannot_matter(tiny):
    """conv_a folds its shift into bn_a's running mean, which BN re-estimation (train-mode forward,
    batch statistics) never reads and then overwrites: skipping the correction changes nothing.
    conv_b has no BatchNorm after it (its bias would change): never skipped."""
    import types

    import jax

    from fgq_jax import ptq, repairs
    from fgq_jax.recipe import RepairSpec

    module, variables, images, _ = tiny
    spec = types.SimpleNamespace(module=module, input_shape=images.shape[1:])
    both = RepairSpec(bn_reestimate=True, bias_correct=True)
    assert ptq._bias_correction_overwritten(spec, variables, ["conv_a"], both)
    assert not ptq._bias_correction_overwritten(spec, variables, ["conv_a", "conv_b"], both)
    assert not ptq._bias_correction_overwritten(spec, variables, ["conv_a"], RepairSpec(bias_correct=True))
    fp = variables["params"]
    quant = {**variables, "params": {**fp, "conv_a": {"kernel": jnp.round(fp["conv_a"]["kernel"] * 8) / 8}}}
    corrected = repairs.bias_correction(module, quant, fp, images, "cifar", ["conv_a"])
    assert not jnp.array_equal(corrected["batch_stats"]["bn_a"]["mean"], quant["batch_stats"]["bn_a"]["mean"])
    a = repairs.reestimate_bn(module, corrected, images, "cifar")
    b = repairs.reestimate_bn(module, quant, images, "cifar")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert jnp.array_equal(x, y)


@pytest.mark.parametrize("recalibrate", [False, True])
def test_recalibrate_gives_each_later_repair_the_steps_of_the_network_it_acts_on(tiny, monkeypatch,
                                                                                 recalibrate):
    """Off: scale fitting, reconstruction and bias correction all run with the steps calibrated on
    the freshly ternarized network. On: reconstruction gets steps calibrated on the scale-fitted
    network, bias correction steps calibrated on the reconstructed one."""
    import types

    from fgq_jax import ptq, reconstruct, repairs
    from fgq_jax.recipe import QuantRecipe

    module, variables, images, _ = tiny
    # no FP first/last layer here: conv_a is ternary too, so fitting it moves conv_b's input
    spec = types.SimpleNamespace(module=module, first_layer="(none)", last_layer="(none)",
                                 dataset_family="cifar", input_shape=images.shape[1:])
    recipe = QuantRecipe.make(method="exact", group_size=4, act_bits=4, num_calib=37,
                              scale_fit=True, reconstruct=True, bias_correct=True,
                              recalibrate=recalibrate, num_repair=37, num_fit=37, num_recon=37,
                              recon_iters=20, recon_unit="layer", augment_repair_images=False)
    seen = {}

    def spy(name, real, steps_at, variables_at):
        def wrapper(*args, **kwargs):
            seen[name] = (dict(args[steps_at]), variables_at(args, kwargs))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(repairs, "fit_scales", spy("fit", repairs.fit_scales, 7, lambda a, k: None))
    monkeypatch.setattr(reconstruct, "reconstruct", spy("recon", reconstruct.reconstruct, 6,
                                                        lambda a, k: k["variables_q"]))
    monkeypatch.setattr(repairs, "bias_correction", spy("bias", repairs.bias_correction, 7,
                                                        lambda a, k: a[1]))
    ptq.quantize_model(spec, variables, recipe, images, images)

    def calibrated_on(v):
        return ptq.calibrate_steps(module, v, images, 4, ["conv_a", "conv_b", "fc"], "cifar",
                                   recipe.activations.calibration)[1]

    def same(a, b):
        return a.keys() == b.keys() and all(float(a[k]) == float(b[k]) for k in a)

    fresh_for_recon = calibrated_on(seen["recon"][1])
    fresh_for_bias = calibrated_on(seen["bias"][1])
    if recalibrate:
        assert same(seen["recon"][0], fresh_for_recon) and same(seen["bias"][0], fresh_for_bias)
        assert not same(seen["recon"][0], seen["fit"][0])  # so the check above can fail
    else:
        assert same(seen["recon"][0], seen["fit"][0]) and same(seen["bias"][0], seen["fit"][0])
        assert not same(seen["recon"][0], fresh_for_recon)


def test_a_shared_calibration_memo_saves_calibrations_and_changes_nothing(tiny, monkeypatch):
    """A plain point, then its repaired twin: with a memo, the twin's first calibration (the same
    ternarized network, images and settings) is taken from the plain point's; the quantized
    models are bit for bit those without the memo. Another group size misses the memo."""
    import types

    import jax

    from fgq_jax import ptq
    from fgq_jax.recipe import QuantRecipe

    module, variables, images, _ = tiny
    spec = types.SimpleNamespace(module=module, first_layer="conv_a", last_layer="fc",
                                 dataset_family="cifar", input_shape=images.shape[1:])
    plain = QuantRecipe.make(method="exact", group_size=4, act_bits=4, num_calib=37)
    repaired = plain.replace(bn_reestimate=True, augment_repair_images=False)
    calls = []
    real = ptq.calibrate_steps
    monkeypatch.setattr(ptq, "calibrate_steps", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(recipes, memo):
        calls.clear()
        out = [ptq.quantize_model(spec, variables, r, images, images, calibrations=memo) for r in recipes]
        return out, len(calls)

    recipes = [plain, repaired, plain.replace(group_size=2)]
    without, n_without = run(recipes, None)
    memo = {}
    with_memo, n_with = run(recipes, memo)
    assert (n_without, n_with, len(memo)) == (4, 3, 3)  # 1 + 2 + 1 calibrations; 1 taken from the memo
    for a, b in zip(without, with_memo):
        assert a.act_cfg == b.act_cfg
        for x, y in zip(jax.tree.leaves((a.variables, a.act_steps)), jax.tree.leaves((b.variables, b.act_steps))):
            assert jnp.array_equal(x, y)
    again, n_again = run(recipes, memo)  # everything calibrated before: no calibration at all
    assert n_again == 0
