# python -m experiments.sweep --config experiments/configs/sweep_resnet56.py
"""Published ResNet-56 on CIFAR-10-JPEG: the default grid of sweep_resnet20.py (exact FGQ over every N,
FP / 8 / 4-bit activations, first/last layer FP, without and with BN re-estimation + bias correction).
ResNet-56 evaluates ~3x slower than ResNet-20, so this takes about an hour on 2 CPU cores; it is
resumable (finished points are skipped)."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="sweep_exact",
        model="resnet56",
        checkpoint="{shared}/models/cifar-resnet/resnet56-4bfd9763.th",
        dataset="cifar10_jpeg",
        group_sizes=(1, 2, 4, 8, 16, 32, 64, 128, "channel", "tensor"),
        act_bits=(None, 8, 4),
        methods=("exact",),
        first_last=("fp",),
        repairs=((), ("bn_reestimate", "bias_correct")),
    )
