# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64_distill.py
# (after the teacher: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp.py)
#
# As finetune_resnet20_n64.py, with teacher-student distillation: loss = 0.5 * CE(labels)
# + 0.5 * T^2 * KL(teacher || student), T = 4, the teacher being the frozen FP ResNet-20 fine-tuned on
# CIFAR-10-JPEG by finetune_resnet20_fp.py (its runs/finetune_resnet20_fp/export/variables). To use the
# published FP weights as teacher instead: --set teacher_checkpoint=None (falls back to init_checkpoint).
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_n64", Path(__file__).with_name("finetune_resnet20_n64.py"))
_n64 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_n64)


def get_config():
    return _n64.variant(
        name="resnet20_n64_distill",
        distill=True,
        distill_alpha=0.5,
        distill_temperature=4.0,
        teacher_checkpoint="runs/finetune_resnet20_fp/export/variables",
    )
