# python -m experiments.sweep --config experiments/configs/n4_a8_resnet20.py
"""One point, end to end: the published ResNet-20 (PyTorch .th, converted on the fly), exact FGQ
ternary weights with groups of N=4, 8-bit activations, first/last layer FP, evaluated on the full
CIFAR-10-JPEG test split through the tfds builder. Add repairs=(("bn_reestimate", "bias_correct",
"scale_fit"),) for the label-free repairs."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="n4_a8",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        group_sizes=(4,),
        act_bits=(8,),
        methods=("exact",),
        repairs=((),),
        include_fp=False,
    )
