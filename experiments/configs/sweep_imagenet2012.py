# python -m experiments.sweep --config experiments/configs/sweep_imagenet2012.py
#   (ResNet-101: --set model=resnet101 --set checkpoint=checkpoints/resnet101-63fe2227.pth;
#    AlexNet:    --set model=alexnet --set checkpoint=checkpoints/alexnet-owt-7be5be79.pth)
"""The paper's setting, for users who have ImageNet: a torchvision ResNet-50 (or ResNet-101, AlexNet)
on the full ILSVRC2012 validation set (50,000 images, resize 256 + centre crop 224, Pillow), exact
FGQ over N x activations {FP, 8, 4}, first and last layer FP, plain and with the label-free repairs
(BN re-estimation + bias correction; + least-squares scale fitting). Calibration and repairs draw
unlabeled images from the first 5,000 of tfds' (shuffled) train split.

Needs: tfds imagenet2012 prepared from the official tarballs, ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar, placed in the tfds manual dir $FGQ_DATA_DIR/downloads/manual (default
.cache/tfds/downloads/manual); the first run prepares the dataset (hours: tfds reads the whole
train tar). Weights: torchvision's files, e.g.
https://download.pytorch.org/models/resnet50-0676ba61.pth (ImageNet top-1 76.13 %),
resnet101-63fe2227.pth (77.37 %), alexnet-owt-7be5be79.pth (56.52 %), put in checkpoints/ (the
sha256 prefix in the file name is checked). CI runs this config on a fake manual dir in the official
layout (tests/test_sweep.py)."""
from fgq_jax.sweep import SweepConfig


def get_config() -> SweepConfig:
    return SweepConfig(
        name="sweep_exact",
        model="resnet50",
        checkpoint="checkpoints/resnet50-0676ba61.pth",
        dataset="imagenet2012",
        group_sizes=(1, 2, 4, 8, 16, 32, 64, "channel", "tensor"),
        act_bits=(None, 8, 4),
        methods=("exact",),
        first_last=("fp",),
        repairs=((), ("bn_reestimate", "bias_correct"), ("scale_fit", "bn_reestimate", "bias_correct")),
        recipe=dict(num_calib=250, num_repair=1000, num_fit=250, augment_repair_images=False),
        test_split="validation",
        calib_split="train[:5000]",
        batch_size=100,
    )
