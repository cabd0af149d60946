# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n4.py
#
# As finetune_resnet20_n64.py with groups of N=4 (finer scales, about 75 % of the multiplications of
# the quantized layers eliminated): the comparison point.
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_n64", Path(__file__).with_name("finetune_resnet20_n64.py"))
_n64 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_n64)


def get_config():
    return _n64.variant(name="resnet20_n4", group_size=4)
