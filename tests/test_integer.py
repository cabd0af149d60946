"""Tests for fgq_jax.integer: folding FGQ into one int8 GEMM per layer, bit-exact emulation, the
paper's literal per-group form, and whole-model integer inference through method interception."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import integer as I
from fgq_jax.ternary import group_ids

DN = ("NHWC", "HWIO", "NHWC")

# Jitted layer functions (one compile per case instead of op-by-op dispatch): geometry is static.
_CONV_STATIC = ("strides", "padding", "kernel_dilation", "impl", "return_acc")
integer_conv = jax.jit(I.integer_conv, static_argnames=_CONV_STATIC)
emulate_integer_conv = jax.jit(I.emulate_integer_conv, static_argnames=_CONV_STATIC[:3] + ("return_acc",))
literal_group_conv = jax.jit(I.literal_group_conv, static_argnames=_CONV_STATIC[:3])
integer_dense = jax.jit(I.integer_dense, static_argnames=("return_acc",))
emulate_integer_dense = jax.jit(I.emulate_integer_dense, static_argnames=("return_acc",))
literal_group_dense = jax.jit(I.literal_group_dense)

# ------------------------------------------------------------------------------------------ ternarize
try:  # the real one once fgq_jax.ternary has landed
    from fgq_jax.ternary import ternarize as _ternarize
except ImportError:  # pragma: no cover - stand-in following docs/CONTRACT.md
    _ternarize = None


@dataclasses.dataclass
class _StandInTT:
    codes: np.ndarray
    scales: np.ndarray
    neg_scales: np.ndarray | None
    group_size: object
    grouping: str = "input"

    def dequantize(self, dtype=jnp.float32):
        gid = group_ids(self.codes.shape, self.group_size, self.grouping)
        L, K = gid.size, self.codes.shape[-1]
        G = gid.max() + 1
        a = np.broadcast_to(self.scales, (G, K))[gid]
        an = a if self.neg_scales is None else np.broadcast_to(self.neg_scales, (G, K))[gid]
        t = self.codes.reshape(L, K)
        w = np.where(t > 0, a, 0.0) - np.where(t < 0, an, 0.0)
        return jnp.asarray(w.reshape(self.codes.shape), dtype)


def _standin_ternarize(kernel, group_size, asymmetric=False, grouping="input"):
    """TWN-style per-group ternarization (threshold 0.7 mean|w|, scale = mean |w| of the kept)."""
    w = np.asarray(kernel, np.float64)
    L, K = int(np.prod(w.shape[:-1])), w.shape[-1]
    gid = group_ids(w.shape, group_size, grouping)
    G = gid.max() + 1
    w2 = w.reshape(L, K)
    shared = group_size is None and grouping == "input"
    codes = np.zeros((L, K), np.int8)
    sc = np.zeros((G, 1 if shared else K))
    nsc = np.zeros_like(sc)
    for g in range(G):
        rows = gid == g
        blk = w2[rows]  # [n, K]
        axis = None if shared else 0
        delta = 0.7 * np.mean(np.abs(blk), axis=axis)
        t = np.where(blk > delta, 1, np.where(blk < -delta, -1, 0)).astype(np.int8)
        codes[rows] = t
        pos, neg = t > 0, t < 0
        if asymmetric:
            sc[g] = np.sum(blk * pos, axis=axis) / np.maximum(np.sum(pos, axis=axis), 1)
            nsc[g] = -np.sum(blk * neg, axis=axis) / np.maximum(np.sum(neg, axis=axis), 1)
        else:
            sc[g] = np.sum(np.abs(blk) * (t != 0), axis=axis) / np.maximum(
                np.sum(t != 0, axis=axis), 1)
    return _StandInTT(codes.reshape(w.shape), sc.astype(np.float32),
                      nsc.astype(np.float32) if asymmetric else None, group_size, grouping)


def ternarize(kernel, group_size, asymmetric=False, grouping="input"):
    if _ternarize is not None:
        return _ternarize(jnp.asarray(kernel), group_size, "exact", asymmetric=asymmetric,
                          grouping=grouping)
    return _standin_ternarize(kernel, group_size, asymmetric, grouping)


def skip_unsupported(impl):
    if impl == "conv" and jax.default_backend() != "cpu":
        pytest.skip("cuDNN has no s8 x s8 -> s32 convolution (XLA: UNIMPLEMENTED); use impl='gemm'")


def rand_kernel(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rand_codes(shape, signed, seed=1):
    rng = np.random.default_rng(seed)
    if signed:
        return rng.integers(-127, 128, shape).astype(np.int8)
    return rng.integers(0, 256, shape).astype(np.uint8)


def ref_acc_conv(x, w_int, strides, padding, dilation=None, dtype=np.int64):
    """Independent reference conv in numpy (int64 accumulators, or float64 with dtype), one tap at
    a time — exact, and the same on every backend (cuDNN may use TF32/Winograd/FFT for floats)."""
    x, w = np.asarray(x, dtype), np.asarray(w_int, dtype)
    ks, nsp = w.shape[:-2], w.ndim - 2
    strides = tuple(strides)
    dilation = tuple(dilation or (1,) * nsp)
    if isinstance(padding, str):
        dk = [(k - 1) * d + 1 for k, d in zip(ks, dilation)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], dk, strides, padding)
    xp = np.pad(x, [(0, 0), *[tuple(p) for p in padding], (0, 0)])
    out = [(s - (k - 1) * d - 1) // st + 1 for s, k, d, st in zip(xp.shape[1:-1], ks, dilation, strides)]
    acc = np.zeros((x.shape[0], *out, w.shape[-1]), dtype)
    for tap in np.ndindex(*ks):
        sl = tuple(slice(t * d, t * d + (o - 1) * st + 1, st)
                   for t, d, o, st in zip(tap, dilation, out, strides))
        acc += xp[(slice(None), *sl)] @ w[tap]
    return acc


GROUPS = [1, 4, 7, 64, "channel", None]  # 7 does not divide L = 3*3*12 = 108


# ------------------------------------------------------------------------------------------ folding
@pytest.mark.parametrize(
    "group_size,grouping,asymmetric",
    [(g, "input", False) for g in GROUPS]
    + [(7, "input", True), ("channel", "input", True), (None, "kernel", False), (None, "kernel", True)],
)
def test_fold_multipliers_and_error_bound(group_size, grouping, asymmetric):
    tt = ternarize(rand_kernel((3, 3, 12, 10)), group_size, asymmetric=asymmetric, grouping=grouping)
    iw = I.fold_ternary(tt)
    assert iw.kernel.dtype == jnp.int8 and iw.kernel.shape == (3, 3, 12, 10)
    s = np.asarray(iw.scale)
    for alpha, m in [(iw.alphas, iw.multipliers)] + (
        [(iw.neg_alphas, iw.neg_multipliers)] if asymmetric else []
    ):
        a, m = np.asarray(alpha), np.asarray(m).astype(np.int64)
        pos = a > 0
        assert np.all((m[pos] >= 1) & (m[pos] <= 127)), "rounded multipliers must lie in [1, 127]"
        assert np.all(m[~pos] == 0)
        # bound |m s - alpha| <= s/2 for every group that is not clipped up to 1
        sk = np.broadcast_to(s, a.shape)
        ok = a >= sk / 2
        err = np.abs(m * sk.astype(np.float64) - a)
        assert np.all(err[ok] <= sk[ok] / 2 * (1 + 1e-5) + 1e-12)
        assert np.all(m[pos & ~ok] == 1)
    # the largest group of every (non-empty) channel gets multiplier 127
    mall = np.asarray(iw.multipliers)
    if asymmetric:
        mall = np.maximum(mall, np.asarray(iw.neg_multipliers))
    nz = s > 0
    assert np.all(mall.max(axis=0)[nz] == 127)
    # our reading of the grouping rule agrees with the TernaryTensor's own dequantize
    np.testing.assert_allclose(I._ternary_float_kernel(iw), np.asarray(tt.dequantize()), rtol=1e-6)
    # the int8 kernel is m_g * t, and s_k * W_int is the rounded ternary kernel
    np.testing.assert_array_equal(np.sign(np.asarray(iw.kernel)), np.asarray(tt.codes))
    w_t = np.asarray(tt.dequantize())
    w_r = np.asarray(I.rounded_fake_quant(tt))
    np.testing.assert_allclose(w_r, np.asarray(iw.dequantize()))
    step = np.broadcast_to(s, w_t.shape)
    assert np.all(np.abs(w_r - w_t) <= step * (1 + 1e-5))
    rep = iw.report()
    assert rep["groups"] > 0 and rep["max_err_over_step"] <= 1.0
    if rep["clipped"] == 0:
        assert rep["max_err_over_step"] <= 0.5 + 1e-5
    assert rep["weight_rel_err"] < 0.05


def test_fold_clips_tiny_groups_and_zero_groups():
    codes = np.ones((8, 2), np.int8)
    scales = np.array([[1.0, 0.0], [0.001, 0.0]], np.float32)  # group 2 of ch 0 tiny; ch 1 all-zero
    tt = _StandInTT(codes, scales, None, 4)
    iw = I.fold_ternary(tt)
    np.testing.assert_array_equal(np.asarray(iw.multipliers), [[127, 0], [1, 0]])
    np.testing.assert_allclose(np.asarray(iw.scale), [1.0 / 127, 0.0])
    rep = iw.report()
    assert rep["clipped"] == 1 and rep["groups"] == 2
    assert 0.5 < rep["max_err_over_step"] < 1.0
    y = integer_dense(np.full((3, 8), 10, np.uint8), iw, 0.5)
    np.testing.assert_allclose(np.asarray(y[:, 1]), 0.0)


def test_fold_int8_recovers_codes():
    w = rand_kernel((3, 3, 5, 6), 3)
    s = np.abs(w.reshape(-1, 6)).max(0) / 127
    q = np.clip(np.round(w / s), -127, 127)
    iw = I.fold_int8(q * s)
    np.testing.assert_array_equal(np.asarray(iw.kernel), q.astype(np.int8))
    np.testing.assert_allclose(np.asarray(iw.scale), s, rtol=1e-6)


# ------------------------------------------------------------------------------------------ bit-exact
CONV_CASES = [  # (group_size, signed, strides, padding, impl)
    (4, False, (1, 1), "SAME", "gemm"),
    (4, False, (1, 1), ((1, 1), (1, 1)), "conv"),
    (7, False, (2, 2), "SAME", "gemm"),
    (7, True, (2, 2), "VALID", "conv"),
    (1, True, (1, 1), "SAME", "gemm"),
    (64, False, (2, 1), ((0, 2), (1, 0)), "gemm"),
    (64, True, (2, 1), ((0, 2), (1, 0)), "im2col"),
    (4, False, (1, 1), "SAME", "im2col"),
    (None, False, (1, 1), "VALID", "conv"),
    ("channel", True, (1, 1), "SAME", "gemm"),
]


@pytest.mark.parametrize("group_size,signed,strides,padding,impl", CONV_CASES)
def test_integer_conv_bit_exact_with_emulation(group_size, signed, strides, padding, impl):
    skip_unsupported(impl)
    tt = ternarize(rand_kernel((3, 3, 12, 10), 5), group_size)
    iw = I.fold_ternary(tt)
    x = rand_codes((2, 9, 8, 12), signed)
    acc = integer_conv(x, iw, 0.05, strides, padding, impl=impl, return_acc=True)
    emu = emulate_integer_conv(x, iw, 0.05, strides, padding, return_acc=True)
    assert acc.dtype == jnp.int32 and emu.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(emu))
    np.testing.assert_array_equal(np.asarray(acc), ref_acc_conv(x, iw.kernel, strides, padding))
    # same accumulators + same single rescale -> identical float outputs
    bias = np.linspace(-1, 1, 10).astype(np.float32)
    y = integer_conv(x, iw, 0.05, strides, padding, impl=impl, bias=bias)
    ye = emulate_integer_conv(x, iw, 0.05, strides, padding, bias=bias)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ye))
    # and the rescaled output is the float conv of dequantized codes with the rounded kernel
    ref = ref_acc_conv(x * 0.05, iw.dequantize(), strides, padding, dtype=np.float64) + bias
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)


ALL_CONV_IMPLS = ["gemm", "im2col", "conv", "conv2", "conv4", "fconv", "auto"]


def _impl_cases():
    # (kshape, xshape, strides, padding, dilation, impls): narrow ResNet-20-like layers where every
    # packing fits, odd widths / asymmetric pads / dilation where only some do
    return [
        ((3, 3, 16, 16), (2, 8, 8, 16), (1, 1), "SAME", (1, 1), ALL_CONV_IMPLS + ["conv8"]),
        ((3, 3, 16, 32), (2, 8, 8, 16), (2, 2), "SAME", (1, 1), ALL_CONV_IMPLS),
        ((3, 3, 8, 12), (2, 9, 8, 8), (2, 2), ((1, 0), (0, 2)), (1, 1), ALL_CONV_IMPLS),
        ((3, 2, 12, 6), (2, 11, 12, 12), (1, 2), "SAME", (1, 1), ALL_CONV_IMPLS),
        ((2, 3, 4, 6), (1, 7, 9, 4), (1, 1), "VALID", (2, 1), ["gemm", "conv", "fconv", "auto"]),
        ((3, 3, 12, 6), (2, 7, 8, 12), (1, 1), "SAME", (1, 2), ["gemm", "conv", "fconv", "auto"]),
        ((1, 1, 12, 6), (2, 7, 8, 12), (2, 2), "SAME", (1, 1), ALL_CONV_IMPLS),
        ((3, 12, 6), (2, 20, 12), (2,), "SAME", (1,), ALL_CONV_IMPLS),  # 1-D conv
    ]


@pytest.mark.parametrize("case", range(len(_impl_cases())))
@pytest.mark.parametrize("signed", [False, True])
def test_every_impl_bit_exact(case, signed):
    """Every execution of a conv (int8 GEMMs, int8 convs with implicit padding and packed columns,
    chunked float32 convs, the auto rule) gives the emulation's int32 accumulator."""
    kshape, xshape, strides, padding, dil, impls = _impl_cases()[case]
    iw = I.fold_ternary(ternarize(rand_kernel(kshape, 21 + case), 4))
    x = rand_codes(xshape, signed, 22 + case)
    emu = np.asarray(emulate_integer_conv(x, iw, 0.5, strides, padding, dil, return_acc=True))
    np.testing.assert_array_equal(emu, ref_acc_conv(x, iw.kernel, strides, padding, dil))
    for impl in impls:
        if impl == "fconv" and jax.default_backend() != "cpu":
            continue  # GPU float convs may use Winograd/FFT: fconv's exactness assumes sums of products
        if impl in ("conv", "conv2", "conv4", "conv8") or (
                impl == "auto" and I.resolve_impl("auto", xshape, kshape, strides, padding, dil)
                .startswith("conv")):
            if jax.default_backend() != "cpu":
                continue
        acc = integer_conv(x, iw, 0.5, strides, padding, dil, impl=impl, return_acc=True)
        assert acc.dtype == jnp.int32, impl
        np.testing.assert_array_equal(np.asarray(acc), emu, err_msg=impl)


