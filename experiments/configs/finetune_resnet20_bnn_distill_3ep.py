# python -m experiments.finetune --config experiments/configs/finetune_resnet20_bnn_distill_3ep.py
# (after the teacher: python -m experiments.finetune --config experiments/configs/finetune_resnet20_fp_3ep.py)
#
# finetune_resnet20_n64_distill_3ep.py (3 epochs; loss = 0.5 * CE(labels) + 0.5 * T^2 *
# KL(teacher || student), T = 4, the frozen teacher being the FP ResNet-20 fine-tuned for the same
# 3 epochs, runs/finetune_resnet20_fp_3ep/export/variables) with the quantization recipe of
# finetune_resnet20_bnn_3ep.py: binary weights with per-output-channel scales, 1-bit activations,
# first/last layer FP. Only the recipe differs from the ternary distilled run.
from pathlib import Path

from fgq_jax.configfile import derived_config, load_get_config


def get_config():
    here = Path(__file__).parent
    return derived_config(
        here / "finetune_resnet20_n64_distill_3ep.py",
        name="resnet20_bnn_distill_3ep",
        recipe=load_get_config(here / "finetune_resnet20_bnn_3ep.py").recipe,
    )
