"""matplotlib figures of sweep results (rows as read back from the CSV: all values are strings)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on batch machines
import matplotlib.pyplot as plt  # noqa: E402

from fgq_jax.results import act_bits_order, repairs_label  # noqa: E402

ACT_STYLE = {"fp": ("tab:blue", "FP activations"), "8": ("tab:orange", "8-bit activations"),
             "4": ("tab:green", "4-bit activations"), "2": ("tab:red", "2-bit activations")}


def _curves(rows):
    """{(act_bits, method, first_last, repairs): [rows]} of the quantized points."""
    curves = defaultdict(list)
    for r in rows:
        if r["method"] != "fp":
            curves[(r["act_bits"], r["method"], r["first_last"], repairs_label(r))].append(r)
    return curves


def plot_sweep(rows, out_base: Path, title: str = "") -> list[Path]:
    """Draw top-1 vs % multiplications eliminated and top-1 vs bits/weight; returns the PNG paths.

    One curve per (activation precision, method, first/last policy, repairs); points labelled with N;
    the full-precision reference as a horizontal line per activation precision.
    """
    out_base = Path(out_base)
    paths = []
    curves = sorted(_curves(rows).items(), key=lambda kv: (act_bits_order(kv[0][0]), kv[0][1:]))
    variants = sorted({key[1:] for key, _ in curves})
    for xcol, xlabel, suffix in (
        ("mult_eliminated_pct", "multiplications eliminated (% of network MACs)", "mults"),
        ("bits_per_weight", "bits per weight of the ternarized layers (incl. fp16 scales)", "bits"),
    ):
        fig, ax = plt.subplots(figsize=(8.5, 5.5))
        for r in rows:
            if r["method"] == "fp":
                color = ACT_STYLE.get(r["act_bits"], ("gray", ""))[0]
                ax.axhline(float(r["top1"]), color=color, lw=0.8, ls=":")
        styles = ["-", "--", "-.", (0, (1, 1)), (0, (5, 1))]
        for (act, method, fl, rep), pts in curves:
            pts = sorted(pts, key=lambda r: float(r[xcol]))
            color, act_label = ACT_STYLE.get(act, ("gray", f"{act}-bit"))
            ls = styles[variants.index((method, fl, rep)) % len(styles)]
            label = f"{act_label}, {method}" + (f", first/last {fl}" if fl != "fp" else "")
            label += f", {rep}" if rep else ""
            xs, ys = [float(r[xcol]) for r in pts], [float(r["top1"]) for r in pts]
            ax.plot(xs, ys, marker="o", ms=3.5, color=color, ls=ls, label=label)
            for r, x, y in zip(pts, xs, ys):
                ax.annotate(r["group_size"], (x, y), textcoords="offset points", xytext=(2, 3),
                            fontsize=6.5, color=color)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{title} — dotted lines: FP weights" if title else "dotted lines: FP weights",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = out_base.parent / f"{out_base.name}_{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=130)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths
