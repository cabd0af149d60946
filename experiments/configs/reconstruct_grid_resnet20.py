# nice -n 10 python -m experiments.sweep --config experiments/configs/reconstruct_grid_resnet20.py
"""reconstruct_resnet20.py (layer-wise reconstruction on 1,024 unlabeled augmented training images,
then BN re-estimation + bias correction) over the default grid of sweep_resnet20.py: every N from 2
to 128, per channel and per tensor, with 8-bit and 4-bit activations. The "before" curve is the
same recipe without reconstruction: the bn_reestimate+bias_correct rows of sweep_exact.csv. N = 1
(one scale per weight) is left out: it is FP weights up to their sign."""
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("reconstruct_resnet20.py"),
        name="reconstruct_grid",
        group_sizes=(2, 4, 8, 16, 32, 64, 128, "channel", "tensor"),
        act_bits=(8, 4),
        include_fp=False,
        repairs=(("bn_reestimate", "bias_correct", "reconstruct"),),
    )
