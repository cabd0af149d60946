# python -m experiments.sweep --config experiments/configs/squeezenet_repairs.py
"""SqueezeNet 1.1 on ImageNet val1300, 8-bit activations, N in {4, 16, 64}: which label-free repair
does what on a network without BatchNorm. Bias correction alone (the shift folded into the conv
biases), data-free cross-layer equalization (Nagel et al. 2019, fgq_jax.equalize) before
ternarization with bias correction, and equalization + scale fitting + bias correction. The plain
and scale-fit + bias-correct points of the same grid are in sweep_squeezenet.py (same budgets)."""
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("sweep_squeezenet.py"),
        name="repairs",
        group_sizes=(4, 16, 64),
        act_bits=(8,),
        repairs=(("bias_correct",), ("equalize", "bias_correct"), ("equalize", "scale_fit", "bias_correct")),
        include_fp=False,
    )
