"""Fine-tuning checkpoints: orbax CheckpointManager saves of the whole TrainState plus JSON metadata
(config, activation layers, history), exact resume, and the refusal of incompatible ones.

Layout: ``<workdir>/checkpoints/<step>/{state,meta}``. Saves are asynchronous and atomic (orbax
writes a temporary directory and renames it), the last ``max_to_keep`` are kept, and an interrupted
save is ignored on resume. The metadata holds a sha256 of every array of the saved state; resume
takes the newest checkpoint whose metadata reads and whose arrays match their digests, and says
which newer ones it skipped and why (a stray directory, truncated metadata, flipped bytes).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fgq_jax.activations import ActConfig
from fgq_jax.checkpoint import CheckpointMismatchError, tree_digests, verify_digests
from fgq_jax.recipe import QuantRecipe
from fgq_jax.train.config import ARCH_FIELDS, RUNTIME_FIELDS, TrainConfig
from fgq_jax.train.state import TrainState

__all__ = [
    "CheckpointMismatchError",
    "checkpoint_dir",
    "latest_checkpoint_meta",
    "readable_checkpoints",
    "check_resume_compatible",
    "existing_checkpoint",
    "saved_act_config",
    "restore_state",
    "restore_newest_intact",
    "Checkpointer",
]

META_FORMAT = 2  # 2: the config holds a QuantRecipe (format 1 had flat quantization fields)


def checkpoint_dir(workdir) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def _read_only_manager(workdir) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts)


def _skip(step, why: str) -> None:
    print(f"[fgq-train] resume: skipping checkpoint {step}: {why}", file=sys.stderr)


def readable_checkpoints(workdir) -> list[tuple[int, dict]]:
    """[(step, metadata)] of the checkpoints in ``workdir`` whose metadata reads, newest first; a
    directory that is not a checkpoint of this format (a stray ``checkpoints/9/``, a truncated
    ``meta``) is skipped with a message saying why. Read-only: nothing is written or deleted."""
    if not checkpoint_dir(workdir).is_dir():
        return []
    mngr = _read_only_manager(workdir)
    out = []
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files
                _skip(step, f"unreadable metadata ({type(e).__name__}: {str(e)[:200]})")
                continue
            if not isinstance(meta, dict) or "config" not in meta or "act_layers" not in meta:
                _skip(step, "its metadata is not that of a fine-tuning checkpoint")
                continue
            out.append((int(step), meta))
    finally:
        mngr.close()
    return out


def latest_checkpoint_meta(workdir) -> tuple[int | None, dict | None]:
    """(step, metadata) of the newest checkpoint with readable metadata; (None, None) if none."""
    found = readable_checkpoints(workdir)
    return found[0] if found else (None, None)


def _recipe_diffs(saved: Any, now: QuantRecipe) -> dict[str, tuple[Any, Any]]:
    """{flat recipe name: (checkpoint value, current value)} of the settings that differ."""
    try:
        old = QuantRecipe.from_dict(saved).flat()
    except (TypeError, ValueError):  # a config from before the recipe, or unreadable
        return {"recipe": (saved if saved is not None else "<missing>", now.to_dict())}
    return {k: (old[k], v) for k, v in now.flat().items() if old[k] != v}


def check_resume_compatible(saved: Mapping[str, Any], config: TrainConfig, where: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` if ``config`` differs from the checkpoint's config in
    anything but the run-time fields. The message names the fields (the recipe's by their flat
    names) and both values."""
    now = config.to_dict()
    diffs = {k: (saved.get(k, "<missing>"), now[k]) for k in now
             if k not in (*RUNTIME_FIELDS, "recipe") and saved.get(k, "<missing>") != now[k]}
    recipe = _recipe_diffs(saved.get("recipe"), config.recipe)
    if not diffs and not recipe:
        return
    kinds = [kind for kind, present in (
        ("architecture/initialisation", any(k in ARCH_FIELDS for k in diffs)),
        ("quantization recipe", bool(recipe)),
        ("training", any(k not in ARCH_FIELDS for k in diffs)),
    ) if present]
    detail = "; ".join(f"{k}: checkpoint={a!r}, now={b!r}" for k, (a, b) in sorted({**diffs, **recipe}.items()))
    raise CheckpointMismatchError(
        f"cannot resume{(' from ' + where) if where else ''}: the checkpoint was made with a different "
        f"{' and '.join(kinds)} config ({detail}). Use the original config or a fresh --workdir; "
        "the existing checkpoints were left untouched."
    )


