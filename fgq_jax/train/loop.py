"""The fine-tuning loop: :func:`fit`.

    start  = quantize_model(recipe) on the recipe's unlabeled sample (the sweep's point), or the
             newest checkpoint when resuming
    epoch  = STE training steps over a (seed, epoch)-ordered pass of the training images, then a
             test evaluation with `fgq_jax.evaluate.Evaluator` (the sweep's eval loop)
    end    = step timing (quantized vs FP), export, summary

Checkpoints every K steps and at each epoch end (orbax, atomic, last few kept) make a resume exact;
``<workdir>/metrics.jsonl`` holds one JSON object per epoch (epoch 0 = before fine-tuning).
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fgq_jax import distributed
from fgq_jax.activations import ActConfig
from fgq_jax.data import normalize
from fgq_jax.evaluate import Evaluator
from fgq_jax.fileio import atomic_write_text
from fgq_jax.ptq import quantize_model
from fgq_jax.sweep import accounting_columns
from fgq_jax.train.checkpointing import (
    Checkpointer,
    checkpoint_dir,
    existing_checkpoint,
    restore_newest_intact,
    saved_act_config,
)
from fgq_jax.train.config import TrainConfig
from fgq_jax.train.export import export_run
from fgq_jax.train.inputs import RunData, check_mesh, place_batch, prepare_data
from fgq_jax.train.optim import make_optimizer, make_schedule
from fgq_jax.train.report import to_jsonable
from fgq_jax.train.state import (
    TrainState, create_train_state, latent_variables, make_apply_fn, make_train_step, weight_quantizer,
)
from fgq_jax.train.timing import overhead_pct, time_train_steps

__all__ = ["fit", "Trainer"]


def log(msg: str) -> None:
    print(f"[fgq-train] {msg}", file=sys.stderr)


def _variables(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(tree).items() if k in ("params", "batch_stats")}


class Trainer:
    """The pieces of one run that do not change while it trains: data, optimizer, the compiled
    training step, the evaluator, the teacher, the mesh."""

    def __init__(self, config: TrainConfig, spec, data: RunData, act_cfg: ActConfig, fp_variables,
                 teacher=None, mesh=None):
        self.config, self.spec, self.data, self.act_cfg, self.mesh = config, spec, data, act_cfg, mesh
        self.total_steps = data.steps_per_epoch * config.epochs
        kw = dict(warmup_steps=int(round(config.warmup_epochs * data.steps_per_epoch)),
                  boundaries=config.step_boundaries, factor=config.step_factor)
        self.schedule = make_schedule(config.schedule, config.lr, self.total_steps, **kw)
        self.tx = make_optimizer(config.optimizer, config.lr, config.schedule, total_steps=self.total_steps,
                                 momentum=config.momentum, nesterov=config.nesterov,
                                 weight_decay=config.weight_decay, **kw)
        self.eval_weights = weight_quantizer(config.recipe, spec, ste=False)
        self.evaluator = Evaluator(spec.module, spec.dataset_family, act_cfg, mesh=mesh)
        self.teacher_apply = self.teacher_variables = None
        if config.distill:
            t_module, t_vars = teacher if teacher is not None else (spec.module, fp_variables)
            self.teacher_apply = lambda v, x: t_module.apply(v, x, train=False)
            self.teacher_variables = _variables(t_vars)
            if mesh is not None:
                self.teacher_variables = distributed.replicate(self.teacher_variables, mesh)
        self.step_kw = dict(
            preprocess=functools.partial(normalize, family=spec.dataset_family), augment=config.augment,
            teacher_apply=self.teacher_apply, distill_alpha=config.distill_alpha,
            distill_temperature=config.distill_temperature,
        )
        self.train_step = make_train_step(make_apply_fn(spec.module, act_cfg), self.tx,
                                          weight_quant=weight_quantizer(config.recipe, spec, ste=True), **self.step_kw)
        self.compile_s = None

    # ---- evaluation ------------------------------------------------------------------------------
    def test_top1(self, state: TrainState) -> float:
        """Test top-1 of the quantized model the state holds (`Evaluator`, as the sweep evaluates)."""
        params = jax.tree.map(jnp.asarray, jax.device_get(state.params))
        variables = {"params": self.eval_weights(params) if self.eval_weights else params,
                     "batch_stats": jax.device_get(state.batch_stats)}
        result = self.evaluator(variables, self.data.test_x, self.data.test_y, jax.device_get(state.act_steps),
                                batch_size=self.config.eval_batch_size,
                                progress="test" if self.config.progress else False)
        return result.top1

    def start_record(self, state: TrainState, fp_variables) -> dict[str, Any]:
        """Epoch 0: the quantized start's test top-1, and the FP model's."""
        t0 = time.perf_counter()
        top1 = self.test_top1(state)
        fp_top1 = top1
        if self.config.quantized or self.config.recipe.repairs.any:
            fp_eval = Evaluator(self.spec.module, self.spec.dataset_family, mesh=self.mesh)
            fp_top1 = fp_eval(fp_variables, self.data.test_x, self.data.test_y,
                              batch_size=self.config.eval_batch_size, progress=False).top1
        log(f"start: quantized {top1:.2f} %, FP {fp_top1:.2f} % top-1 on {len(self.data.test_y)} test "
            f"images ({time.perf_counter() - t0:.1f} s)")
        return {"epoch": 0, "step": 0, "test_top1": top1, "fp_start_top1": fp_top1,
                "lr": float(self.schedule(0)), "images_seen": 0, "overhead_pct": 0.0}

    # ---- training --------------------------------------------------------------------------------
    def _step(self, state: TrainState, epoch: int, i: int):
        batch = place_batch(self.data.batch(epoch, i), self.mesh)
        if self.compile_s is not None:
            return self.train_step(state, *batch, self.teacher_variables)
        t0 = time.perf_counter()
        state, m = self.train_step(state, *batch, self.teacher_variables)
        jax.block_until_ready(m)
        self.compile_s = time.perf_counter() - t0
        return state, m

    def run_epoch(self, state: TrainState, epoch: int, save: Callable[[int, TrainState], None],
                  hooks: Sequence[Callable[[int, TrainState], None]] = ()) -> tuple[TrainState, dict]:
        """Train the rest of ``epoch`` (from the state's step: a resumed run starts mid-epoch); save
        every ``checkpoint_every`` steps; return the state and the epoch's timing."""
        cfg, spe = self.config, self.data.steps_per_epoch
        first = int(state.step) - epoch * spe
        if first == 0:
            state = state.reset_metrics()
        bar = tqdm(total=spe, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not cfg.progress, leave=False, dynamic_ncols=True)
        compiled_before, t0 = self.compile_s is not None, time.perf_counter()
        for i in range(first, spe):
            state, m = self._step(state, epoch, i)
            step = epoch * spe + i + 1
            bar.update(1)
            if step % cfg.log_every == 0 or i == spe - 1:
                busy = time.perf_counter() - t0 - (0.0 if compiled_before else self.compile_s)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}", img_s=f"{(i + 1 - first) * cfg.batch_size / max(busy, 1e-9):.0f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and i != spe - 1:
                save(step, state)
            for hook in hooks:
                hook(step, state)
        jax.block_until_ready(state)
        bar.close()
        compile_s = 0.0 if compiled_before else self.compile_s
        return state, {"wall_s": time.perf_counter() - t0, "compile_s": compile_s, "steps_run": spe - first}

    def epoch_record(self, state: TrainState, epoch: int, timing: Mapping[str, Any]) -> dict[str, Any]:
        """The epoch's metrics (evaluates the test set); FloatingPointError if training diverged."""
        t0 = time.perf_counter()
        test_top1 = self.test_top1(state)
        mt = jax.device_get(state.metrics)
        count, loss_sum, step = max(int(mt["count"]), 1), float(mt["loss_sum"]), int(state.step)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"training diverged in epoch {epoch + 1} (loss {loss_sum / count}); lower the learning "
                f"rate (lr={self.config.lr}). The checkpoints of earlier epochs are kept"
            )
        busy = max(timing["wall_s"] - timing["compile_s"], 1e-9)
        images_seen = step * self.config.batch_size
        return {
            "epoch": epoch + 1, "step": step, "loss": loss_sum / count,
            "train_top1": 100.0 * int(mt["correct"]) / count, "test_top1": test_top1,
            "lr": float(self.schedule(step - 1)),
            "images_per_s": timing["steps_run"] * self.config.batch_size / busy,
            "wall_s": timing["wall_s"], "eval_s": time.perf_counter() - t0, "compile_s": timing["compile_s"],
            "images_seen": images_seen, "resumed": timing["steps_run"] != self.data.steps_per_epoch,
            "overhead_pct": overhead_pct(images_seen, self.config.original_epochs, self.config.original_train_size),
        }

    def time_steps(self, state: TrainState) -> dict[str, Any]:
        """Median step time of the (compiled) training step and of an FP step, in this run."""
        batch = (*place_batch(self.data.batch(0, 0), self.mesh), self.teacher_variables)
        if self.config.quantized:
            fp_step = make_train_step(make_apply_fn(self.spec.module), self.tx, **self.step_kw)
            steps = {"quant": self.train_step, "fp": fp_step}
        else:
            steps = {"fp": self.train_step}
        timing = time_train_steps(steps, state, batch, repeats=self.config.time_steps)
        return {**timing, "train_step_compile_s": self.compile_s}


# --------------------------------------------------------------------------------------------------
# the start of a run: quantized (fresh) or restored (resume)


def fp_start_variables(spec, init_variables, seed: int, input_shape) -> dict[str, Any]:
    """The FP variables the run starts from: ``init_variables``, or a random init with ``seed``."""
    if init_variables is None:
        init = jax.jit(functools.partial(spec.module.init, train=False))
        init_variables = init(jax.random.PRNGKey(seed), jnp.zeros((1, *input_shape), jnp.float32))
    return _variables(init_variables)


def quantized_start(config: TrainConfig, spec, fp_variables, data: RunData):
    """``quantize_model(recipe)`` of the FP variables on the recipe's sample: the sweep's point."""
    t0 = time.perf_counter()
    q = quantize_model(spec, fp_variables, config.recipe, data.calib, data.repair)
    log(f"start: {config.recipe.describe()} quantized in {time.perf_counter() - t0:.1f} s")
    return q


def resumed_start(workdir: Path, candidates, fp_variables, config: TrainConfig, tx):
    """(step, metadata, state) of the newest intact checkpoint among ``candidates`` (its structure
    taken from a fresh state)."""
    dummy_steps = {p: 1.0 for p in saved_act_config(candidates[0][1]).paths}
    like = create_train_state(fp_variables, tx, config.seed, dummy_steps)
    step, meta, state = restore_newest_intact(workdir, candidates, like)
    log(f"resumed from step {step} ({checkpoint_dir(workdir)})")
    return step, meta, state


# --------------------------------------------------------------------------------------------------


def fit(
    config: TrainConfig,
    workdir,
    *,
    spec,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray],
    init_variables: Mapping[str, Any] | None = None,
    teacher: tuple[Any, Mapping[str, Any]] | None = None,
    resume: bool = False,
    hooks: Sequence[Callable[[int, TrainState], None]] = (),
    mesh=None,
) -> dict[str, Any]:
    """Fine-tune ``spec.module`` from ``init_variables`` as ``config`` says; return a summary.

    spec: a `fgq_jax.models.ModelSpec` (``module``, ``first_layer``, ``last_layer``,
      ``dataset_family``, ``input_shape``, ``name``).
    train_data / test_data: (uint8 images [N, H, W, C], int labels [N]), the whole splits: the
      recipe's calibration/repair sample is drawn from all training images (as the sweep draws it),
      then ``config.train_subset`` / ``test_subset`` select subsets (`fgq_jax.loading.balanced_subset`).
    init_variables: FP {"params", "batch_stats"}; None -> ``module.init`` with ``config.seed``.
    teacher: (module, variables) of the frozen teacher for ``config.distill``; None -> the FP start.
    resume: continue from the newest checkpoint in ``<workdir>/checkpoints`` (same numbers as an
      uninterrupted run); its config must match ``config`` except for ``RUNTIME_FIELDS``, else
      `CheckpointMismatchError` (nothing written). Without ``resume``, a workdir that already holds
      checkpoints is refused (FileExistsError).
    hooks: called as ``hook(step, state)`` after every step (after its checkpoint save, if any).
    mesh: optional ``jax.sharding.Mesh``: each batch is sharded over it (`fgq_jax.distributed`).
    """
    workdir = Path(workdir).absolute()
    data = prepare_data(config, train_data, test_data)
    check_mesh(config.batch_size, mesh)
    candidates = existing_checkpoint(workdir, config, resume)
    fp_variables = fp_start_variables(spec, init_variables, config.seed, data.train_x.shape[1:])
    q = quantized_start(config, spec, fp_variables, data) if not candidates else None
    act_cfg = q.act_cfg if q is not None else saved_act_config(candidates[0][1])
    trainer = Trainer(config, spec, data, act_cfg, fp_variables, teacher, mesh)
    saved_step = None
    if q is not None:  # training starts from the quantized model, with the FP kernels as latent weights
        variables = latent_variables(q.variables, fp_variables["params"])
        state = create_train_state(variables, trainer.tx, config.seed, q.act_steps)
        history = [trainer.start_record(state, fp_variables)]
    else:
        saved_step, saved_meta, state = resumed_start(workdir, candidates, fp_variables, config, trainer.tx)
        history = [dict(r) for r in saved_meta.get("history", []) if r["step"] <= saved_step]
    if mesh is not None:
        state = distributed.replicate(state, mesh)
    state, history = train_epochs(trainer, state, history, workdir, hooks)
    timing = trainer.time_steps(state) if config.time_steps else {}
    exported = export_run(workdir, config, spec, state, act_cfg) if config.export else {}
    return summarize(trainer, state, history, timing, exported, saved_step, workdir)


def train_epochs(trainer: Trainer, state: TrainState, history: list[dict], workdir: Path, hooks) -> tuple[TrainState, list[dict]]:
    """The epochs left after ``state.step``; metrics.jsonl rewritten (atomically) after each."""
    cfg, spe = trainer.config, trainer.data.steps_per_epoch
    metrics_path = workdir / "metrics.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(metrics_path, _jsonl(history))  # drops lines past the resumed checkpoint
    meta = {"config": cfg.to_dict(), "act_layers": [list(layer) for layer in trainer.act_cfg.layers],
            "steps_per_epoch": spe, "total_steps": trainer.total_steps}
    with Checkpointer(workdir, cfg.max_to_keep, meta) as ckpt:

        def save(step, st):
            ckpt.save(step, st, history=to_jsonable(history))

        for epoch in range(int(state.step) // spe, cfg.epochs):
            state, timing = trainer.run_epoch(state, epoch, save, hooks)
            rec = trainer.epoch_record(state, epoch, timing)
            history.append(rec)
            atomic_write_text(metrics_path, _jsonl(history))
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} train {rec['train_top1']:.2f}% "
                f"test {rec['test_top1']:.2f}% {rec['images_per_s']:.0f} img/s "
                f"({rec['wall_s']:.1f} s + eval {rec['eval_s']:.1f} s)")
            save(rec["step"], state)
    return state, history


def _jsonl(history: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(to_jsonable(dict(r)), sort_keys=True) + "\n" for r in history)


def summarize(trainer: Trainer, state, history, timing, exported, resumed_from, workdir) -> dict[str, Any]:
    """What `fit` returns (and `write_results` writes): settings, start/final top-1, costs, history."""
    cfg, data = trainer.config, trainer.data
    train_recs = [r for r in history if r["epoch"] > 0]
    images_seen = trainer.total_steps * cfg.batch_size
    quant_s, fp_s = timing.get("quant", {}).get("median_s"), timing.get("fp", {}).get("median_s")
    return {
        "name": cfg.name, "model": getattr(trainer.spec, "name", None) or cfg.model, "dataset": cfg.dataset,
        **cfg.recipe.key(), "recipe": cfg.recipe.describe(), "quantized": cfg.quantized,
        "distill": cfg.distill, "epochs": cfg.epochs, "steps": trainer.total_steps, "batch_size": cfg.batch_size,
        "top1_start": history[0]["test_top1"], "top1_final": history[-1]["test_top1"],
        "fp_start_top1": history[0].get("fp_start_top1"), "images_seen": images_seen,
        "overhead_pct": overhead_pct(images_seen, cfg.original_epochs, cfg.original_train_size),
        "train_wall_s": sum(r["wall_s"] for r in train_recs),
        "images_per_s": sum(r["images_per_s"] for r in train_recs) / len(train_recs) if train_recs else None,
        "step_s_quant": quant_s, "step_s_fp": fp_s,
        "step_time_ratio": quant_s / fp_s if quant_s and fp_s else None, "timing": timing,
        "act_layers": [list(layer) for layer in trainer.act_cfg.layers], "history": history,
        "resumed_from": resumed_from, "workdir": str(workdir), "config": cfg.to_dict(),
        "n_train": data.n_train, "n_test": int(data.test_x.shape[0]),
        "exported": {k: str(v) for k, v in exported.items()}, "_state": state,
        "accounting": accounting_columns(trainer.spec, {"params": state.params, "batch_stats": state.batch_stats},
                                         cfg.recipe, trainer.act_cfg.spec()),
    }
