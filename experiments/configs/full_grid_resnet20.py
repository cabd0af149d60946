# python -m experiments.sweep --config experiments/configs/full_grid_resnet20.py
"""The full grid of issue 4 on ResNet-20: every method x every N x FP/8/4/2-bit activations x
first/last FP or 8-bit x no repair / all repairs. Hours on 2 CPU cores; meant for a GPU or several
workers (--worker i --num-workers k)."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="full_grid",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        group_sizes=(1, 2, 4, 8, 16, 32, 64, 128, "channel", "tensor"),
        act_bits=(None, 8, 4, 2),
        methods=("exact", "exact+asym", "twn", "absmean", "binary"),
        first_last=("fp", "8"),
        repairs=((), ("bn_reestimate", "bias_correct", "scale_fit")),
    )
