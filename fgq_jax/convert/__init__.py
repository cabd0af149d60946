"""Checkpoint converters: PyTorch ``.th`` / ``.pth`` -> Flax variables, saved with orbax.

    params, batch_stats = convert_torch_checkpoint("resnet20-12fca82f.th", "resnet20")
    save_variables("converted/resnet20", {"params": params, "batch_stats": batch_stats}, {"model": "resnet20"})
    variables, metadata = load_variables("converted/resnet20")

CLI: ``python -m fgq_jax.convert SRC --model NAME --out DIR [--overwrite]``.
"""

from fgq_jax.checkpoint import load_variables, save_variables
from fgq_jax.convert.torch_convert import (
    CheckpointMismatchError,
    convert_torch_checkpoint,
    convert_torch_state_dict,
    expected_torch_keys,
    load_torch_state_dict,
)

__all__ = [
    "CheckpointMismatchError",
    "convert_torch_checkpoint",
    "convert_torch_state_dict",
    "expected_torch_keys",
    "load_torch_state_dict",
    "load_variables",
    "save_variables",
]
