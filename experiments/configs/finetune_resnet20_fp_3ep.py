# python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py
#
# finetune_resnet20_fp.py with the full budget of 3 epochs (1.6 % of the original 182-epoch
# schedule): the FP reference (fp_top1) of finetune_resnet20_n64_3ep.py. Run it first.
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_fp.py"),
        name="resnet20_fp_3ep",
        epochs=3,
    )
