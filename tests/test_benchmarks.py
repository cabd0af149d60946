"""Smoke tests of the benchmark scripts (benchmarks are scripts, never timed tests: nothing here
asserts a speed). ``run_all --tiny`` runs the eval, export and train-step benchmarks on a tiny CNN in
subprocesses, exactly as ``make bench`` runs them, and the tables must have the expected rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TERNARIZE_STDOUT = """\
ResNet-50 kernel tree: 54 kernels (53 conv + 1 dense), 25.50M weights, 27 unique shapes
jax 0.10.2 on cpu, numpy 2.3.4, 2 CPUs, x86_64; repeats: jax 3, numpy 1
  N=4: done (err diff vs numpy 1.2e-07)

| N | compile+first run s | steady median s (min) | weights/s | numpy s | numpy/jax |
|---|---|---|---|---|---|
| 4 | 3.21 | 0.412 (0.398) | 62M | 5.120 | 12.4x |
| 64 | 2.80 | 0.655 (0.601) | 39M | 4.000 | 6.1x |
| None | 1.90 | 0.300 (0.290) | 85M | 1.000 | 3.3x |
"""


def test_parse_ternarize_table():
    from benchmarks.run_all import parse_ternarize, summary_rows

    res = parse_ternarize(TERNARIZE_STDOUT)
    rows = res["rows"]
    assert [r["N"] for r in rows] == ["4", "64", "tensor"]
    assert rows[0]["median_s"] == pytest.approx(0.412) and rows[0]["vs_numpy"] == pytest.approx(12.4)
    assert [r["met"] for r in rows] == [True, False, False]  # 0.655 s > 0.5 s; 3.3x < 5x
    assert res["notes"][0].startswith("ResNet-50 kernel tree")
    summ = summary_rows({"ternarize": res})
    assert len(summ) == 3 and summ[0]["benchmark"] == "ternarize"


def test_bench_ternarize_prints_the_parsed_format():
    """The row format run_all parses is the one bench_ternarize prints (source check, no run)."""
    src = (REPO / "benchmarks" / "bench_ternarize.py").read_text()
    assert "| N | compile+first run s | steady median s (min) | weights/s | numpy s | numpy/jax |" in src
    assert '{jm:.3f} ({jmin:.3f})' in src and "{wps / 1e6:.0f}M" in src and "{ratio:.1f}x" in src


def test_run_all_tiny(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--tiny", "--out", str(tmp_path), "--tag", "smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Side by side" in proc.stdout
    data = json.loads((tmp_path / "smoke.json").read_text())
    md = (tmp_path / "smoke.md").read_text()
    assert data["mode"] == "tiny" and not data["failed"]
    assert set(data["results"]) == {"eval", "export", "train"}

    ev = data["results"]["eval"]["rows"]
    assert [r["variant"] for r in ev] == ["fp32", "fake-n64", "integer-n64", "literal-n64"]
    assert all(r["model"] == "tiny" and r["images_per_s"] > 0 for r in ev)
    assert ev[0]["vs_fp32"] == pytest.approx(1.0)
    assert [r["target"] for r in ev] == [None, ">= 0.9x", ">= 1.2x", None]
    assert all(isinstance(r["met"], bool) for r in ev if r["target"])
    assert ev[0]["impl"] is None and ev[2]["impl"]  # the integer row names its per-layer executions

    ex = data["results"]["export"]["rows"]
    assert [(r["N"], r["policy"]) for r in ex] == [("4", "default"), ("4", "all"), ("64", "default"), ("64", "all")]
    for r in ex:
        assert r["export_disk_bytes"] > 0 and r["fp32_disk_bytes"] > 0
        assert r["ratio_raw"] > 1.0
    # fp16 scales: exactly 2 + 16/4 bits per ternary weight at N=4; about 2 + 16/64 (+ short last groups) at 64
    assert ex[0]["bits_per_ternary_weight"] == pytest.approx(6.0, abs=1e-6)
    assert 2.25 <= ex[2]["bits_per_ternary_weight"] < 2.5
    # ternarizing the first/last layers too can only shrink the payload
    assert ex[1]["export_raw_bytes"] < ex[0]["export_raw_bytes"]

    tr = data["results"]["train"]["rows"]
    assert [(r["step"], r["N"]) for r in tr] == [("fp", None), ("ternary STE", 64)]
    assert all(r["step_ms"] > 0 for r in tr) and tr[0]["vs_fp"] == pytest.approx(1.0)

    assert len(data["summary"]) == len(ev) + len(ex) + len(tr)
    for header in ("### Side by side", "### Eval throughput", "### Packed export size", "### Fine-tuning step time"):
        assert header in md


def test_gpu_check_script_parses():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--cpu" in out.stdout
    bad = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
