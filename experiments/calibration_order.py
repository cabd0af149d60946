"""Does a sweep point lose accuracy because its activation steps were calibrated before the repairs?

    python -m experiments.calibration_order --config experiments/configs/sweep_squeezenet.py --set group_size=4

quantize_model calibrates the activation steps on the freshly ternarized network, runs the repairs
with those steps (scale fitting and bias correction see the quantized activations), then
recalibrates. This script evaluates, for the config's recipe with `--set` overrides and 8-bit
activations: (a) the sweep's point as quantize_model makes it, and (b) the same repairs made with
FP activations, the 8-bit steps calibrated afterwards on the repaired network. Writes
results/<dataset>/<model>/calibration_order.json (with run metadata).
"""
from __future__ import annotations

import argparse
import sys

from experiments import cli
from fgq_jax import fileio, results
from fgq_jax.evaluate import Evaluator
from fgq_jax.loading import load_labeled, load_model, sample_images
from fgq_jax.ptq import calibrate_steps, quantize_model, quantized_layers
from fgq_jax.sweep import SweepConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cli.add_common_args(parser)
    parser.add_argument("--act-bits", type=int, default=8)
    args = parser.parse_args(argv)
    cfg, _ = cli.setup("calibration_order", args, SweepConfig)
    recipe = cfg.recipe.replace(scale_fit=True, bias_correct=True, act_bits=args.act_bits)
    spec, fp_vars = load_model(cfg.model, cfg.checkpoint)
    x, y = load_labeled(cfg.dataset, cfg.test_split, cfg.test_limit)
    calib, repair = sample_images(cfg.dataset, cfg.calib_split, recipe)

    def evaluate(q_vars, act_cfg, steps):
        ev = Evaluator(spec.module, spec.dataset_family, act_cfg)
        return ev(q_vars, x, y, steps, batch_size=cfg.batch_size, progress=False)

    q = quantize_model(spec, fp_vars, recipe, calib, repair)  # (a) the sweep's point
    in_pipeline = evaluate(q.variables, q.act_cfg, q.act_steps)
    q_fp = quantize_model(spec, fp_vars, recipe.replace(act_bits=None), calib, repair)
    _, act_layers = quantized_layers(spec, fp_vars, recipe)
    act_cfg, steps = calibrate_steps(spec.module, q_fp.variables, calib, args.act_bits, act_layers,
                                     spec.dataset_family, recipe.activations.calibration)
    after = evaluate(q_fp.variables, act_cfg, steps)  # (b) repairs first, steps after
    out = {
        "recipe": recipe.key(),
        "top1_steps_before_repairs": in_pipeline.top1, "top5_steps_before_repairs": in_pipeline.top5,
        "top1_steps_after_repairs": after.top1, "top5_steps_after_repairs": after.top5,
        "metadata": results.run_metadata(seed=recipe.seed, experiment={"config": args.config, "set": args.overrides}),
    }
    path = fileio.REPO_ROOT / "results" / cfg.dataset / cfg.model / "calibration_order.json"
    fileio.write_json(path, out)
    print(f"{recipe.describe()}: steps before repairs {in_pipeline.top1:.2f} %, after {after.top1:.2f} % -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