def test_packing_infeasible_raises_and_auto_rule():
    iw = I.fold_ternary(ternarize(rand_kernel((3, 3, 16, 16), 3), 4))
    x = rand_codes((1, 6, 6, 16), False)  # width 6: 4 columns do not pack
    with pytest.raises(ValueError, match="cannot pack"):
        integer_conv(x, iw, 1.0, 1, "SAME", impl="conv4", return_acc=True)
    r = functools.partial(I.resolve_impl, "auto", backend="cpu")
    assert r((8, 32, 32, 16), (3, 3, 16, 16)) == "conv4"
    assert r((8, 32, 32, 16), (3, 3, 16, 32), 2) == "conv4"
    assert r((8, 16, 16, 32), (3, 3, 32, 32)) == "conv2"
    assert r((8, 8, 8, 64), (3, 3, 64, 64)) == "conv"
    assert r((8, 6, 6, 16), (3, 3, 16, 16)) == "conv2"  # 4 does not divide 6: the next that fits
    assert r((8, 5, 5, 16), (3, 3, 16, 16)) == "gemm"  # nothing fits: too narrow for the int8 conv
    assert r((8, 8, 8, 64), (1, 1, 64, 64)) == "gemm"
    assert r((8, 8, 8, 64), (3, 3, 64, 64), backend="gpu") == "gemm"
    assert I.resolve_impl("fconv", (8, 8, 8, 64), (3, 3, 64, 64)) == "fconv"
    with pytest.raises(ValueError, match="impl must be one of"):
        I.resolve_impl("nope", (8, 8, 8, 64), (3, 3, 64, 64))


