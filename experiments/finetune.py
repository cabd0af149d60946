"""Fine-tune a model with ternary (FGQ) weights and low-bit activations, or in full precision.

    python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py
    python -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py --resume
    python -m experiments.finetune --config CONFIG --set group_size=4 --set epochs=1 --workdir runs/x --mesh

The config file defines ``get_config()`` returning a :class:`fgq_jax.train.TrainConfig`; ``--set
key=value`` overrides a field or a recipe setting (``group_size``, ``act_bits``, ...). Training starts
from the post-training quantized model of the config's recipe (the sweep's point for that recipe).
The run keeps its checkpoints and ``metrics.jsonl`` in ``--workdir`` (default
``runs/finetune_<name>``); ``--resume`` continues from the newest checkpoint there (and refuses one
made with another config). ``--mesh`` shards each batch over all devices. At the end the results go
to ``results/<dataset>/<model>/finetune_<name>.{csv,json,png}``.

``config.model`` is a registry name or ``"package.module:attr"`` naming a ModelSpec (or a function
``num_classes -> ModelSpec``); ``config.dataset`` is an ``fgq_jax.data`` name or ``"synthetic"`` (a
small generated set, for smoke tests and timing). Checkpoint paths may use ``{shared}`` for the
shared data root; a directory is read with ``fgq_jax.checkpoint.load_variables``, a file is
converted from PyTorch on the fly (``fgq_jax.loading.load_model``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from experiments import cli
from fgq_jax import results
from fgq_jax import train as T
from fgq_jax.fileio import REPO_ROOT
from fgq_jax.loading import load_model, resolve_path


def load_teacher(cfg: T.TrainConfig):
    """(module, variables) of the distillation teacher, or None for the FP start."""
    if not cfg.distill or not (cfg.teacher_model or cfg.teacher_checkpoint):
        return None
    checkpoint = cfg.teacher_checkpoint or cfg.init_checkpoint
    if checkpoint is None:
        raise ValueError("distillation needs a teacher checkpoint (teacher_checkpoint or init_checkpoint)")
    spec, variables = load_model(cfg.teacher_model or cfg.model, checkpoint, cfg.num_classes)
    return spec.module, variables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.finetune", description=__doc__.split("\n")[0])
    cli.add_common_args(ap)
    ap.add_argument("--workdir", default=None, help="checkpoints + metrics.jsonl (default runs/finetune_<name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    ap.add_argument("--results-dir", default=None, help="where results/<dataset>/<model>/ go (default: config.results_dir)")
    ap.add_argument("--no-results", action="store_true", help="do not write the results csv/json/png")
    args = ap.parse_args(argv)
    cfg, mesh = cli.setup("finetune", args, T.TrainConfig)  # a bad config ends here, before any loading
    argv = argv if argv is not None else sys.argv[1:]
    # taken now: the code that runs is the code of this revision, whatever is committed meanwhile
    meta = results.run_metadata(seed=cfg.seed, command="python -m experiments.finetune " + shlex.join(argv))
    workdir = Path(args.workdir) if args.workdir else REPO_ROOT / "runs" / f"finetune_{cfg.name}"
    spec, init = load_model(cfg.model, cfg.init_checkpoint, cfg.num_classes)
    train, test = T.load_data(cfg, spec)
    summary = T.fit(cfg, workdir, spec=spec, train_data=train, test_data=test, init_variables=init,
                    teacher=load_teacher(cfg), resume=args.resume, mesh=mesh)
    print(
        f"[finetune] {cfg.name}: top-1 {summary['top1_start']:.2f}% -> {summary['top1_final']:.2f}% "
        f"(FP start {summary['fp_start_top1']:.2f}%), {summary['images_seen']} images = "
        f"{summary['overhead_pct']:.3g}% of the original schedule"
        + (f", step time quant/FP {summary['step_time_ratio']:.2f}x" if summary["step_time_ratio"] else "")
    )
    if not args.no_results:
        paths = T.write_results(summary, resolve_path(args.results_dir or cfg.results_dir), meta=meta)
        print(f"[finetune] wrote {paths['csv']}, {paths['json'].name}, {paths['png'].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
