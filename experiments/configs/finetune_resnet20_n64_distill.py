# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64_distill.py
# (after the teacher: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp.py)
#
# As finetune_resnet20_n64.py, with teacher-student distillation: loss = 0.5 * CE(labels)
# + 0.5 * T^2 * KL(teacher || student), T = 4, the teacher being the frozen FP ResNet-20 fine-tuned on
# CIFAR-10-JPEG by finetune_resnet20_fp.py (its runs/finetune_resnet20_fp/export/variables). To use the
# published FP weights as teacher instead: --set teacher_checkpoint=None (falls back to init_checkpoint).
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_n64.py"),
        name="resnet20_n64_distill",
        distill=True,
        distill_alpha=0.5,
        distill_temperature=4.0,
        teacher_checkpoint="runs/finetune_resnet20_fp/export/variables",
    )
