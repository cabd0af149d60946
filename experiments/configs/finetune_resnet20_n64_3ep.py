# python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64_3ep.py
# (after its FP reference: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# finetune_resnet20_n64.py (exact FGQ, N=64, 8-bit activations, first/last FP, STE) with the issue's
# full budget of 3 epochs, compared with the FP model fine-tuned for the same 3 epochs.
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("finetune_resnet20_n64.py"),
        name="resnet20_n64_3ep",
        epochs=3,
        fp_reference="resnet20_fp_3ep",
    )
