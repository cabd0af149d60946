"""Sweep group size N x activation bits x method (x repairs) for one pretrained model.

    python -m experiments.sweep --config experiments/configs/sweep_resnet20.py
    python -m experiments.sweep --config experiments/configs/sweep_resnet20.py --worker 0 --num-workers 2
    python -m experiments.sweep --config CONFIG --set group_sizes=(4,64) --set num_repair=1024 --mesh

Writes results/<dataset>/<model>/<experiment>.{csv,json} row by row (atomic, resumable: finished
points are skipped when started again; several workers may share one CSV) and the plots
results/<dataset>/<model>/<experiment>_{mults,bits}.png.
"""
from __future__ import annotations

import argparse
import sys
import time

from experiments import cli
from fgq_jax import sweep as sweep_lib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cli.add_common_args(parser)
    parser.add_argument("--out", default=None, help="results root (default: <repo>/results)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index")
    parser.add_argument("--num-workers", type=int, default=1, help="workers sharing the sweep")
    parser.add_argument("--no-plots", action="store_true", help="skip drawing the PNG plots")
    args = parser.parse_args(argv)
    cfg, mesh = cli.setup("sweep", args, sweep_lib.SweepConfig)
    start = time.perf_counter()
    csv_path = sweep_lib.run_sweep(
        cfg,
        out_root=args.out,
        worker=args.worker,
        num_workers=args.num_workers,
        config_file=args.config,
        plots=not args.no_plots,
        mesh=mesh,
    )
    print(f"sweep {cfg.name}: {csv_path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
