# nice -n 10 python -m experiments.sweep --config experiments/configs/reconstruct_resnet20.py
"""Label-free reconstruction (fgq_jax.reconstruct, issue 12) on the published ResNet-20: exact FGQ at
large groups (N = 64, 16) with 8-bit activations, first/last layer FP; the cheap repairs (BN
re-estimation + bias correction) alone and with reconstruction before them. Layer-wise units
(recon_unit="layer": each ternary layer's exact output-error quadratic form over 1,024 unlabeled
augmented training images, 500 full-batch Adam steps), the variant this shared 2-core machine can
afford; reconstruct_block_resnet20.py runs the block-wise (BRECQ/QDrop) variant at N = 64."""
from fgq_jax.recipe import QuantRecipe
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="reconstruct",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        group_sizes=(64, 16),
        act_bits=(8,),
        methods=("exact",),
        first_last=("fp",),
        repairs=(("bn_reestimate", "bias_correct"), ("bn_reestimate", "bias_correct", "reconstruct")),
        recipe=QuantRecipe.make(num_recon=1024, recon_iters=500, recon_unit="layer"),
    )
