"""experiments.report: markdown tables of results CSVs; the pivot sorts what resumed sweeps append
in completion order."""
from __future__ import annotations

import random

import pytest

from experiments import report
from fgq_jax.fileio import write_csv

COLUMNS = ("method", "group_size", "act_bits", "bn_reestimate", "bias_correct", "scale_fit", "top1",
           "quantized_mult_eliminated_pct", "bits_per_weight")


def _row(method, n, bits, repaired, top1):
    flag = "true" if repaired else "false"
    return {"method": method, "group_size": n, "act_bits": bits, "bn_reestimate": flag,
            "bias_correct": "false" if method == "fp" else flag, "scale_fit": "false", "top1": top1,
            "quantized_mult_eliminated_pct": "0.0000" if n in ("fp", "1") else "75.0000",
            "bits_per_weight": "6.0000"}


def _rows():
    rows = [_row("fp", "fp", b, r, f"{80 + i}.0000") for i, (b, r) in
            enumerate([("fp", False), ("fp", True), ("8", False), ("4", False)])]
    rows += [_row(m, n, b, r, f"{10 + i}.5000") for i, (m, n, b, r) in enumerate(
        (m, n, b, r) for m in ("exact", "twn") for n in ("tensor", "16", "2", "channel")
        for b in ("4", "fp", "8") for r in (False, True))]
    return rows


def test_pivot_sorts_rows_and_columns_whatever_the_order():
    rows = _rows()
    expected = report.pivot(rows)
    for seed in range(3):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        got = report.pivot(shuffled)
        # methods keep their first-appearance order, so compare the exact-only tables
        only = [r for r in shuffled if r["method"] in ("fp", "exact")]
        assert report.pivot(only) == report.pivot([r for r in rows if r["method"] in ("fp", "exact")])
        assert sorted(got.splitlines()) == sorted(expected.splitlines())
    lines = expected.splitlines()
    assert lines[0].split(" | ")[4:] == ["afp none", "afp BN", "afp BN+bias", "a8 none",
                                         "a8 BN+bias", "a4 none", "a4 BN+bias |"]
    keys = [tuple(line.split(" | ")[:2]) for line in lines[2:]]
    assert keys == [("| fp", "fp")] + [(f"| {m}", n) for m in ("exact", "twn")
                                       for n in ("2", "16", "channel", "tensor")]
    fp = lines[2].split(" | ")
    assert fp[4:8] == ["80.00", "81.00", "", "82.00"]  # FP reference: no bias-correction column


def test_cli_table_and_pivot(tmp_path, capsys):
    path = tmp_path / "r.csv"
    write_csv(path, _rows(), COLUMNS)
    assert report.main([str(path), "--pivot"]) == 0
    assert "| exact | 16 | 75.00 | 6.00 |" in capsys.readouterr().out
    assert report.main([str(path)]) == 0
    assert capsys.readouterr().out.startswith("| method | group_size | act_bits |")
    with pytest.raises(SystemExit, match="missing or empty"):
        report.main([str(tmp_path / "absent.csv")])
