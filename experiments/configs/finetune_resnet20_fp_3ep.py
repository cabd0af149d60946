# python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py
#
# finetune_resnet20_fp.py with the full budget of 3 epochs (1.6 % of the original 182-epoch
# schedule): the FP reference (fp_top1) of finetune_resnet20_n64_3ep.py. Run it first.
import dataclasses
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_fp", Path(__file__).with_name("finetune_resnet20_fp.py"))
_fp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fp)


def get_config():
    return dataclasses.replace(_fp.get_config(), name="resnet20_fp_3ep", epochs=3)
