# python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp.py
#
# Full-precision fine-tuning of the published ResNet-20 (akamaster) on CIFAR-10-JPEG train, with the
# same recipe and budget as the quantized runs: the second FP reference (`fp_top1` of the quantized
# runs' rows) and the teacher of finetune_resnet20_n64_distill.py (its export/variables). Run it first.
from fgq_jax.recipe import QuantRecipe
from fgq_jax.train import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="resnet20_fp",
        model="resnet20",
        dataset="cifar10_jpeg",
        init_checkpoint="{shared}/models/cifar-resnet/resnet20-12fca82f.th",
        recipe=QuantRecipe.make(method="fp", act_bits=None),  # nothing quantized, no repair
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
    )
