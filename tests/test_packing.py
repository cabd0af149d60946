"""Tests for fgq_jax.packing: 2-bit packing, orbax export round trip, atomicity, sizes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import packing
from fgq_jax.packing import (
    export_size_report,
    load_ternary,
    pack_codes,
    packed_size,
    save_ternary,
    unpack_codes,
)


def random_codes(shape, seed=0, p=(0.3, 0.4, 0.3)):
    return np.random.default_rng(seed).choice(np.array([-1, 0, 1], np.int8), size=shape, p=p)


def listdir(d):
    return sorted(os.listdir(d))


# ------------------------------------------------------------------------------------ pack/unpack
def test_byte_layout():
    # code i -> bits 2*(i%4) of byte i//4; 0 -> 00, +1 -> 01, -1 -> 11
    packed = pack_codes(np.array([1, -1, 0, 1, -1], np.int8))
    assert packed.dtype == np.uint8
    assert packed.tolist() == [0b01_00_11_01, 0b11]
    np.testing.assert_array_equal(unpack_codes(packed, (5,)), [1, -1, 0, 1, -1])


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (4,), (5,), (7,), (13, 3), (3, 3, 5, 7), (2, 1, 1, 9)])
def test_round_trip_odd_sizes(shape):
    codes = random_codes(shape, seed=sum(shape))
    packed = pack_codes(codes)
    assert packed.shape == (packed_size(codes.size),) == (-(-codes.size // 4),)
    back = unpack_codes(packed, shape)
    assert back.dtype == np.int8 and back.shape == shape
    np.testing.assert_array_equal(back, codes)
    # jax path gives the same bytes, also under jit
    jp = jax.jit(pack_codes)(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(jp), packed)
    ju = jax.jit(lambda p: unpack_codes(p, shape))(jp)
    np.testing.assert_array_equal(np.asarray(ju), codes)


def test_extreme_patterns_and_wider_int_dtypes():
    for fill in (-1, 0, 1):
        c = np.full((11,), fill, np.int32)
        np.testing.assert_array_equal(unpack_codes(pack_codes(c), c.shape), c)
    big = random_codes((1000, 37), seed=3)
    np.testing.assert_array_equal(unpack_codes(pack_codes(big.astype(np.int64)), big.shape), big)
    assert pack_codes(np.zeros((0,), np.int8)).shape == (0,)


def test_pack_errors():
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_codes(np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_codes(jnp.array([-2, 0], jnp.int8))
    with pytest.raises(TypeError, match="integer"):
        pack_codes(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(np.zeros(2, np.uint8), (9,))
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(np.zeros(3, np.int8), (9,))
    with pytest.raises(ValueError, match="0b10"):
        unpack_codes(np.array([0b10], np.uint8), (1,))
    # padding fields beyond the last code are not checked
    np.testing.assert_array_equal(unpack_codes(np.array([0b10_00_00_01], np.uint8), (3,)), [1, 0, 0])


# --------------------------------------------------------------------------- plain-array export
def plain_tree():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "conv_init": {"kernel": rng.normal(size=(3, 3, 3, 5)).astype(np.float32),
                          "bias": jnp.arange(5, dtype=jnp.float32)},
            "blocks": [{"scale": np.float32(2.5) * np.ones((), np.float32)},
                       {"count": np.arange(7, dtype=np.int64)}],
        },
        "batch_stats": {"bn": {"mean": rng.normal(size=(5,)).astype(np.float16),
                               "empty": np.zeros((0, 3), np.float32)}},
        "note": "fp first/last",
        "step": 7,
    }


def test_plain_tree_round_trip(tmp_path):
    tree = plain_tree()
    out = save_ternary(tmp_path / "export", tree)
    assert out == (tmp_path / "export").absolute()
    back = load_ternary(out)
    # nested dicts and lists rebuilt, values and dtypes exact
    assert back["note"] == "fp first/last" and back["step"] == 7
    assert isinstance(back["params"]["blocks"], list) and len(back["params"]["blocks"]) == 2
    for (p1, a), (p2, b) in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    ):
        assert jax.tree_util.keystr(p1) == jax.tree_util.keystr(p2)
        if isinstance(a, str | int):
            assert a == b
            continue
        a = np.asarray(a)
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
    # with a target, the exact tree type comes back
    t2 = load_ternary(out, target=tree)
    assert jax.tree_util.tree_structure(t2) == jax.tree_util.tree_structure(tree)
    # nothing but the export itself in the parent (no temporary leftovers)
    assert listdir(tmp_path) == ["export"]


def test_target_mismatch(tmp_path):
    save_ternary(tmp_path / "e", {"a": np.ones(3)})
    with pytest.raises(ValueError, match="leaves"):
        load_ternary(tmp_path / "e", target={"a": 1, "b": 2})


# ----------------------------------------------------------------------------------------- errors
def test_existing_path_is_an_error(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for name in ("dir", "file"):
        with pytest.raises(FileExistsError, match="already exists"):
            save_ternary(tmp_path / name, {"a": np.ones(3)})
    assert listdir(tmp_path) == ["dir", "file"]
    assert listdir(tmp_path / "dir") == [] and (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            save_ternary(ro / "export", {"a": np.ones(3)})
        assert listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_unwritable_parent(tmp_path, monkeypatch):
    # (works as root too: os.access is what decides writability up front)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(packing.os, "access", lambda p, m: False if str(p) == str(ro) else real_access(p, m))
    with pytest.raises(PermissionError, match="not writable"):
        save_ternary(ro / "sub" / "export", {"a": np.ones(3)})
    assert listdir(ro) == []  # the missing parent "sub" was not created either


def test_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_ternary(tmp_path / "f" / "export", {"a": np.ones(3)})


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(self, directory, *a, **k):
        os.makedirs(directory)
        (directory / "partial").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_ternary(tmp_path / "new" / "deeper" / "export", {"a": np.ones(3)})
    assert listdir(tmp_path) == []  # temp dir and the parents created for the export are gone


def test_bad_leaves_and_options(tmp_path):
    with pytest.raises(TypeError):
        save_ternary(tmp_path / "e", {"a": object()})
    with pytest.raises(ValueError, match="scale_dtype"):
        save_ternary(tmp_path / "e", {"a": np.ones(3)}, scale_dtype="int8")
    assert listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        load_ternary(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not a ternary export"):
        load_ternary(tmp_path / "junk")


def test_size_report_plain(tmp_path):
    tree = {"w": np.ones((100, 10), np.float32)}
    save_ternary(tmp_path / "e", tree)
    rep = export_size_report(tmp_path / "e")
    assert rep["num_weights"] == 1000 and rep["num_ternary_weights"] == 0
    assert rep["bytes_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "e").rglob("*") if f.is_file())
    assert rep["bits_per_weight_on_disk"] == pytest.approx(8 * rep["bytes_on_disk"] / 1000)


# ------------------------------------------------------------------------------- TernaryTensor
try:
    from fgq_jax import ternary
except ImportError:  # developed in parallel; the primitives above do not need it
    ternary = None
needs_ternary = pytest.mark.skipif(ternary is None, reason="fgq_jax.ternary not available")


def ternary_tree():
    rng = np.random.default_rng(1)
    def k(*s):
        return jnp.asarray(rng.normal(size=s), jnp.float32)

    return {
        "params": {
            "conv_init": {"kernel": k(3, 3, 3, 8), "bias": k(8)},  # FP first layer
            "conv_a": {"kernel": ternary.ternarize(k(3, 3, 5, 7), 4)},  # L=45: last group shorter
            "conv_b": {"kernel": ternary.ternarize(k(3, 3, 6, 4), 64, method="twn", asymmetric=True)},
            "conv_c": {"kernel": ternary.ternarize(k(3, 3, 4, 3), None, grouping="kernel")},
            "conv_d": {"kernel": ternary.ternarize(k(1, 1, 9, 5), None)},  # per tensor
            "fc": {"kernel": ternary.ternarize(k(13, 6), "channel", method="absmean")},
            "fc2": {"kernel": ternary.ternarize(k(7, 3), 2, method="binary")},
        },
        "batch_stats": {"bn": {"mean": k(8), "var": jnp.abs(k(8))}},
    }


def is_tt(x):
    return isinstance(x, ternary.TernaryTensor)


@needs_ternary
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_ternary_round_trip(tmp_path, scale_dtype):
    tree = ternary_tree()
    save_ternary(tmp_path / "e", tree, scale_dtype=scale_dtype)
    back = load_ternary(tmp_path / "e")
    sdt = np.float16 if scale_dtype == "float16" else np.float32
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_tt)
    flat_back = jax.tree_util.tree_leaves_with_path(back, is_leaf=is_tt)
    assert [jax.tree_util.keystr(p) for p, _ in flat] == [jax.tree_util.keystr(p) for p, _ in flat_back]
    n_tt = 0
    for (_, a), (_, b) in zip(flat, flat_back):
        if is_tt(a):
            n_tt += 1
            assert is_tt(b)
            assert (b.shape, b.group_size, b.grouping, b.method) == (a.shape, a.group_size, a.grouping, a.method)
            assert b.codes.dtype == jnp.int8 and b.scales.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(b.codes), np.asarray(a.codes))
            np.testing.assert_array_equal(np.asarray(b.scales), np.asarray(a.scales).astype(sdt).astype(np.float32))
            assert (a.neg_scales is None) == (b.neg_scales is None)
            if a.neg_scales is not None:
                np.testing.assert_array_equal(
                    np.asarray(b.neg_scales), np.asarray(a.neg_scales).astype(sdt).astype(np.float32)
                )
            tol = 1e-3 if scale_dtype == "float16" else 1e-7
            np.testing.assert_allclose(b.dequantize(), a.dequantize(), rtol=tol, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert n_tt == 6
    # with the original as target: identical tree structure (TernaryTensor nodes included)
    t2 = load_ternary(tmp_path / "e", target=tree)
    assert jax.tree_util.tree_structure(t2) == jax.tree_util.tree_structure(tree)
    # a bare TernaryTensor works too
    single = tree["params"]["conv_a"]["kernel"]
    save_ternary(tmp_path / "single", single)
    s = load_ternary(tmp_path / "single")
    assert is_tt(s)
    np.testing.assert_array_equal(np.asarray(s.codes), np.asarray(single.codes))


@needs_ternary
@pytest.mark.parametrize("n,expected_bits", [(4, 6.0), (64, 2.25), ("channel", 2 + 16 / 576)])
def test_size_report_bits_per_weight(tmp_path, n, expected_bits):
    kernel = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 64, 64)), jnp.float32)
    tt = ternary.ternarize(kernel, n)
    save_ternary(tmp_path / "e", {"conv": {"kernel": tt}})
    rep = export_size_report(tmp_path / "e")
    assert rep["num_ternary_weights"] == 36864
    assert rep["ternary_payload_bytes"] == 36864 // 4 + 2 * tt.scales.size
    assert rep["bits_per_ternary_weight"] == pytest.approx(expected_bits)
    # measured on disk: close to the payload (orbax adds a few KiB of container) and far below fp32
    assert rep["bytes_on_disk"] < rep["ternary_payload_bytes"] + 64 * 1024
    assert rep["compression"] > 2.5
