# python -m experiments.sweep --config experiments/configs/methods_resnet20.py
"""Every ternary method (and binary) on the published ResNet-20 at N in {4, 64} with 8-bit
activations, first/last FP; plain and with all three label-free repairs; each
point also with its scales rounded to the integer path's int8 multipliers (top1_rounded_multipliers)."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="methods",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        group_sizes=(4, 64),
        act_bits=(8,),
        methods=("exact", "exact+asym", "twn", "absmean", "binary"),
        first_last=("fp",),
        repairs=((), ("bn_reestimate", "bias_correct", "scale_fit")),
        integer_rounding=True,
    )
