"""fgq_jax.configfile: config files defining get_config(), and variants derived from them."""
from __future__ import annotations

import pytest

from fgq_jax.configfile import derived_config, load_get_config
from fgq_jax.sweep import SweepConfig

BASE = '''# python -m experiments.sweep --config base.py
from fgq_jax.sweep import SweepConfig


def get_config():
    return SweepConfig(name="base", model="resnet20", checkpoint="r20.th", group_sizes=(4, 64))
'''

VARIANT = '''# python -m experiments.sweep --config variant.py
from pathlib import Path

from fgq_jax.configfile import derived_config


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
    assert derived_config(tmp_path / "base.py", seed=3).seed == 3


def test_errors_name_the_file_or_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.py"):
        load_get_config(tmp_path / "absent.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="empty.py defines no get_config"):
        load_get_config(tmp_path / "empty.py")
    (tmp_path / "base.py").write_text(BASE)
    with pytest.raises(TypeError, match="no_such_field"):
        derived_config(tmp_path / "base.py", no_such_field=1)
