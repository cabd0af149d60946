"""Tests for fgq_jax.tt_head: feature capture, configuration checks and the rows' accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import tt, tt_head
from fgq_jax.models import CifarResNet


def _random_variables(model, shape, seed=0):
    """Random variables without compiling an init: kernels N(0, 0.2^2), 1-D leaves U(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2 if len(s.shape) > 1
                                   else rng.uniform(0.5, 1.5, s.shape)).astype(np.float32), shapes)


def test_extract_features_captures_the_global_pool_input():
    model = CifarResNet(depth=14, widths=(4, 8, 16))  # 2 blocks per stage: stage3_block0 fits too
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    variables = _random_variables(model, (32, 32, 3))
    feats, logits = tt_head.extract_features(model, variables, images, "stage3_block1", batch_size=2)
    assert feats.shape == (3, 8 * 8 * 16) and feats.dtype == np.float32 and logits.shape == (3, 10)
    fc = variables["params"]["fc"]
    pooled = feats.reshape(3, 8, 8, 16).mean(axis=(1, 2))  # (h, w, c) order
    np.testing.assert_allclose(pooled @ fc["kernel"] + fc["bias"], logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'stage3_block0' does not reproduce the logits"):
        tt_head.extract_features(model, variables, images, "stage3_block0", batch_size=2)


def test_config_rejects_inconsistent_modes():
    with pytest.raises(ValueError, match=r"prod\(out_modes=\(4, 8, 8, 4\)\) = 1024 != hidden = 1000"):
        tt_head.TTHeadConfig(hidden=1000)
    with pytest.raises(ValueError, match="same length"):
        tt_head.TTHeadConfig(in_modes=(64, 64), out_modes=(4, 8, 8, 4))
    with pytest.raises(ValueError, match="start and end with 1"):
        tt_head.TTHeadConfig(ranks=((2, 4, 4, 4, 1),))


def test_rows_count_storage_and_compression():
    cfg = tt_head.TTHeadConfig()
    dense_bits, other = 32 * 4096 * 1024, 32 * (1024 + 1024 * 10 + 10)
    fp = tt_head._row(cfg, "dense", None, None, "trained", 80.0, 4096, 10)
    assert fp["fc1_bits"] == dense_bits and fp["fc1_compression"] == 1.0 and fp["head_compression"] == 1.0
    # dense ternary N=4: 2-bit codes + one fp16 scale per 4 weights = 6 bits per weight
    d4 = tt_head._row(cfg, "dense", None, 4, "ptq", 80.0, 4096, 10)
    assert d4["fc1_bits"] == 6 * 4096 * 1024 and d4["fc1_compression"] == pytest.approx(32 / 6)
    t4 = tt_head._row(cfg, "tt_ternary", 8, 4, "ptq", 80.0, 4096, 10)
    bits = tt.tt_bits(cfg.in_modes, cfg.out_modes, 8, 4)
    assert t4["fc1_bits"] == bits and t4["fc1_params"] == 64 * 8 + 128 * 64
    assert t4["fc1_compression"] == pytest.approx(dense_bits / bits)
    assert t4["head_compression"] == pytest.approx((dense_bits + other) / (bits + other))
    assert t4["fc1_macs"] == 24576 * 8 + 32768 * 64


def test_ternary_dense_head_uses_the_ternarized_kernel():
    head = tt_head.Head(8, 3, quant=tt_head.WeightQuant("exact", 4))
    rng = np.random.default_rng(1)
    params = {"kernel_fc1": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
              "bias_fc1": jnp.zeros(8), "fc2": {"kernel": jnp.eye(8, 3), "bias": jnp.zeros(3)}}
    x = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    from fgq_jax.ternary import ternarize

    want = jax.nn.relu(x @ ternarize(params["kernel_fc1"], 4).dequantize())[:, :3]
    np.testing.assert_allclose(head.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_config_file_and_cli_compression_table(tmp_path):
    from pathlib import Path

    from experiments import tt_head as cli
    from fgq_jax.configfile import load_config

    path = Path(__file__).resolve().parent.parent / "experiments/configs/tt_head_resnet20.py"
    assert path.read_text().startswith(f"# python -m experiments.tt_head --config experiments/configs/{path.name}\n")
    cfg = load_config(path, ["ranks=(2,)"], tt_head.TTHeadConfig)
    assert cfg.ranks == (2,) and cfg.hidden == 1024
    assert cli.main(["--compression-only", "--out", str(tmp_path)]) == 0
    assert "| vgg16 | TT4 TT4 FC | 37,732.8 | 37,732 | 7.35 | 7.4 |" in (tmp_path / "tt_compression.md").read_text()
    assert (tmp_path / "tt_compression.json").exists()
