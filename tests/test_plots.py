"""fgq_jax.plots: the sweep figures (top-1 vs multiplications eliminated / bits per weight)."""
from __future__ import annotations

import matplotlib.pyplot as plt

from fgq_jax import plots


def _row(method, n, bits, repaired, top1, mults, bpw):
    flag = "true" if repaired else "false"
    return {"method": method, "group_size": n, "act_bits": bits, "first_last": "fp",
            "bn_reestimate": flag, "bias_correct": flag, "scale_fit": "false", "top1": str(top1),
            "mult_eliminated_pct": str(mults), "bits_per_weight": str(bpw)}


def test_plot_sweep_curves_in_reading_order(tmp_path, monkeypatch):
    # completion order of a resumed sweep: 4-bit first, FP activations last
    rows = [_row("exact", n, bits, rep, 50 + i, m, b)
            for bits in ("4", "8", "fp") for rep in (True, False)
            for i, (n, m, b) in enumerate((("64", 98.2, 2.26), ("4", 75.0, 6.0)))]
    rows += [_row("fp", "fp", bits, False, 81, 0.0, 32.0) for bits in ("4", "fp", "8")]
    figs = []
    monkeypatch.setattr(plots.plt, "close", figs.append)
    paths = plots.plot_sweep(rows, tmp_path / "sub" / "exp", title="resnet20")
    assert [p.name for p in paths] == ["exp_mults.png", "exp_bits.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert not list((tmp_path / "sub").glob(".*"))  # no temporary files left
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["FP activations, exact", "FP activations, exact, BN+bias",
                      "8-bit activations, exact", "8-bit activations, exact, BN+bias",
                      "4-bit activations, exact", "4-bit activations, exact, BN+bias"]
    # points of a curve joined in x order, labelled with N; one dotted FP line per act precision
    line = ax.get_lines()[3]
    assert list(line.get_xdata()) == [75.0, 98.2]
    assert sorted(t.get_text() for t in ax.texts[:2]) == ["4", "64"]
    assert sum(ln.get_linestyle() == ":" for ln in ax.get_lines()) == 3
    monkeypatch.undo()  # the real plt.close again
    for f in figs:
        plt.close(f)
