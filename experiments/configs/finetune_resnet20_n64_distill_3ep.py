# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64_distill_3ep.py
# (after the teacher: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# finetune_resnet20_n64_distill.py with the full budget of 3 epochs: N=64 exact FGQ, 8-bit
# activations, distilled from the FP ResNet-20 fine-tuned for the same 3 epochs (frozen teacher).
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_n64", Path(__file__).with_name("finetune_resnet20_n64.py"))
_n64 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_n64)


def get_config():
    return _n64.variant(
        name="resnet20_n64_distill_3ep",
        epochs=3,
        fp_reference="resnet20_fp_3ep",
        distill=True,
        distill_alpha=0.5,
        distill_temperature=4.0,
        teacher_checkpoint="runs/finetune_resnet20_fp_3ep/export/variables",
    )
