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


def test_several_csvs_where_filters_and_a_before_after_plot(tmp_path, capsys):
    # the plot also needs the policy and the whole-network x axis, as a sweep's CSV has them
    rows = [dict(r, first_last="fp", mult_eliminated_pct=r["quantized_mult_eliminated_pct"])
            for r in _rows()]
    columns = (*COLUMNS, "first_last", "mult_eliminated_pct")
    before = tmp_path / "before.csv"
    write_csv(before, rows, columns)
    after_rows = [dict(r, reconstruct="true", top1="70.0000") for r in rows
                  if r["method"] == "exact" and r["bn_reestimate"] == "true"]
    after = tmp_path / "after.csv"
    write_csv(after, after_rows, (*columns, "reconstruct"))
    base = tmp_path / "plots" / "before_after"
    argv = [str(before), str(after), "--where", "method=exact", "--where", "act_bits=8,4",
            "--where", "bn_reestimate=true", "--pivot", "--plot", str(base)]
    assert report.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # the before file has no reconstruct column: its rows read as "recon off", a column of their own
    assert lines[0].split(" | ")[4:] == ["a8 BN+bias", "a8 BN+bias+recon", "a4 BN+bias",
                                         "a4 BN+bias+recon |"]
    assert len(lines) == 2 + 4  # exact at N = 2, 16, channel, tensor; no twn, no fp
    assert all(line.split(" | ")[5] == "70.00" for line in lines[2:])
    assert (tmp_path / "plots" / "before_after_mults.png").stat().st_size > 0
    assert (tmp_path / "plots" / "before_after_bits.png").stat().st_size > 0


def test_bad_where_and_no_match_are_clear_errors(tmp_path):
    path = tmp_path / "r.csv"
    write_csv(path, _rows(), COLUMNS)
    with pytest.raises(SystemExit, match="not COLUMN=VALUE"):
        report.main([str(path), "--where", "act_bits"])
    with pytest.raises(SystemExit, match="matches"):
        report.main([str(path), "--where", "method=nonesuch"])
