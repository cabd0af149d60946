"""The final weights of a fine-tuning run: ``<workdir>/export/variables`` (latent float params + BN
statistics, loadable with :func:`fgq_jax.checkpoint.load_variables`, e.g. as a distillation
teacher) and, for ternary runs, ``export/ternary`` (:func:`fgq_jax.packing.save_ternary`: codes at 2
bits per weight, plus BN statistics) with ``export/ternary.json`` (config, activation steps)."""
from __future__ import annotations

import sys
from pathlib import Path

import jax

from fgq_jax import fileio, packing, transforms
from fgq_jax.activations import ActConfig
from fgq_jax.checkpoint import save_variables
from fgq_jax.train.config import TrainConfig
from fgq_jax.train.state import TrainState

__all__ = ["export_run"]


def _write_ternary(tree):
    def write(tmp: Path) -> None:
        tmp.rmdir()  # save_ternary creates its directory itself
        packing.save_ternary(tmp, tree)

    return write


def export_run(workdir: Path, config: TrainConfig, spec, state: TrainState, act_cfg: ActConfig) -> dict[str, Path]:
    """Write the exports (each replaced whole, atomically); returns {kind: directory}."""
    params = jax.device_get(state.params)
    batch_stats = jax.device_get(state.batch_stats)
    meta = {
        "kind": "fgq-finetune", "model": config.model, "config": config.to_dict(),
        "act_layers": [list(layer) for layer in act_cfg.layers],
        "act_steps": {k: float(v) for k, v in jax.device_get(state.act_steps).items()},
        "step": int(state.step),
    }
    export = Path(workdir) / "export"
    out = {"variables": save_variables(export / "variables", {"params": params, "batch_stats": batch_stats},
                                       meta, overwrite=True)}
    rules = config.recipe.rules(spec.first_layer, spec.last_layer)
    if rules:
        try:
            tree = {"params": transforms.quantize_params(params, rules, mode="ternary"), "batch_stats": batch_stats}
            out["ternary"] = fileio.replace_dir(export / "ternary", _write_ternary(tree))
            fileio.write_json(export / "ternary.json", meta)
        except Exception as e:  # noqa: BLE001 - an export problem must not lose the trained run
            print(f"[fgq-train] ternary export failed: {type(e).__name__}: {e}", file=sys.stderr)
    return out
