# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64_3ep.py
# (after its FP reference: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# finetune_resnet20_n64.py (exact FGQ, N=64, 8-bit activations, first/last FP, STE) with the issue's
# full budget of 3 epochs, compared with the FP model fine-tuned for the same 3 epochs.
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_n64", Path(__file__).with_name("finetune_resnet20_n64.py"))
_n64 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_n64)


def get_config():
    return _n64.variant(name="resnet20_n64_3ep", epochs=3, fp_reference="resnet20_fp_3ep")
