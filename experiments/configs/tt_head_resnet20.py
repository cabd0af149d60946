# python -m experiments.tt_head --config experiments/configs/tt_head_resnet20.py
"""TT-layer heads (Novikov et al. 2015) on the frozen published ResNet-20's pre-pool features
(64x8x8 = 4,096): a 4096 -> 1024 -> 10 FP head, then fc1 as a TT layer (modes 8x8x8x8 -> 4x8x8x4)
at ranks 1, 2, 4, 8 from TT-SVD + a short fine-tune (and, as a control, from a random init), and with
FGQ-ternary cores (N = 4, 16; post-training and after a straight-through fine-tune). The dense fc1
ternarized post-training is the reference. Rank 16 is left out for time: its TT forward costs more
MACs than the dense layer (8.8 M vs 4.2 M per image) and its fine-tunes took most of a trial run."""
from fgq_jax.tt_head import TTHeadConfig


def get_config() -> TTHeadConfig:
    return TTHeadConfig(
        name="tt_head",
        model="resnet20",
        checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        dataset="cifar10_jpeg",
        feature_layer="stage3_block2",
        hidden=1024,
        in_modes=(8, 8, 8, 8),
        out_modes=(4, 8, 8, 4),
        ranks=(1, 2, 4, 8),
        group_sizes=(4, 16),
        method="exact",
        fp_epochs=3,
        tt_epochs=2,
        ste_epochs=1,
        dense_ste=False,
        scratch_control=True,
        batch_size=256,
        lr=1e-3,
        tt_lr=1e-3,
        weight_decay=1e-4,
        seed=0,
    )
