"""Low-precision fine-tuning: STE training of ternary-weight / low-bit-activation networks, starting
from the post-training quantized model of a :class:`fgq_jax.recipe.QuantRecipe`.

    config.py         TrainConfig: model, init, recipe, distillation, training and run-time fields
    optim.py          schedules, optimizers (kernel-only weight decay), cross-entropy, distillation
    state.py          TrainState, the latent start variables, the jitted STE training step
    inputs.py         the splits (or a synthetic set), subsets, the recipe's sample, epoch batches
    checkpointing.py  orbax saves, exact resume, refusal of incompatible checkpoints
    timing.py         step timing (quantized vs FP) and the overhead vs the original schedule
    export.py         the final weights: float variables and the packed ternary tree
    loop.py           fit: quantized start -> epochs (train, evaluate, checkpoint) -> summary
    report.py         results/<dataset>/<model>/finetune_<name>.{csv,json,png}

``from fgq_jax import train as T`` gives every public name below.
"""
from fgq_jax.checkpoint import CheckpointMismatchError
from fgq_jax.train.checkpointing import (
    Checkpointer,
    check_resume_compatible,
    checkpoint_dir,
    existing_checkpoint,
    latest_checkpoint_meta,
    readable_checkpoints,
    restore_newest_intact,
    restore_state,
    saved_act_config,
)
from fgq_jax.train.config import ARCH_FIELDS, DEFAULT_RECIPE, RUNTIME_FIELDS, TrainConfig
from fgq_jax.train.export import export_run
from fgq_jax.train.inputs import RunData, check_mesh, load_data, place_batch, prepare_data, synthetic_arrays
from fgq_jax.train.loop import Trainer, fit
from fgq_jax.train.optim import (
    OPTIMIZERS,
    SCHEDULES,
    check_lr,
    cross_entropy,
    decay_mask,
    distillation_loss,
    make_optimizer,
    make_schedule,
)
from fgq_jax.train.report import CSV_COLUMNS, results_paths, to_jsonable, write_results
from fgq_jax.train.state import (
    TrainState,
    create_train_state,
    latent_variables,
    make_apply_fn,
    make_train_step,
    weight_quantizer,
)
from fgq_jax.train.timing import overhead_pct, time_train_steps

__all__ = [
    "ARCH_FIELDS", "CSV_COLUMNS", "DEFAULT_RECIPE", "OPTIMIZERS", "RUNTIME_FIELDS", "SCHEDULES",
    "CheckpointMismatchError", "Checkpointer", "RunData", "TrainConfig", "TrainState", "Trainer",
    "check_lr", "check_mesh", "check_resume_compatible", "checkpoint_dir", "create_train_state",
    "cross_entropy", "decay_mask", "distillation_loss", "existing_checkpoint", "export_run", "fit",
    "latent_variables", "latest_checkpoint_meta", "readable_checkpoints", "restore_newest_intact", "load_data", "make_apply_fn", "make_optimizer",
    "make_schedule", "make_train_step", "overhead_pct", "place_batch", "prepare_data",
    "restore_state", "results_paths", "saved_act_config", "synthetic_arrays", "time_train_steps",
    "to_jsonable", "weight_quantizer", "write_results",
]
