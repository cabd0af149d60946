# python -m experiments.sweep --config experiments/configs/sweep_resnet56.py
"""Published ResNet-56 on CIFAR-10-JPEG over the default grid of sweep_resnet20.py (exact FGQ over
every N, FP / 8 / 4-bit activations, first/last layer FP, without and with BN re-estimation + bias
correction). ResNet-56 evaluates ~3x slower than ResNet-20, so this takes about half an hour on 2 CPU
cores; it is resumable (finished points are skipped)."""
from pathlib import Path

from fgq_jax.configfile import derived_config


def get_config():
    return derived_config(
        Path(__file__).with_name("sweep_resnet20.py"),
        model="resnet56",
        checkpoint="{shared}/models/cifar-resnet/resnet56-4bfd9763.th",
    )
