# python -m experiments.sweep --config experiments/configs/repairs_plain_images_resnet20.py
"""Ablation: the label-free repairs with plain (not augmented) unlabeled images, at the
issue's target point (N=4, 8-bit activations) and N=64. Shows why the repairs augment their images."""
from fgq_jax.recipe import QuantRecipe
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="repairs_plain_images",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        group_sizes=(4, 64),
        act_bits=(8,),
        methods=("exact",),
        first_last=("fp",),
        repairs=(("bn_reestimate",), ("bn_reestimate", "bias_correct", "scale_fit")),
        recipe=QuantRecipe.make(augment_repair_images=False),
    )