@pytest.mark.parametrize("kshape,signed", [
    ((3, 3, 57, 3), False),  # 513 products: one chunk, right at the 518 bound
    ((3, 3, 58, 3), False),  # 522: two chunks (57 + 1 channels)
    ((1, 1, 518, 3), False), ((1, 1, 519, 3), False), ((1, 1, 1037, 3), False),  # 518 | 1 | 1
    ((1, 1, 1032, 3), True), ((1, 1, 1033, 3), True),  # int8 codes: chunks of 1032
])
def test_fconv_exact_at_chunk_boundaries_and_worst_case(kshape, signed):
    """Chunked float32 convs at the worst magnitudes (|x| = 255 or 128, |W| = 127, all aligned):
    a chunk's sum reaches 518 * 255 * 127 = 16_775_430 (just below 2**24), whole sums far above."""
    if jax.default_backend() != "cpu":
        pytest.skip("fconv is exact where the backend's float conv adds products (XLA-CPU)")
    L = int(np.prod(kshape[:-1]))
    w = np.full(kshape, 127, np.int8)
    w[..., 1] = -127
    w.reshape(L, -1)[::3, 2] = -127
    iw = I.IntegerWeights(kernel=jnp.asarray(w), scale=jnp.ones(kshape[-1], jnp.float32))
    xv = -128 if signed else 255
    x = np.full((2, 4, 4, kshape[-2]), xv, np.int8 if signed else np.uint8)
    x[1, ::2, 1::2] = 1
    ref = ref_acc_conv(x, w, (1, 1), "SAME")
    xmax = 128 if signed else 255
    assert np.abs(ref).max() > 2**24 or np.abs(ref).max() == L * xmax * 127  # beyond, or at, the bound
    chunk = I._fconv_chunk(x.dtype, int(np.prod(kshape[:-2])))
    assert chunk * int(np.prod(kshape[:-2])) * xmax * 127 <= 2**24
    for impl in ("fconv", "gemm"):
        acc = integer_conv(x, iw, 1.0, (1, 1), "SAME", impl=impl, return_acc=True)
        np.testing.assert_array_equal(np.asarray(acc), ref, err_msg=impl)
    np.testing.assert_array_equal(
        np.asarray(emulate_integer_conv(x, iw, 1.0, (1, 1), "SAME", return_acc=True)), ref)


