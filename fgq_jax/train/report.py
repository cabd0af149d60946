"""Results of fine-tuning runs: ``results/<dataset>/<model>/finetune_<name>.{csv,json,png}``.

One CSV row per finished run (keyed by seed; a rerun replaces its row), its JSON twin with every
run's metadata and per-epoch history, and a plot of test top-1 per epoch. Every file is written
atomically (:mod:`fgq_jax.fileio`).
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from fgq_jax import fileio, results
from fgq_jax.recipe import KEY_COLUMNS

__all__ = ["CSV_COLUMNS", "to_jsonable", "results_paths", "write_results"]

CSV_COLUMNS = (
    "model", *KEY_COLUMNS, "distill", "epochs", "top1_start", "top1_final", "fp_top1",
    "overhead_pct", "name", "fp_start_top1", "batch_size", "steps", "images_seen", "seed",
    "optimizer", "lr", "schedule", "train_wall_s", "images_per_s", "step_s_quant", "step_s_fp",
    "step_time_ratio", "n_train", "n_test",
)


def to_jsonable(x):
    """Arrays and numpy scalars as Python numbers, tuples as lists, non-finite floats as None."""
    if isinstance(x, (np.generic, jax.Array)):
        x = np.asarray(x).item()
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def results_paths(results_dir, dataset: str, model: str, name: str) -> dict[str, Path]:
    base = Path(results_dir) / dataset / model / f"finetune_{name}"
    return {ext: base.with_suffix("." + ext) for ext in ("csv", "json", "png")}


def _fp_reference(summary, results_dir) -> tuple[float | None, list | None, str | None]:
    """(fp_top1, its history, where it came from): this run when it is full precision, else the
    FP fine-tune named by ``config.fp_reference`` (same seed if there is one)."""
    cfg = summary["config"]
    if not summary["quantized"]:
        return summary["top1_final"], None, "this run"
    if not cfg.get("fp_reference"):
        return None, None, None
    ref = results_paths(results_dir, summary["dataset"], summary["model"], cfg["fp_reference"])["json"]
    if not ref.is_file():
        note = f"missing: {ref} (run the FP fine-tune first)"
        print(f"[fgq-train] fp_top1 left empty: {note}", file=sys.stderr)
        return None, None, note
    ref_runs = json.loads(ref.read_text())["runs"]
    run = ([r for r in ref_runs if r["config"]["seed"] == cfg["seed"]] or ref_runs)[-1]
    return run["top1_final"], run.get("history"), str(ref)


def _other_runs(json_path: Path, seed: int) -> list[dict]:
    """The runs of an existing results JSON with another seed ([] when there is none / unreadable)."""
    if not json_path.is_file():
        return []
    try:
        return [r for r in json.loads(json_path.read_text()).get("runs", []) if r["config"]["seed"] != seed]
    except (ValueError, KeyError, TypeError):
        return []


def write_results(
    summary: Mapping[str, Any],
    results_dir: str | os.PathLike = "results",
    *,
    command: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<results_dir>/<dataset>/<model>/finetune_<name>.{csv,json,png}`` atomically.

    csv: one row per finished run (a rerun with the same seed replaces its row; other seeds are
    kept), columns ``CSV_COLUMNS`` (the recipe's key columns as the sweep spells them). ``fp_top1``
    is the final top-1 of the FP fine-tune named by ``config.fp_reference`` (read from its JSON),
    or this run's own when it is the FP run; empty when unknown. json: the runs with their metadata
    (git rev, versions, seed, date, machine, config, per-epoch history, step timings). png: test
    top-1 per epoch with the FP reference line(s).
    meta: the run's metadata (``results.run_metadata``) taken when it started, so that the git
    revision is that of the code that ran; None takes it now.
    """
    cfg = summary["config"]
    paths = results_paths(results_dir, summary["dataset"], summary["model"], summary["name"])
    fp_top1, fp_history, fp_note = _fp_reference(summary, results_dir)
    row = {k: summary.get(k) for k in CSV_COLUMNS}
    row.update(fp_top1=fp_top1, seed=cfg["seed"], optimizer=cfg["optimizer"], lr=cfg["lr"], schedule=cfg["schedule"])
    record = {k: v for k, v in summary.items() if not k.startswith("_")}
    record.update(fp_top1=fp_top1, fp_top1_source=fp_note, row=row)
    record["meta"] = dict(meta) if meta is not None else results.run_metadata(seed=cfg["seed"], command=command)
    runs = sorted([*_other_runs(paths["json"], cfg["seed"]), to_jsonable(record)], key=lambda r: r["config"]["seed"])
    fileio.write_json(paths["json"], {"kind": "finetune", "columns": list(CSV_COLUMNS), "runs": runs})
    fileio.write_csv(paths["csv"], [r["row"] for r in runs], CSV_COLUMNS)
    fileio.atomic_write_bytes(paths["png"], _plot_png(summary, fp_top1, fp_history))
    return paths


def _plot_png(summary, fp_top1, fp_history) -> bytes:
    """Test top-1 per epoch (epoch 0 = before fine-tuning) with the FP references, as PNG bytes."""
    import matplotlib  # lazily: importing fgq_jax.train must not pick a matplotlib backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    hist = summary["history"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    label = summary.get("recipe") or summary["method"]
    ax.plot([r["epoch"] for r in hist], [r["test_top1"] for r in hist], "o-",
            label=label + (" +KD" if summary["distill"] else ""))
    if fp_history:
        ax.plot([r["epoch"] for r in fp_history], [r["test_top1"] for r in fp_history], "s--", color="gray",
                alpha=0.7, label="FP fine-tune")
    if fp_top1 is not None:
        ax.axhline(fp_top1, color="k", ls=":", label=f"FP fine-tuned {fp_top1:.2f}%")
    fp_start = hist[0].get("fp_start_top1")
    if fp_start is not None:
        ax.axhline(fp_start, color="tab:red", ls="-.", lw=0.8, label=f"FP start {fp_start:.2f}%")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before fine-tuning)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{summary['model']} on {summary['dataset']}: finetune_{summary['name']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
