"""Smoke test of benchmarks/compare_qwix.py: tiny run (100 test images), table rows and files."""
import csv
from pathlib import Path

import pytest

from fgq_jax.data import default_shared_dir
from fgq_jax.recipe import QuantRecipe

SHARED = default_shared_dir()
CKPT = SHARED / "models" / "cifar-resnet" / "resnet20-12fca82f.th"
pytestmark = [
    pytest.mark.skipif(
        not (CKPT.exists() and (SHARED / "data" / "cifar10-jpeg" / "test.tar.gz").exists()),
        reason=f"shared weights/data not found under {SHARED}",
    ),
]
qwix = pytest.importorskip("qwix")


def test_tiny_comparison(tmp_path):
    from benchmarks import compare_qwix as cq

    cfg = cq.CompareConfig(
        group_sizes=(4,),
        fp_rows=("fp32",),
        fgq_rows=("weight-only",),  # no activation calibration: keeps the test fast
        qwix_modes=("w8a8-dynamic", "w8a8-static", "w4a8-dynamic", "w4-weight-only"),
        recipe=QuantRecipe.make(num_calib=32, num_repair=32, num_fit=32),
        test_subset=100,
        batch_size=50,
        throughput_images=100,
        repeats=1,
    )
    rows = cq.run_comparison(cfg, log=lambda s: None)
    by = {r["config"]: r for r in rows}
    assert list(by) == ["fp32", "FGQ N=4 weight-only", "qwix w8a8-dynamic", "qwix w8a8-static",
                        "qwix w4a8-dynamic", "qwix w4-weight-only"]
    fp = by["fp32"]
    assert fp["status"] == "ok" and fp["num_test"] == 100 and fp["top1"] > 60
    for name in ("qwix w8a8-dynamic", "qwix w8a8-static"):
        r = by[name]
        assert r["status"] == "ok", r["note"]
        assert abs(r["top1"] - fp["top1"]) <= 3.0, (name, r["top1"], fp["top1"])
        assert r["eval_images_per_s"] > 0 and r["throughput_vs_fp32"] > 0
        assert 8.0 < r["bits_per_weight"] < 8 + 32 / 144  # 8-bit codes + one fp32 scale per channel
    # the int4-weight x int8-activation conv PTQ is refused by qwix: recorded, not raised
    fail = by["qwix w4a8-dynamic"]
    assert fail["status"] == "failed" and "act_qtype" in fail["note"] and fail.get("top1") is None
    assert by["qwix w4-weight-only"]["status"] == "ok"
    fgq = by["FGQ N=4 weight-only"]
    assert fgq["status"] == "ok" and fgq["bits_per_weight"] == pytest.approx(6.0, abs=0.01)

    csv_path, md_path = cq.write_outputs(rows, cfg, tmp_path, "python -m benchmarks.compare_qwix --tiny")
    assert (csv_path.name, md_path.name) == ("qwix_comparison.csv", "qwix_comparison.md")
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["config"] for t in table] == list(by)
    assert tuple(table[0]) == cq.COLUMNS
    md = md_path.read_text()
    assert "python -m benchmarks.compare_qwix --tiny" in md and '"git_revision"' in md
    assert md.count("\n| ") == len(rows) + 1  # header + one line per row
    assert not list(Path(tmp_path).glob(".*.tmp"))  # atomic writes left no temporaries


def test_qwix_kernels_are_per_channel():
    """The bits column assumes qwix's conv layout: one fp32 scale per output channel."""
    import jax.numpy as jnp
    from benchmarks import compare_qwix as cq
    from fgq_jax.loading import load_model

    spec, v = load_model("resnet20", cq.DEFAULT_CHECKPOINT)
    _, qv = cq.build_qwix(spec, v, "w8a8-dynamic", None)
    kernels = cq.qwix_quantized_kernels(qv["params"])
    assert len(kernels) == 18 and "conv_init" not in kernels and "fc" not in kernels
    for path, qa in kernels.items():
        cout = qa.qvalue.shape[-1]
        assert qa.qvalue.dtype == jnp.int8 and qa.scale.dtype == jnp.float32
        assert qa.scale.shape == (1, 1, 1, cout), path