@pytest.mark.parametrize(
    "kshape,xshape,strides,dilation",
    [((3, 12, 6), (2, 20, 12), (2,), (2,)),  # 1-D conv, dilated
     ((1, 1, 12, 6), (2, 7, 7, 12), (2, 2), (1, 1)),  # 1x1 projection
     ((3, 2, 12, 6), (2, 11, 9, 12), (1, 2), (2, 1))],  # non-square, dilated
)
@pytest.mark.parametrize("impl", ["gemm", "conv"])
def test_integer_conv_geometries(kshape, xshape, strides, dilation, impl):
    skip_unsupported(impl)
    iw = I.fold_ternary(ternarize(rand_kernel(kshape, 13), 5))
    x = rand_codes(xshape, False, 14)
    acc = integer_conv(x, iw, 1.0, strides, "SAME", dilation, impl=impl, return_acc=True)
    emu = emulate_integer_conv(x, iw, 1.0, strides, "SAME", dilation, return_acc=True)
    ref = ref_acc_conv(x, iw.kernel, strides, "SAME", dilation)
    np.testing.assert_array_equal(np.asarray(acc), ref)
    np.testing.assert_array_equal(np.asarray(emu), np.asarray(ref))


@pytest.mark.parametrize("group_size", [4, 5, None, "channel"])
@pytest.mark.parametrize("signed,fan_in", [(False, 64), (True, 50)])  # 50: contraction % 4 != 0
def test_integer_dense_bit_exact_with_emulation(group_size, signed, fan_in):
    tt = ternarize(rand_kernel((fan_in, 10), 7), group_size)
    iw = I.fold_ternary(tt)
    x = rand_codes((3, 5, fan_in), signed)  # extra leading axes like nn.Dense
    acc = integer_dense(x, iw, 0.1, return_acc=True)
    emu = emulate_integer_dense(x, iw, 0.1, return_acc=True)
    ref = np.asarray(x, np.int64) @ np.asarray(iw.kernel, np.int64)
    np.testing.assert_array_equal(np.asarray(acc), ref)
    np.testing.assert_array_equal(np.asarray(emu), ref)
    np.testing.assert_array_equal(
        np.asarray(integer_dense(x, iw, 0.1)), np.asarray(emulate_integer_dense(x, iw, 0.1))
    )


