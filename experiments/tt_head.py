"""TT (and ternary-TT) classifier heads on a frozen model's pre-pool features (issue 14, part 3).

    python -m experiments.tt_head --config experiments/configs/tt_head_resnet20.py
    python -m experiments.tt_head --config experiments/configs/tt_head_resnet20.py --set ranks=(2,4)
    python -m experiments.tt_head --compression-only
    python -m experiments.tt_head --config experiments/configs/tt_head_resnet20.py --plot-only

Writes results/<dataset>/<model>/<name>.{csv,json,png} (compression vs top-1; see fgq_jax.tt_head)
and results/tt_compression.{md,json} (TT compression of AlexNet's and VGG-16's fully-connected
layers, fgq_jax.tt.paper_fc_compression). Features are cached under .cache/tt_head/. Without
--config the defaults of fgq_jax.tt_head.TTHeadConfig apply.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

from experiments import cli

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cli.add_common_args(parser, config_required=False)
    parser.add_argument("--out", default=None, help="results root (default: <repo>/results)")
    parser.add_argument("--compression-only", action="store_true",
                        help="only write results/tt_compression.{md,json}")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw <name>.png from the existing <name>.json")
    args = parser.parse_args(argv)
    if args.mesh:
        parser.error("--mesh is not supported: the heads train on one device")

    from fgq_jax import results, tt_head

    cfg, _ = cli.setup("tt_head", args, tt_head.TTHeadConfig)
    if args.plot_only:
        print(f"[tt_head] wrote {tt_head.replot(cfg, args.out)}")
        return 0
    command = "python -m experiments.tt_head " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    paths = tt_head.write_compression_table(args.out, results.run_metadata(command=command))
    print(f"[tt_head] wrote {paths['md']}, {paths['json'].name}")
    if args.compression_only:
        return 0
    meta = results.run_metadata(seed=cfg.seed, command=command, config_file=args.config,
                                experiment=dataclasses.asdict(cfg))
    start = time.perf_counter()
    rows, extra = tt_head.run(cfg)
    paths = tt_head.write_results(cfg, rows, extra, meta, args.out)
    print(f"[tt_head] wrote {paths['csv']}, {paths['json'].name}, {paths['png'].name} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
