# python -m experiments.sweep --config experiments/configs/sweep_squeezenet.py
"""SqueezeNet 1.1 (the published ImageNet model, torchvision layout) on ImageNet val1300: exact FGQ
over N in {1..64, channel, tensor} x activations {FP, 8, 4}, first and last layer in full precision,
plain and with the label-free repairs that apply to a network without BatchNorm (least-squares scale
fitting + bias correction folded into the conv biases; there is nothing for BN re-estimation to
re-estimate). Calibration and repairs see only the unlabeled `calib1000` images (one per class, not
from the validation set); evaluation is the 1,300 labelled validation images as published (227x227).
The repair ablation (bias correction alone, cross-layer equalization) is squeezenet_repairs.py, the
other ternary methods methods_squeezenet.py.

Image budgets are multiples of 10: label-free passes batch 227x227 images ten at a time
(fgq_jax.data.pixel_batch_size), so every batch has one shape and one compiled program."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="sweep_exact",
        model="squeezenet1_1",
        checkpoint="{shared}/models/imagenet-squeezenet/squeezenet1_1-5d96dd9a.pth",
        dataset="imagenet_subset",
        group_sizes=(1, 2, 4, 8, 16, 32, 64, "channel", "tensor"),
        act_bits=(None, 8, 4),
        methods=("exact",),
        first_last=("fp",),
        repairs=((), ("scale_fit", "bias_correct")),
        recipe=dict(num_calib=100, num_repair=500, num_fit=100, augment_repair_images=False),
        test_split="val1300",
        calib_split="calib1000",
        batch_size=50,
    )