def test_emulation_exact_beyond_float32_integer_range():
    """Worst-case magnitudes where a naive float32 GEMM is *not* exact (|acc| > 2**24), and a
    reduction longer than one emulation chunk (9216 = AlexNet fc6 fan-in)."""
    for L, xv in [(600, 255), (9216, 255), (9216, -127)]:
        w = np.full((L, 3), 127, np.int8)
        w[::3, 1] = -127
        w[1::2, 2] = 1
        iw = I.IntegerWeights(kernel=jnp.asarray(w), scale=jnp.ones(3, jnp.float32))
        x = np.full((2, L), xv, np.uint8 if xv > 0 else np.int8)
        x[1, ::5] = 0 if xv > 0 else 3
        ref = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
        assert np.abs(ref).max() > 2**24
        naive = np.asarray(x, np.float32) @ np.asarray(w, np.float32)  # what we must not rely on
        emu = emulate_integer_dense(x, iw, 1.0, return_acc=True)
        acc = integer_dense(x, iw, 1.0, return_acc=True)
        np.testing.assert_array_equal(np.asarray(emu), ref)
        np.testing.assert_array_equal(np.asarray(acc), ref)
        del naive


def test_jit_and_pytree():
    tt = ternarize(rand_kernel((3, 3, 12, 10), 9), 4)
    iw = I.fold_ternary(tt)
    x = rand_codes((2, 6, 6, 12), False)
    f = jax.jit(lambda x, iw, s: I.integer_conv(x, iw, s, 1, "SAME"))
    np.testing.assert_array_equal(np.asarray(f(x, iw, 0.1)), np.asarray(I.integer_conv(x, iw, 0.1)))
    leaves = jax.tree.leaves(iw)
    assert any(leaf.dtype == jnp.int8 for leaf in leaves)
    iw2 = jax.jit(I.fold_ternary)(tt) if _ternarize is not None else iw
    np.testing.assert_array_equal(np.asarray(iw2.kernel), np.asarray(iw.kernel))


