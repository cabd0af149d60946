# nice -n 10 python -m experiments.sweep --config experiments/configs/reconstruct_resnet20.py
"""Label-free block reconstruction (fgq_jax.reconstruct, issue 12) on the published ResNet-20: exact
FGQ at large groups (N = 16, 64) with 8-bit activations, first/last layer FP; the cheap repairs
(BN re-estimation + bias correction) alone and with block reconstruction before them (1,024
unlabeled augmented training images, 200 Adam steps of 32 images per basic block, QDrop p = 0.5).
A reduced grid: on the shared 2-core machine each reconstructed point costs minutes of CPU."""
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
        recipe=QuantRecipe.make(num_recon=1024, recon_iters=200, recon_batch=32, recon_qdrop=0.5),
    )
