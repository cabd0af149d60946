"""Sweep group size N x activation bits x method (x repairs) for one pretrained model.

    python -m experiments.sweep --config experiments/configs/sweep_resnet20.py
    python -m experiments.sweep --config experiments/configs/sweep_resnet20.py --worker 0 --num-workers 2

Writes results/<dataset>/<model>/<experiment>.{csv,json} row by row (atomic, resumable: finished
points are skipped when started again; several workers may share one CSV) and the plots
results/<dataset>/<model>/<experiment>_{mults,bits}.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from fgq_jax import sweep as sweep_lib


def load_config(path: str):
    """Import a config file and return its get_config() (configs are plain Python files)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"sweep: config file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(f"fgq_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"sweep: config file {str(path)!r} defines no get_config()")
    return module.get_config()


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
