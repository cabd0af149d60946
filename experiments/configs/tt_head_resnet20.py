# python -m experiments.tt_head --config experiments/configs/tt_head_resnet20.py
"""TT-layer heads (Novikov et al. 2015) on the frozen published ResNet-20's pre-pool features
(64x8x8 = 4,096): a 4096 -> 1024 -> 10 FP head, then fc1 as a TT layer (modes 8x8x8x8 -> 4x8x8x4)
at ranks 1, 2, 4, 8, initialised by TT-SVD of the trained fc1 and fine-tuned briefly, and, as a
control, trained as long from a random init; both with FGQ-ternary cores (N = 4, 16) post-training,
and the random-init ones also after a straight-through fine-tune (ste_from): in a trial run the
TT-SVD init was the worse start at low ranks (training moved fc1 by only 37% of its norm away from
its random init, fc1_update_rel_norm in the JSON, and TT-SVD cannot compress the random part:
relative error 0.98 even at rank 8). The dense fc1 ternarized
post-training is the reference. Rank 16 is left out for time: its TT forward costs more MACs than
the dense layer (8.8 M vs 4.2 M per image) and its fine-tunes took most of a trial run."""
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
        random_init=True,
        ste_from=("random",),
        batch_size=256,
        lr=1e-3,
        tt_lr=1e-3,
        weight_decay=1e-4,
        seed=0,
    )
