"""Tests of fgq_jax.recipe: one validated value per quantized model, and its row spelling."""
import dataclasses
import json

import pytest

from fgq_jax import fileio
from fgq_jax.activations import Calibration
from fgq_jax.configfile import load_config
from fgq_jax.recipe import KEY_COLUMNS, REPAIRS, QuantRecipe, WeightSpec
from fgq_jax.fileio import REPO_ROOT


def test_flat_construction_and_parts():
    r = QuantRecipe.make(method="exact", group_size=64, act_bits=4, bn_reestimate=True, num_fit=128)
    assert r.weights == WeightSpec("exact", 64)
    assert r.activations.bits == 4 and r.repairs.bn_reestimate and r.repairs.num_fit == 128
    assert r.repairs.names == ("bn_reestimate",)
    assert QuantRecipe.make(group_size="tensor").weights.group_size is None
    assert QuantRecipe.make(grouping="kernel").weights.group_size is None
    assert r.flat()["group_size"] == 64 and QuantRecipe.make(**r.flat()) == r
    hash(r)  # frozen and hashable (a static argument)


@pytest.mark.parametrize("flat, match", [
    (dict(act_bits=0), "act_bits"), (dict(act_bits=17), "act_bits"), (dict(act_bits=True), "act_bits"),
    (dict(group_size=0), "group_size"), (dict(group_size=2.0), "group_size"),
    (dict(method="nope"), "method"), (dict(grouping="rows"), "grouping"),
    (dict(first_last="16"), "first_last"), (dict(bias_correct="yes"), "bias_correct"),
    (dict(num_fit=0), "num_fit"), (dict(method="fp", scale_fit=True), "method 'fp'"),
    (dict(calibration=dict(method="max", percentile=101)), "percentile"),
    (dict(act_bits=8, calibration=dict(method="mean")), "act_bits=1 only"),
])
def test_invalid_settings_are_refused_at_construction(flat, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantRecipe.make(**flat)


def test_binary_activations_are_accepted():
    r = QuantRecipe.make(method="binary", group_size="channel", act_bits=1, calibration=dict(method="mean"))
    assert r.activations.bits == 1 and r.activations.calibration.method == "mean"
    assert r.key()["act_bits"] == 1 and QuantRecipe.from_key(r.key(), base=r) == r
    assert r.describe() == "binary N=channel a1 fl=fp no-repair"


def test_misspelled_field_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'group_size'"):
        QuantRecipe.make(groupsize=4)
    with pytest.raises(ValueError, match="did you mean 'act_bits'"):
        QuantRecipe().replace(actbits=4)


def test_key_spelling_and_round_trip():
    r = QuantRecipe.make(method="exact", asymmetric=True, group_size=None, act_bits=None,
                         first_last="8", scale_fit=True)
    assert r.key() == dict(method="exact+asym", group_size="tensor", act_bits="fp", first_last="8",
                           bn_reestimate=False, bias_correct=False, scale_fit=True, equalize=False,
                           reconstruct=False, recalibrate=False)
    assert set(r.key()) == set(KEY_COLUMNS)
    assert QuantRecipe.from_key(r.key()) == r
    csv_spelled = {k: fileio.format_value(v) for k, v in r.key().items()}  # as read back from a CSV
    assert QuantRecipe.from_key(csv_spelled) == r
    fp = QuantRecipe.make(method="fp", act_bits=8, bn_reestimate=True)
    assert fp.key()["group_size"] == "fp" and QuantRecipe.from_key(fp.key()) == fp
    base = QuantRecipe.make(num_calib=32, seed=3)
    assert QuantRecipe.from_key(r.key(), base).activations.num_calib == 32


def test_to_dict_round_trip_through_json():
    r = QuantRecipe.make(method="twn", group_size="channel", act_bits=8,
                         calibration=Calibration("percentile", 99.9), augment_repair_images=False)
    assert QuantRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("config, csv", [
    ("sweep_resnet20.py", "cifar10_jpeg/resnet20/sweep_exact.csv"),
    ("methods_resnet20.py", "cifar10_jpeg/resnet20/methods.csv"),
    ("repairs_plain_images_resnet20.py", "cifar10_jpeg/resnet20/repairs_plain_images.csv"),
    ("sweep_resnet56.py", "cifar10_jpeg/resnet56/sweep_exact.csv"),
    ("reconstruct_resnet20.py", "cifar10_jpeg/resnet20/reconstruct.csv"),
    ("reconstruct_grid_resnet20.py", "cifar10_jpeg/resnet20/reconstruct_grid.csv"),
    ("reconstruct_block_resnet20.py", "cifar10_jpeg/resnet20/reconstruct_block.csv"),
    ("reconstruct_resnet56.py", "cifar10_jpeg/resnet56/reconstruct.csv"),
    ("reconstruct_squeezenet.py", "imagenet_subset/squeezenet1_1/reconstruct.csv"),
    ("sweep_squeezenet.py", "imagenet_subset/squeezenet1_1/sweep_exact.csv"),
    ("squeezenet_repairs.py", "imagenet_subset/squeezenet1_1/repairs.csv"),
    ("methods_squeezenet.py", "imagenet_subset/squeezenet1_1/methods.csv"),
])
def test_committed_rows_parse_to_the_configs_recipes(config, csv):
    """Every committed results row is the key of exactly one recipe of its config, and back. A
    repair column that an older file lacks reads as false (see fgq_jax.recipe.KEY_COLUMNS)."""
    cfg = load_config(REPO_ROOT / "experiments" / "configs" / config)
    rows = fileio.read_csv(REPO_ROOT / "results" / csv)
    recipes = {QuantRecipe.from_key(r, cfg.recipe) for r in rows}
    assert recipes == set(cfg.points()) and len(rows) == len(recipes)
    for r in rows:
        key = QuantRecipe.from_key(r, cfg.recipe).key()
        # a repair column added after the row was written (absent or empty) reads as false
        cells = {k: r.get(k) or ("false" if k in REPAIRS else r.get(k)) for k in KEY_COLUMNS}
        assert {k: fileio.format_value(v) for k, v in key.items()} == cells
    assert not dataclasses.is_dataclass(cfg) or cfg.recipe.seed == 0
