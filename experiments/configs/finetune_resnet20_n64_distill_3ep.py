# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64_distill_3ep.py
# (after the teacher: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# finetune_resnet20_n64_distill.py with the full budget of 3 epochs: N=64 exact FGQ, 8-bit
# activations, distilled from the FP ResNet-20 fine-tuned for the same 3 epochs (frozen teacher).
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_n64_distill.py"),
        name="resnet20_n64_distill_3ep",
        epochs=3,
        fp_reference="resnet20_fp_3ep",
        teacher_checkpoint="runs/finetune_resnet20_fp_3ep/export/variables",
    )
