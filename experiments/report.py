"""Markdown tables of committed sweep / fine-tuning results (what results/README.md shows).

    python -m experiments.report results/cifar10_jpeg/resnet20/sweep_exact.csv [--pivot]
    python -m experiments.report results/cifar10_jpeg/resnet20/finetune_resnet20_n64.csv
    python -m experiments.report results/cifar10_jpeg/resnet20/{sweep_exact,reconstruct_grid}.csv \
        --where method=exact --where act_bits=8,4 --where bn_reestimate=true --pivot \
        --plot results/cifar10_jpeg/resnet20/reconstruct_before_after

--pivot: one row per (method, N), one top-1 column per (activation bits, repairs) — the compact view
of a sweep. Without it, the rows as they are, with the most useful columns. Several CSVs are read as
one list of rows (a column one file lacks reads as empty, a repair it lacks as off); --where keeps
the rows whose column has one of the given values; --plot draws those rows as sweep curves (one per
activation precision, method and repairs: a before/after figure from two files).
"""
from __future__ import annotations

import argparse
import sys

from fgq_jax.fileio import read_csv
from fgq_jax.recipe import REPAIRS
from fgq_jax.results import act_bits_order, repairs_label

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


def _repairs(r) -> str:
    return repairs_label(r) or "none"


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


def parse_where(spec: str) -> tuple[str, set[str]]:
    """``"act_bits=8,4"`` -> ``("act_bits", {"8", "4"})``."""
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise SystemExit(f"report: --where {spec!r} is not COLUMN=VALUE[,VALUE...]")
    return key, set(values.split(","))


def select(rows, where) -> list[dict]:
    """The rows whose every ``where`` column holds one of its values (a missing repair column reads
    as "false", any other missing column as "")."""
    def value(r, key):
        return r.get(key) or ("false" if key in REPAIRS else "")
    return [r for r in rows if all(value(r, k) in vs for k, vs in where)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("csv", nargs="+", help="results CSVs (read as one list of rows)")
    parser.add_argument("--pivot", action="store_true", help="compact sweep view")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=V1[,V2...]",
                        help="keep rows whose COLUMN is one of the values (repeatable: all must hold)")
    parser.add_argument("--plot", metavar="OUT_BASE",
                        help="also draw the rows to OUT_BASE_mults.png and OUT_BASE_bits.png")
    parser.add_argument("--title", default="", help="plot title")
    args = parser.parse_args(argv)
    where = [parse_where(w) for w in args.where]
    rows = []
    for path in args.csv:
        got = read_csv(path)
        if not got:
            raise SystemExit(f"report: {path!r} is missing or empty")
        rows += got
    rows = select(rows, where)
    if not rows:
        raise SystemExit(f"report: no row of {args.csv} matches {args.where}")
    if args.plot:
        from fgq_jax.plots import plot_sweep  # matplotlib only when asked
        for path in plot_sweep(rows, args.plot, title=args.title):
            print(f"wrote {path}", file=sys.stderr)
    if args.pivot:
        print(pivot(rows))
    else:
        columns = FINETUNE_COLUMNS if "top1_final" in rows[0] else SWEEP_COLUMNS
        print(table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
