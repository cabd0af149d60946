"""Fine-tune a model with ternary (FGQ) weights and low-bit activations, or in full precision.

    python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py
    python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py --resume
    python -m experiments.finetune --config CONFIG --set group_size=4 --set epochs=1 --workdir runs/x

The config file defines ``get_config()`` returning a :class:`fgq_jax.train.TrainConfig` (or a
ConfigDict/dict of its fields); ``--set key=value`` overrides fields (Python literals). The run keeps
its checkpoints and ``metrics.jsonl`` in ``--workdir`` (default ``runs/finetune_<name>``); ``--resume``
continues from the newest checkpoint there (and refuses one made with another config). At the end the
results go to ``results/<dataset>/<model>/finetune_<name>.{csv,json,png}``.

``config.model`` is a registry name (``fgq_jax.models.get_model``) or ``"package.module:attr"`` naming
a ModelSpec (or a function ``num_classes -> ModelSpec``); ``config.dataset`` is an ``fgq_jax.data``
name or ``"synthetic"`` (a small generated set, for smoke tests and timing). Checkpoint paths may use
``{shared}`` for the shared data root (env FGQ_SHARED_DIR, default ``<repo>/../shared``); a directory
is read with ``fgq_jax.checkpoint.load_variables``, a file is converted from PyTorch on the fly.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_spec(model: str, num_classes: int | None = None):
    """ModelSpec for a registry name or a ``"package.module:attr"`` reference."""
    if ":" in model:
        mod_name, attr = model.split(":", 1)
        obj = getattr(importlib.import_module(mod_name), attr)
        return obj(num_classes) if callable(obj) and not hasattr(obj, "module") else obj
    from fgq_jax.models import get_model

    return get_model(model, num_classes)


def resolve_path(path: str) -> Path:
    if "{shared}" in path:
        from fgq_jax.data import default_shared_dir

        path = path.format(shared=default_shared_dir())
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def load_init_variables(path: str | None, model: str, num_classes: int | None):
    """{"params", "batch_stats"} from a saved-variables directory or a PyTorch checkpoint file."""
    if path is None:
        return None
    p = resolve_path(path)
    if p.is_dir():
        from fgq_jax.checkpoint import load_variables

        variables, _ = load_variables(p)
        return variables
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    from fgq_jax.convert import convert_torch_checkpoint

    params, batch_stats = convert_torch_checkpoint(p, model, num_classes)
    return {"params": params, "batch_stats": batch_stats}


def load_data(cfg, spec):
    """((train images, labels), (test images, labels)) as uint8 / int32 numpy arrays."""
    from fgq_jax import train as T

    if cfg.dataset == "synthetic":
        shape, nc = tuple(spec.input_shape), spec.num_classes
        tr = T.synthetic_arrays(cfg.train_subset or 2048, shape, nc, seed=0, split="train")
        te = T.synthetic_arrays(cfg.test_subset or 512, shape, nc, seed=0, split="test")
        return tr, te
    from fgq_jax.data import load_arrays

    return load_arrays(cfg.dataset, "train"), load_arrays(cfg.dataset, "test")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.finetune", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="config file defining get_config()")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable)")
    ap.add_argument("--workdir", default=None, help="checkpoints + metrics.jsonl (default runs/finetune_<name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    ap.add_argument("--results-dir", default=None, help="where results/<dataset>/<model>/ go (default: config.results_dir)")
    ap.add_argument("--no-results", action="store_true", help="do not write the results csv/json/png")
    args = ap.parse_args(argv)

    from fgq_jax import results
    from fgq_jax import train as T

    cfg = T.load_config(args.config, args.overrides)
    T.validate_config(cfg)  # bad optimizer / schedule / lr: fail before loading anything
    command = "python -m experiments.finetune " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    # taken now: the code that runs is the code of this revision, whatever is committed meanwhile
    meta = results.run_metadata(seed=cfg.seed, command=command)
    workdir = Path(args.workdir) if args.workdir else REPO_ROOT / "runs" / f"finetune_{cfg.name}"
    spec = resolve_spec(cfg.model, cfg.num_classes)
    (train, test) = load_data(cfg, spec)
    init = load_init_variables(cfg.init_checkpoint, cfg.model, cfg.num_classes)
    teacher = None
    if cfg.distill and (cfg.teacher_model or cfg.teacher_checkpoint):
        t_spec = resolve_spec(cfg.teacher_model or cfg.model, cfg.num_classes)
        t_vars = load_init_variables(cfg.teacher_checkpoint or cfg.init_checkpoint,
                                     cfg.teacher_model or cfg.model, cfg.num_classes)
        if t_vars is None:
            raise ValueError("distillation needs a teacher checkpoint (teacher_checkpoint or init_checkpoint)")
        teacher = (t_spec.module, t_vars)
    summary = T.fit(cfg, workdir, spec=spec, train_data=train, test_data=test, init_variables=init,
                    teacher=teacher, resume=args.resume)
    print(
        f"[finetune] {cfg.name}: top-1 {summary['top1_start']:.2f}% -> {summary['top1_final']:.2f}% "
        f"(FP start {summary['fp_start_top1']:.2f}%), {summary['images_seen']} images = "
        f"{summary['overhead_pct']:.3g}% of the original schedule"
        + (f", step time quant/FP {summary['step_time_ratio']:.2f}x" if summary["step_time_ratio"] else "")
    )
    if not args.no_results:
        results_dir = Path(args.results_dir or cfg.results_dir)
        if not results_dir.is_absolute():
            results_dir = REPO_ROOT / results_dir
        paths = T.write_results(summary, results_dir, meta=meta)
        print(f"[finetune] wrote {paths['csv']}, {paths['json'].name}, {paths['png'].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