def existing_checkpoint(workdir, config: TrainConfig, resume: bool) -> list[tuple[int, dict]]:
    """The checkpoints a resume may start from, newest first, validated read-only before anything
    is written: [] for a fresh run; FileExistsError for a fresh run in a used workdir;
    CheckpointMismatchError for a resume with another config (checked on the newest)."""
    found = readable_checkpoints(workdir)
    if not found:
        return []
    step, meta = found[0]
    if not resume:
        raise FileExistsError(
            f"{checkpoint_dir(workdir)} already holds checkpoints (latest step {step}); pass --resume "
            "to continue that run or choose another --workdir"
        )
    check_resume_compatible(meta["config"], config, str(checkpoint_dir(workdir)))
    return found


def saved_act_config(meta: Mapping[str, Any]) -> ActConfig:
    """The ActConfig a checkpoint's run was calibrated with."""
    return ActConfig(tuple((p, int(b), bool(s)) for p, b, s in meta["act_layers"]))


def restore_state(workdir, step: int, like: TrainState, digests: Mapping[str, str] | None = None) -> TrainState:
    """The TrainState saved at ``step``, with the structure, shapes and dtypes of ``like``; its
    arrays checked against ``digests`` (the checkpoint's metadata) when given."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    mngr = _read_only_manager(workdir)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        state = mngr.restore(step, args=args).state
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CheckpointMismatchError(
            f"cannot restore step {step} from {checkpoint_dir(workdir)} into this model's state "
            f"({type(e).__name__}: {e}); the checkpoints were left untouched"
        ) from e
    finally:
        mngr.close()
    if digests is not None:
        verify_digests(jax.device_get(state), digests, f"{checkpoint_dir(workdir)}/{step}")
    return state


def restore_newest_intact(workdir, candidates, like: TrainState) -> tuple[int, dict, TrainState]:
    """(step, metadata, state) of the newest of ``candidates`` ([(step, metadata)], newest first)
    that restores and matches its digests; the damaged ones are skipped with a message. Raises
    CheckpointMismatchError when none is intact."""
    reasons = []
    for step, meta in candidates:
        try:
            return step, meta, restore_state(workdir, step, like, meta.get("digests"))
        except (CheckpointMismatchError, ValueError) as e:
            _skip(step, str(e)[:300])
            reasons.append(f"{step}: {str(e)[:200]}")
    raise CheckpointMismatchError(
        f"no intact checkpoint in {checkpoint_dir(workdir)} ({'; '.join(reasons)}); they were left "
        "untouched: start a fresh run in another --workdir")


class Checkpointer:
    """Asynchronous saves of (TrainState, metadata) under ``<workdir>/checkpoints``; use as a context
    manager so that an in-flight write finishes (also on Ctrl-C) before the run ends."""

    def __init__(self, workdir, max_to_keep: int, meta: Mapping[str, Any]):
        logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's per-save info lines
        self.meta = {"format": META_FORMAT, **meta}
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=True,
            ),
        )

    def save(self, step: int, state: TrainState, **meta) -> None:
        """Save ``state`` as ``step`` (once per step) with the run's metadata plus ``meta``."""
        if step in self.manager.all_steps():
            return
        # a copy: the next (donating) step reuses the live buffers while orbax writes in background
        snapshot = jax.tree.map(jnp.copy, state)
        meta = {**self.meta, "step": step, **meta, "digests": tree_digests(jax.device_get(snapshot))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(snapshot), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