# ------------------------------------------------------------------------------------------ literal
@pytest.mark.parametrize(
    "group_size,asymmetric,grouping,signed",
    [(4, False, "input", False), (7, True, "input", False), (64, False, "input", True),
     (None, False, "kernel", False), (None, False, "input", False), ("channel", True, "input", True)],
)
def test_literal_form_equals_fake_quant(group_size, asymmetric, grouping, signed):
    tt = ternarize(rand_kernel((3, 3, 12, 10), 11), group_size, asymmetric=asymmetric,
                   grouping=grouping)
    iw = I.fold_ternary(tt)
    x = rand_codes((2, 7, 7, 12), signed)
    step = 0.03
    y = literal_group_conv(x, iw, step, (2, 2), "SAME")
    ref = ref_acc_conv(x * step, tt.dequantize(), (2, 2), "SAME", dtype=np.float64)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * scale)
    # dense
    ttd = ternarize(rand_kernel((50, 6), 12), group_size, asymmetric=asymmetric)
    iwd = I.fold_ternary(ttd)
    xd = rand_codes((4, 50), signed)
    yd = literal_group_dense(xd, iwd, step)
    refd = (xd.astype(np.float64) * step) @ np.asarray(ttd.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(yd), refd, rtol=1e-5, atol=1e-5 * np.abs(refd).max())


