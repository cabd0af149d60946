# nice -n 10 python -m experiments.sweep --config experiments/configs/reconstruct_squeezenet.py
"""Label-free layer-wise reconstruction (fgq_jax.reconstruct, recon_unit="layer") on SqueezeNet 1.1,
ImageNet val1300: exact FGQ at N = 4, 16, 64 with 8-bit activations, first and last layer FP, the
recipe of sweep_squeezenet.py (scale fitting + bias correction, calibrated on calib1000) with
reconstruction between them. The reconstruction sees the first 500 unlabeled calib1000 images, the
ones the other repairs see (a multiple of ten: label-free passes batch 227x227 images ten at a
time). The baselines (same recipe without reconstruction) are the a8 rows of sweep_exact.csv.

Two repair sets: as the other sweeps (every repair with the activation steps calibrated on the
freshly ternarized network, which at N=4 is at 3 % top-1), and with `recalibrate` (the steps
recalibrated after scale fitting and after reconstruction, so each repair sees the activation
quantization of the network it acts on)."""
from pathlib import Path

from fgq_jax.configfile import load_get_config, replace_config


def get_config():
    base = load_get_config(Path(__file__).with_name("sweep_squeezenet.py"))
    return replace_config(
        base,
        name="reconstruct",
        group_sizes=(4, 16, 64),
        act_bits=(8,),
        include_fp=False,
        repairs=(("scale_fit", "bias_correct", "reconstruct"),
                 ("scale_fit", "bias_correct", "reconstruct", "recalibrate")),
        recipe=base.recipe.replace(num_recon=500, recon_iters=500, recon_unit="layer"),
    )
