# python -m experiments.finetune --config experiments/configs/finetune_resnet20_bnn_distill_3ep.py
# (after the teacher: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# finetune_resnet20_bnn_3ep.py (binary weights with per-output-channel scales, 1-bit activations,
# first/last FP, 3 epochs) with the distillation of finetune_resnet20_n64_distill_3ep.py:
# loss = 0.5 * CE(labels) + 0.5 * T^2 * KL(teacher || student), T = 4, the frozen teacher being the
# FP ResNet-20 fine-tuned for the same 3 epochs (runs/finetune_resnet20_fp_3ep/export/variables).
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_bnn_3ep.py"),
        name="resnet20_bnn_distill_3ep",
        distill=True,
        distill_alpha=0.5,
        distill_temperature=4.0,
        teacher_checkpoint="runs/finetune_resnet20_fp_3ep/export/variables",
    )
