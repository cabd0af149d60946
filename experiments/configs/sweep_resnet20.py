# python -m experiments.sweep --config experiments/configs/sweep_resnet20.py   (= make sweep)
"""Default experiment: published ResNet-20 on CIFAR-10-JPEG, exact FGQ over the whole N grid with
FP / 8 / 4-bit activations, first and last layer in full precision, without and with the cheap label-free
repairs (BN re-estimation on augmented unlabeled training images + bias correction). Scale fitting,
the costlier third repair, is in methods_resnet20.py. sweep_resnet56.py runs this grid on ResNet-56."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="sweep_exact",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        group_sizes=(1, 2, 4, 8, 16, 32, 64, 128, "channel", "tensor"),
        act_bits=(None, 8, 4),
        methods=("exact",),
        first_last=("fp",),
        repairs=((), ("bn_reestimate", "bias_correct")),
    )
