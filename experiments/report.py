"""Markdown tables of committed sweep / fine-tuning results (what results/README.md shows).

    python -m experiments.report results/cifar10_jpeg/resnet20/sweep_exact.csv [--pivot]
    python -m experiments.report results/cifar10_jpeg/resnet20/finetune_resnet20_n64.csv

--pivot: one row per (method, N), one top-1 column per (activation bits, repairs) — the compact view
of a sweep. Without it, the rows as they are, with the most useful columns.
"""
from __future__ import annotations

import argparse
import sys

from fgq_jax.fileio import read_csv
from fgq_jax.recipe import REPAIRS
from fgq_jax.results import act_bits_order

SWEEP_COLUMNS = ("method", "group_size", "act_bits", *REPAIRS, "top1", "top5", "quantized_mult_eliminated_pct", "bits_per_weight",
                 "potential_speedup", "top1_rounded_multipliers")
FINETUNE_COLUMNS = ("model", "method", "group_size", "act_bits", "distill", "epochs", "top1_start",
                    "top1_final", "fp_top1", "overhead_pct", "step_time_ratio")


def _fmt(v: str) -> str:
    try:
        f = float(v)
    except ValueError:
        return v
    return f"{f:.2f}" if "." in v else v


def table(rows, columns) -> str:
    columns = [c for c in columns if any(r.get(c) for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# the short names of the pivot's column heads, in the order they are written
REPAIR_ABBREV = {"equalize": "eq", "bn_reestimate": "BN", "bias_correct": "bias", "scale_fit": "fit"}


def _repairs(r) -> str:
    names = [n for k, n in REPAIR_ABBREV.items() if r.get(k) == "true"]
    return "+".join(names) or "none"


def _size_rank(n: str):
    """Group sizes in reading order: fp, 1, 2, 4, ..., then per-channel and per-tensor."""
    if n.isdigit():
        return (1, int(n))
    return ({"fp": 0, "channel": 2, "tensor": 3}.get(n, 4), n)


def pivot(rows) -> str:
    """top-1 per (method, N) x (act bits, repairs), rows and columns sorted for reading (a resumed
    or extended sweep appends its rows in completion order)."""
    cols, keys, cell = {}, {}, {}
    for r in rows:
        col = f"a{r['act_bits']} {_repairs(r)}"
        key = (r["method"], r["group_size"])
        repairs = sum(r.get(k) == "true" for k in REPAIRS)
        cols.setdefault(col, (act_bits_order(r["act_bits"]), repairs, len(cols)))
        keys.setdefault(key, r)
        cell[key, col] = _fmt(r["top1"])
    methods = list(dict.fromkeys(m for m, _ in keys))
    cols = sorted(cols, key=cols.get)
    head = ["method", "N", "% mults elim. (ternary layers)", "bits/w"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(keys, key=lambda k: (k[0] != "fp", methods.index(k[0]), _size_rank(k[1]))):
        r = keys[key]
        lines.append("| " + " | ".join(
            [key[0], key[1], _fmt(r["quantized_mult_eliminated_pct"]), _fmt(r["bits_per_weight"])]
            + [cell.get((key, c), "") for c in cols]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("csv", help="a results CSV")
    parser.add_argument("--pivot", action="store_true", help="compact sweep view")
    args = parser.parse_args(argv)
    rows = read_csv(args.csv)
    if not rows:
        raise SystemExit(f"report: {args.csv!r} is missing or empty")
    if args.pivot:
        print(pivot(rows))
    else:
        columns = FINETUNE_COLUMNS if "top1_final" in rows[0] else SWEEP_COLUMNS
        print(table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
