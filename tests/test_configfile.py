"""fgq_jax.configfile: config files defining get_config(), and variants derived from them."""
from __future__ import annotations

import pytest

from fgq_jax.configfile import load_config, derived_config, load_get_config
from fgq_jax.sweep import SweepConfig

BASE = '''# python -m experiments.sweep --config base.py
from fgq_jax.sweep import SweepConfig


def get_config():
    return SweepConfig(name="base", model="resnet20", checkpoint="r20.th", group_sizes=(4, 64))
'''

VARIANT = '''# python -m experiments.sweep --config variant.py
from pathlib import Path

from fgq_jax.configfile import load_config, derived_config


def get_config():
    return derived_config(Path(__file__).with_name("base.py"), name="variant", group_sizes=(8,))
'''


def test_load_and_derive(tmp_path):
    (tmp_path / "base.py").write_text(BASE)
    (tmp_path / "variant.py").write_text(VARIANT)
    base = load_get_config(tmp_path / "base.py")
    assert isinstance(base, SweepConfig) and base.group_sizes == (4, 64)
    variant = load_get_config(tmp_path / "variant.py")
    assert (variant.name, variant.group_sizes, variant.model) == ("variant", (8,), "resnet20")
    assert derived_config(tmp_path / "base.py", seed=3).recipe.seed == 3  # a recipe setting
    cfg = load_config(tmp_path / "base.py", ["group_sizes=(16,)", "act_bits=(4,)", "num_fit=64"])
    assert (cfg.group_sizes, cfg.act_bits, cfg.recipe.repairs.num_fit) == ((16,), (4,), 64)
    assert {p.activations.bits for p in cfg.points()} == {4}


def test_errors_name_the_file_or_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.py"):
        load_get_config(tmp_path / "absent.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="empty.py defines no get_config"):
        load_get_config(tmp_path / "empty.py")
    (tmp_path / "base.py").write_text(BASE)
    with pytest.raises(ValueError, match="no_such_field"):
        derived_config(tmp_path / "base.py", no_such_field=1)
    with pytest.raises(ValueError, match="did you mean 'group_sizes'"):
        load_config(tmp_path / "base.py", ["group_size=(4,)x", "groupsizes=(4,)"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(tmp_path / "base.py", ["group_sizes"])


def test_misspelled_field_in_a_config_file_names_it(tmp_path):
    (tmp_path / "typo.py").write_text(BASE.replace("group_sizes=", "group_size="))
    with pytest.raises(ValueError, match=r"typo.py: unknown SweepConfig field\(s\): 'group_size' \(did you mean 'group_sizes'\?\)"):
        load_get_config(tmp_path / "typo.py")
