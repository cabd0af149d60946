# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py
#
# ResNet-20, exact FGQ ternary weights with groups of N=64 (about 98 % of the multiplications of the
# quantized layers eliminated), 8-bit activations at the inputs of the ternary layers, first conv and
# last dense in FP; STE fine-tuning from the published weights on CIFAR-10-JPEG train for 1 epoch
# (0.55 % of the original 182 x 50,000-image schedule; finetune_resnet20_n64_3ep.py runs the
# issue's full budget of 3 epochs). fp_top1 comes from
# finetune_resnet20_fp.py (run it first for that column). Resume an interrupted run with --resume.
from fgq_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="resnet20_n64",
        model="resnet20",
        dataset="cifar10_jpeg",
        init_checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        quantize=True,
        method="exact",
        group_size=64,
        first_last="fp",
        act_bits=8,
        act_calibration="mse",
        calib_images=256,
        bn_reestimate=True,
        bn_images=1024,
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=0.1,
        epochs=1,
        batch_size=128,
        seed=0,
        fp_reference="resnet20_fp",
    )
