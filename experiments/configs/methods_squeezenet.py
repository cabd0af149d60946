# python -m experiments.sweep --config experiments/configs/methods_squeezenet.py
"""SqueezeNet 1.1 on ImageNet val1300, 8-bit activations, N in {4, 16, 64}: the other ternary
methods (asymmetric two-scale exact, TWN's 0.7 mean|w| threshold, absmean, binary codes), plain and
with scale fitting + bias correction; exact FGQ at the same points is in sweep_squeezenet.py."""
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("sweep_squeezenet.py"),
        name="methods",
        group_sizes=(4, 16, 64),
        act_bits=(8,),
        methods=("exact+asym", "twn", "absmean", "binary"),
        include_fp=False,
    )
