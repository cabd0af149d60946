"""Sweep group size N x activation bits x method (x repairs) for one pretrained model.

    python -m experiments.sweep --config experiments/configs/sweep_resnet20.py
    python -m experiments.sweep --config experiments/configs/sweep_resnet20.py --worker 0 --num-workers 2

Writes results/<dataset>/<model>/<experiment>.{csv,json} row by row (atomic, resumable: finished
points are skipped when started again; several workers may share one CSV) and the plots
results/<dataset>/<model>/<experiment>_{mults,bits}.png.
"""
from __future__ import annotations

import argparse
import sys
import time

from fgq_jax import sweep as sweep_lib


def load_config(path: str):
    """get_config() of a config file; a missing or malformed file ends the CLI with its message."""
    from fgq_jax.configfile import load_get_config

    try:
        return load_get_config(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sweep: {e}") from None


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs under <repo>/.cache/jax: a resumed or extended sweep (and the
    next experiment on the same model) then skips the per-shape compilations."""
    import jax

    from fgq_jax.results import REPO_ROOT

    jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (experiments/configs/*.py)")
    parser.add_argument("--out", default=None, help="results root (default: <repo>/results)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index")
    parser.add_argument("--num-workers", type=int, default=1, help="workers sharing the sweep")
    parser.add_argument("--no-plots", action="store_true", help="skip drawing the PNG plots")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    cfg = load_config(args.config)
    start = time.perf_counter()
    csv_path = sweep_lib.run_sweep(
        cfg,
        out_root=args.out,
        worker=args.worker,
        num_workers=args.num_workers,
        config_file=args.config,
        plots=not args.no_plots,
    )
    print(f"sweep {cfg.name}: {csv_path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
