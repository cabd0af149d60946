# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n4.py
#
# As finetune_resnet20_n64.py with groups of N=4 (finer scales, about 75 % of the multiplications of
# the quantized layers eliminated): the comparison point.
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_n64.py"),
        name="resnet20_n4",
        group_size=4,
    )
