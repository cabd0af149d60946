"""Tests of fgq_jax.evaluate: top-1/top-5 against numpy, compile-once. Round robin over devices:
tests/test_distributed.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax.activations import Calibration
from fgq_jax.data import normalize
from fgq_jax.evaluate import Evaluator
from fgq_jax.ptq import calibrate_steps


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


def test_mesh_and_devices_are_exclusive(tiny):
    module = tiny[0]
    with pytest.raises(ValueError, match="mesh or devices"):
        Evaluator(module, "cifar", mesh=object(), devices=jax.devices())
