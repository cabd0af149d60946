# nice -n 10 python -m experiments.sweep --config experiments/configs/reconstruct_block_resnet20.py
"""Block-wise reconstruction (recon_unit="block": each ResNet basic block against the FP block, QDrop
p = 0.5, minibatches of 32 of 1,024 unlabeled augmented training images) on the published ResNet-20
at N = 64, 8-bit activations, before BN re-estimation + bias correction. Only 150 Adam steps per
block: on the shared 2-core machine a step costs ~1 s. The baseline rows are in reconstruct.csv."""
from pathlib import Path

from fgq_jax.configfile import derived_config
from fgq_jax.recipe import QuantRecipe


def get_config():
    return derived_config(
        Path(__file__).with_name("reconstruct_resnet20.py"),
        name="reconstruct_block",
        group_sizes=(64,),
        include_fp=False,
        repairs=(("bn_reestimate", "bias_correct", "reconstruct"),),
        recipe=QuantRecipe.make(num_recon=1024, recon_iters=150, recon_batch=32, recon_qdrop=0.5,
                                recon_unit="block"),
    )
