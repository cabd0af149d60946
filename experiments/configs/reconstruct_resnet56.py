# nice -n 10 python -m experiments.sweep --config experiments/configs/reconstruct_resnet56.py
"""reconstruct_resnet20.py (layer-wise reconstruction) on the published ResNet-56 at N = 64 only,
and only the reconstructed point: its baseline (same recipe without reconstruction, 73.91 %) and
the FP reference are rows of resnet56/sweep_exact.csv (sweep_resnet56.py); a ResNet-56 evaluation
takes ~20 minutes on the shared machine."""
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("reconstruct_resnet20.py"),
        model="resnet56",
        checkpoint="{shared}/models/cifar-resnet/resnet56-4bfd9763.th",
        group_sizes=(64,),
        include_fp=False,
        repairs=(("bn_reestimate", "bias_correct", "reconstruct"),),
    )
