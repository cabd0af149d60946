# python -m experiments.sweep --config experiments/configs/sweep_resnet56.py
"""Published ResNet-56 on CIFAR-10-JPEG: exact FGQ with 8-bit activations, first/last FP, without
and with BN re-estimation + bias correction, at N in {4, 64}. A reduced grid: ResNet-56 evaluates
~3x slower than ResNet-20 and this one was run on a shared 2-core CPU. Widen group_sizes / act_bits
to the default grid (sweep_resnet20.py) and run again: finished points are skipped."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="sweep_exact",
        model="resnet56",
        checkpoint="{shared}/models/cifar-resnet/resnet56-4bfd9763.th",
        dataset="cifar10_jpeg",
        group_sizes=(4, 64),
        act_bits=(8,),
        methods=("exact",),
        first_last=("fp",),
        repairs=((), ("bn_reestimate", "bias_correct")),
    )