@pytest.mark.parametrize("signed", [True, False])
def test_one_bit_activations_on_integer_path(signed):
    """act_bits=1 (BNN / XNOR-Net) runs on the integer path: the codes are {-1, +1} (sign quantizer)
    or {0, 1} (after a ReLU) in int8 / uint8, and the layer computes exactly what the fake-quant
    float graph computes with binary weights (per-channel scales)."""
    from fgq_jax.activations import quantize_activation
    from fgq_jax.ternary import ternarize as real_ternarize

    tt = real_ternarize(jnp.asarray(rand_kernel((50, 6), 13)), "channel", "binary")
    iw = I.fold_ternary(tt)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 50)), jnp.float32)
    step = 0.4
    codes = I.quantize_input(x, step, 1, signed)
    assert codes.dtype == (jnp.int8 if signed else jnp.uint8)
    assert set(np.unique(np.asarray(codes))) == ({-1, 1} if signed else {0, 1})
    np.testing.assert_array_equal(np.asarray(integer_dense(codes, iw, step)),
                                  np.asarray(emulate_integer_dense(codes, iw, step)))
    ref = np.asarray(quantize_activation(x, 1, step, signed=signed), np.float64) @ np.asarray(tt.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(literal_group_dense(codes, iw, step)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv0")(x)
        x = nn.relu(x)
        x = nn.Conv(12, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), padding="SAME", name="conv2")(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10, name="fc")(x)


def _quantize_model(params, layers, group_size):
    tparams = {k: dict(v) for k, v in params.items()}
    for p in layers:
        tparams[p]["kernel"] = ternarize(np.asarray(params[p]["kernel"]), group_size)
    return tparams


def _calibrate_steps(module, variables, x, layers):
    """max-calibrated 8-bit unsigned steps of the given layers' inputs (jitted capture)."""

    def maxima(variables, x):
        captured = {}

        def cap(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
                captured["/".join(context.module.path)] = jnp.max(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(cap):
            module.apply(variables, x, train=False)
        return captured

    m = jax.jit(maxima)(variables, x)
    return {p: jnp.float32(float(m[p]) / 255) for p in layers}


def _fake_quant_apply(module, variables, steps, x):
    from fgq_jax.activations import quantize_activation

    def q(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
            p = "/".join(context.module.path)
            if p in steps:
                return next_fun(quantize_activation(args[0], 8, steps[p]), *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(q):
        return module.apply(variables, x, train=False)


@pytest.mark.parametrize("group_size", [5])
def test_integer_apply_small_model(group_size):
    module = SmallCNN()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 10, 10, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    bs = variables["batch_stats"]["bn1"]
    variables = {
        "params": variables["params"],
        "batch_stats": {"bn1": {"mean": bs["mean"] + 0.1, "var": bs["var"] * 2.0}},
    }
    layers = ["conv1", "conv2", "fc"]  # conv0 (first layer) stays full precision
    tparams = _quantize_model(variables["params"], layers, group_size)
    folded = I.fold_params(tparams)
    assert sorted(folded) == layers
    rounded = {**variables, "params": I.rounded_fake_quant_tree(tparams)}
    unrounded = {**variables, "params": jax.tree.map(
        lambda t: t.dequantize() if hasattr(t, "codes") else t, tparams,
        is_leaf=lambda t: hasattr(t, "codes"))}
    steps = _calibrate_steps(module, unrounded, x, layers)

    fwd = {m: I.make_integer_forward(module, m) for m in I.MODES}
    y_int = fwd["integer"](variables, folded, steps, x)  # impl="auto": the per-layer rule
    plan = I.integer_plan(module, variables, folded, steps, x)
    assert sorted(plan) == layers and plan["fc"] == "gemm"
    plans = ["gemm"] + (["fconv", {"conv1": "fconv", "conv2": "gemm"}]
                        if jax.default_backend() == "cpu" else [])
    for impl in plans:  # whole model, any plan
        y = I.make_integer_forward(module, "integer", impl=impl)(variables, folded, steps, x)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_int))
    y_emu = fwd["emulate"](variables, folded, steps, x)
    y_lit = fwd["literal"](variables, folded, steps, x)
    fq = jax.jit(lambda v, s, x: _fake_quant_apply(module, v, s, x))
    with jax.default_matmul_precision("highest"):  # no TF32 in the float reference on GPUs
        y_fq_r = fq(rounded, steps, x)
        y_fq = fq(unrounded, steps, x)
    tol = 1e-4 * float(jnp.abs(y_fq).max())
    np.testing.assert_array_equal(np.asarray(y_int), np.asarray(y_emu))
    np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_fq_r), atol=tol)
    np.testing.assert_allclose(np.asarray(y_lit), np.asarray(y_fq), atol=tol)
    # the rounding of alpha -> m s_k moves the logits a little, not a lot
    assert float(jnp.abs(y_fq_r - y_fq).max()) < 0.1 * float(jnp.abs(y_fq).max())
    # errors (found while tracing): a folded layer without a step; a folded layer never called
    with pytest.raises(ValueError, match="no activation step"):
        no_fc = {k: v for k, v in steps.items() if k != "fc"}
        jax.eval_shape(lambda: I.integer_apply(module, variables, folded, no_fc, x))
    with pytest.raises(ValueError, match="never called"):
        jax.eval_shape(lambda: I.integer_apply(module, variables, {**folded, "nope": folded["fc"]}, steps, x))


def test_integer_apply_resnet20_with_act_cfg():
    """The CIFAR ResNet-20 of fgq_jax.models on the integer path, with evaluate's ActConfig."""
    models = pytest.importorskip("fgq_jax.models")
    from fgq_jax import intercept as evaluate
    from fgq_jax.activations import ActConfig
    spec = models.get_model("resnet20")
    module = spec.module
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(1), x)
    paths = evaluate.linear_layer_paths(module, variables, spec.input_shape)
    layers = [p for p in paths if p not in (spec.first_layer, spec.last_layer)]
    assert len(layers) == 18
    tparams = _to_dict(variables["params"])
    for p in layers:
        node = tparams
        for h in p.split("/"):
            node = node[h]
        node["kernel"] = ternarize(np.asarray(node["kernel"]), 4)
    folded = I.fold_params(tparams)
    assert sorted(folded) == sorted(layers)
    rounded = {**variables, "params": I.rounded_fake_quant_tree(tparams)}
    steps = _calibrate_steps(module, rounded, x, layers + [spec.last_layer])
    cfg = ActConfig(tuple((p, 8, False) for p in layers + [spec.last_layer]))
    # (whole-model bit-exactness with the emulation is checked on the small model above)
    y_int = I.make_integer_forward(module, "integer", act_cfg=cfg)(variables, folded, steps, x)
    with jax.default_matmul_precision("highest"):
        y_fq = jax.jit(lambda v, s, x: evaluate.quantized_apply(module, v, x, cfg, s))(rounded, steps, x)
    np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_fq),
                               atol=2e-2 * float(jnp.abs(y_fq).max()))
    assert np.array_equal(np.argmax(y_int, -1), np.argmax(y_fq, -1))


def _to_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree
