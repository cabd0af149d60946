"""Tests for fgq_jax.activations: quantizer grid, rounding, clipping, STE, calibrators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax.activations import (
    ActivationSampler,
    binary_scale,
    calibrate,
    pow2_exponent,
    qrange,
    quantize_activation,
    quantize_activation_int,
)


def np_fake_quant(x, s, qmin, qmax):
    return np.clip(np.round(x / s), qmin, qmax) * s


# ------------------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize(
    "bits,signed,levels,expected",
    [
        (8, False, None, (0, 255)),
        (8, True, None, (-127, 127)),
        (4, False, None, (0, 15)),
        (4, True, None, (-7, 7)),
        (2, False, None, (0, 3)),
        (2, True, None, (-1, 1)),
        (8, False, 2, (0, 1)),
        (8, True, 3, (-1, 1)),
        (8, True, 5, (-2, 2)),
        (1, False, None, (0, 1)),
        (1, True, None, (-1, 1)),
    ],
)
def test_qrange(bits, signed, levels, expected):
    assert qrange(bits, signed, levels) == expected


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=17), dict(bits=True), dict(bits=4.0),
                                 dict(bits=8, levels=1), dict(bits=8, signed=True, levels=4)])
def test_qrange_rejects(bad):
    with pytest.raises(ValueError):
        qrange(**bad)


# ------------------------------------------------------------------------------------ fake quant
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("signed", [False, True])
def test_matches_numpy(bits, signed):
    rng = np.random.default_rng(bits + 10 * signed)
    s = 0.173
    qmin, qmax = qrange(bits, signed)
    # wide enough that both ends of the grid saturate
    x = rng.normal(0.0, 0.7 * qmax * s, size=(4, 5, 6, 3)).astype(np.float32)
    got = np.asarray(quantize_activation(jnp.asarray(x), bits, s, signed=signed))
    np.testing.assert_allclose(got, np_fake_quant(x, np.float32(s), qmin, qmax), rtol=0, atol=1e-6)
    codes = np.asarray(quantize_activation_int(x, bits, s, signed=signed))
    assert codes.dtype == np.int32
    assert codes.min() >= qmin and codes.max() <= qmax
    assert set(np.unique(codes)) <= set(range(qmin, qmax + 1))
    # both ends of the grid are reached by this wide sample -> clipping really happens
    assert codes.min() == qmin and codes.max() == qmax
    np.testing.assert_array_equal(codes.astype(np.float32) * np.float32(s), got)


def test_levels_and_rounding():
    s = 0.5
    x = jnp.array([-3.0, -0.3, 0.0, 0.1, 0.24, 0.26, 0.74, 0.76, 1.0, 1.3, 2.0, 100.0])
    # unsigned 2 bits: codes 0..3
    np.testing.assert_allclose(
        quantize_activation(x, 2, s),
        [0, 0, 0, 0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5],
    )
    # round half to even, like numpy: 0.25/0.5 = 0.5 -> 0, 0.75/0.5 = 1.5 -> 2
    np.testing.assert_array_equal(quantize_activation_int(jnp.array([0.25, 0.75, 1.25]), 8, s), [0, 2, 2])


def test_ternary_and_binary_activations():
    x = jnp.linspace(-3, 3, 101)
    s = 0.8
    t = np.asarray(quantize_activation(x, 2, s, signed=True))
    np.testing.assert_allclose(np.unique(t), [-0.8, 0.0, 0.8])
    b = np.asarray(quantize_activation(x, 8, s, levels=2))
    np.testing.assert_allclose(np.unique(b), [0.0, 0.8])
    np.testing.assert_array_equal(b, np.where(np.asarray(x) >= 0.4, 0.8, 0.0).astype(np.float32))


def test_dtype_and_shape_preserved():
    x = jnp.ones((2, 3), jnp.bfloat16) * 1.7
    y = quantize_activation(x, 8, 0.1)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), 1.7, atol=0.01)


def test_traced_scale_does_not_recompile():
    traces = []

    @jax.jit
    def f(x, s):
        traces.append(1)
        return quantize_activation(x, 4, s)

    x = jnp.linspace(0, 2, 17)
    y1 = f(x, jnp.float32(0.1))
    y2 = f(x, jnp.float32(0.2))
    assert len(traces) == 1
    np.testing.assert_allclose(y1, np_fake_quant(np.asarray(x), np.float32(0.1), 0, 15), atol=1e-6)
    np.testing.assert_allclose(y2, np_fake_quant(np.asarray(x), np.float32(0.2), 0, 15), atol=1e-6)


def test_per_channel_scale_broadcasts():
    x = jnp.arange(12.0).reshape(2, 2, 3) / 3
    s = jnp.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(
        quantize_activation(x, 8, s), np_fake_quant(np.asarray(x), np.asarray(s), 0, 255), atol=1e-6
    )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(bad):
    with pytest.raises(ValueError, match="scale"):
        quantize_activation(jnp.ones(3), 8, bad)


# ------------------------------------------------------------------------------------------- STE
@pytest.mark.parametrize("bits,signed", [(8, False), (4, True), (2, True)])
def test_ste_gradient(bits, signed):
    s = 0.25
    qmin, qmax = qrange(bits, signed)
    x = jnp.array([qmin * s - 1.0, qmin * s - 0.01, qmin * s, qmin * s + 0.1, 0.0, 0.13,
                   qmax * s - 0.1, qmax * s, qmax * s + 0.01, qmax * s + 5.0])
    g = jax.grad(lambda v: jnp.sum(quantize_activation(v, bits, s, signed=signed) * 3.0))(x)
    expected = np.where((np.asarray(x) >= qmin * s) & (np.asarray(x) <= qmax * s), 3.0, 0.0)
    np.testing.assert_array_equal(np.asarray(g), expected)
    # the range edges are included, points just outside are not
    assert g[2] == 3.0 and g[1] == 0.0 and g[7] == 3.0 and g[8] == 0.0


def test_ste_vjp_is_masked_cotangent():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
    _, vjp = jax.vjp(lambda v: quantize_activation(v, 4, 0.1), x)
    (gx,) = vjp(ct)
    inside = (np.asarray(x) >= 0) & (np.asarray(x) <= 1.5)
    np.testing.assert_array_equal(np.asarray(gx), np.where(inside, np.asarray(ct), 0.0))


def test_scale_gradient_lsq():
    x = jnp.array([0.26, 10.0, -1.0])
    s = jnp.float32(0.1)
    gs = jax.grad(lambda sc: jnp.sum(quantize_activation(x, 2, sc)), argnums=0)(s)
    # inside: round(2.6)-2.6 = 0.4; above: qmax = 3; below an unsigned range: clip bound 0
    np.testing.assert_allclose(gs, 0.4 + 3.0 + 0.0, atol=1e-5)
    # and it matches a finite difference where no level boundary is crossed
    def f(sc):
        return jnp.sum(quantize_activation(jnp.array([10.0]), 2, sc))

    np.testing.assert_allclose(jax.grad(f)(s), (f(s + 1e-3) - f(s - 1e-3)) / 2e-3, rtol=1e-3)


def test_jit_grad_agree():
    x = jnp.linspace(-1, 3, 41)
    def f(v, sc):
        return jnp.sum(jnp.sin(quantize_activation(v, 4, sc, signed=True)))

    g1 = jax.grad(f)(x, 0.2)
    g2 = jax.jit(jax.grad(f))(x, jnp.float32(0.2))
    np.testing.assert_allclose(g1, g2, rtol=1e-6)


# ----------------------------------------------------------------------------------- calibration
def test_calibrate_max_exact():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(8, 8, 16)), 0).astype(np.float32)
    assert float(calibrate(x, 8, "max")) == pytest.approx(x.max() / 255, rel=1e-7)
    assert float(calibrate(x, 4, "max")) == pytest.approx(x.max() / 15, rel=1e-7)
    xs = rng.normal(size=1000).astype(np.float32)
    assert float(calibrate(xs, 8, "max", signed=True)) == pytest.approx(np.abs(xs).max() / 127, rel=1e-7)
    # unsigned: negatives are clipped to 0 whatever the step, so they do not widen the range
    y = np.array([-50.0, 0.5, 2.0], np.float32)
    assert float(calibrate(y, 8, "max")) == pytest.approx(2.0 / 255)
    # no clipping of the sample with the max step
    s = calibrate(x, 8, "max")
    assert np.abs(np.asarray(quantize_activation(x, 8, s)) - x).max() <= float(s) / 2 + 1e-6


@pytest.mark.parametrize("p", [99.99, 99.0, 50.0, 100.0])
def test_calibrate_percentile(p):
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=20001).astype(np.float32)
    got = float(calibrate(x, 8, "percentile", signed=True, percentile=p))
    assert got == pytest.approx(np.percentile(np.abs(x), p) / 127, rel=1e-5)
    got_u = float(calibrate(x, 4, "percentile", percentile=p))
    assert got_u == pytest.approx(np.percentile(np.maximum(x, 0), p) / 15, rel=1e-5)


@pytest.mark.parametrize("bits,signed", [(8, True), (4, False), (4, True), (2, True)])
def test_calibrate_mse_not_worse_than_max(bits, signed):
    rng = np.random.default_rng(3)
    # heavy-tailed with a finite variance (with an infinite one, e.g. Student-t(2), the outliers
    # dominate the MSE and "no clipping" is genuinely optimal)
    x = rng.laplace(size=50000).astype(np.float32)
    if not signed:
        x = np.abs(x)
    s_max = calibrate(x, bits, "max", signed=signed)
    s_mse = calibrate(x, bits, "mse", signed=signed)
    def mse(s):
        return float(np.mean((np.asarray(quantize_activation(x, bits, s, signed=signed)) - x) ** 2))

    assert mse(s_mse) <= mse(s_max)
    # on a heavy tail clipping pays off at low bit widths
    if bits <= 4:
        assert float(s_mse) < float(s_max) and mse(s_mse) < 0.5 * mse(s_max)
    # at least as good as a brute-force search over the linear grid of 100 fractions of the max
    # (the calibrator's candidates are a superset of that grid)
    qmin, qmax = qrange(bits, signed)
    top = np.abs(x).max()
    cands = top * np.arange(1, 101, dtype=np.float32) / (100 * qmax)
    errs = [np.mean((np_fake_quant(x, c, qmin, qmax) - x) ** 2) for c in cands]
    assert mse(s_mse) <= min(errs) * (1 + 1e-5)


def test_calibrate_pow2():
    x = np.array([0.0, 1.0, 3.0], np.float32)  # max step 3/255 = 0.01176 -> 2**-6 = 0.015625
    s = calibrate(x, 8, "max", pow2=True)
    assert float(s) == 2.0**-6 and pow2_exponent(s) == -6
    assert float(s) >= 3.0 / 255  # ceil: never more clipping than the calibrated step
    for method in ("max", "percentile", "mse"):
        for bits in (8, 4, 2):
            v = float(calibrate(np.random.default_rng(bits).gamma(2, size=999), bits, method, pow2=True))
            assert v == 2.0 ** round(np.log2(v))
    assert float(calibrate(np.array([4.0 * 255]), 8, "max", pow2=True)) == 4.0  # exact power stays


def test_calibrate_degenerate_and_errors():
    assert float(calibrate(np.zeros(10), 8, "max")) == pytest.approx(1 / 255)
    assert float(calibrate(-np.ones(10), 8, "mse")) == pytest.approx(1 / 255)
    with pytest.raises(ValueError, match="method"):
        calibrate(np.ones(3), 8, "entropy")
    with pytest.raises(ValueError, match="NaN"):
        calibrate(np.array([1.0, np.nan]), 8)
    with pytest.raises(ValueError, match="empty"):
        calibrate(np.zeros((0,)), 8)
    with pytest.raises(ValueError, match="percentile"):
        calibrate(np.ones(3), 8, "percentile", percentile=0)


def test_calibrate_under_jit():
    f = jax.jit(lambda v: calibrate(v, 8, "max"))
    assert float(f(jnp.array([0.0, 2.55]))) == pytest.approx(0.01)


def test_sampler_streams_batches():
    rng = np.random.default_rng(4)
    batches = [rng.gamma(2.0, size=(50, 100)).astype(np.float32) for _ in range(5)]
    allx = np.concatenate([b.ravel() for b in batches])
    small = ActivationSampler(per_batch=1000, seed=0).update_all(batches)
    assert small.count == allx.size
    assert small.samples.size == 5 * 1002
    # max stays exact even though only a subsample is kept
    assert float(small.calibrate(8, "max")) == pytest.approx(allx.max() / 255, rel=1e-7)
    # percentile of the subsample is close to the full one
    full = float(calibrate(allx, 8, "percentile", percentile=99.0))
    assert float(small.calibrate(8, "percentile", percentile=99.0)) == pytest.approx(full, rel=0.1)
    # a budget larger than the batches keeps everything -> identical to calibrating the concatenation
    big = ActivationSampler(per_batch=10**6).update_all(batches)
    assert float(big.calibrate(8, "mse")) == pytest.approx(float(calibrate(allx, 8, "mse")), rel=1e-6)


# ------------------------------------------------------------------- 1-bit (BNN / XNOR-Net) activations
def np_sign_quant(x, s):
    """Independent reference of the signed 1-bit forward: s * sign(x), sign(0) = +1."""
    return np.where(x >= 0, s, -s)


def np_hardtanh_mask(x, s, signed):
    """BNN's hard-tanh STE in units of s: 1 where |x/s| <= 1 (signed) or 0 <= x/s <= 1 (unsigned)."""
    u = x / s
    return ((np.abs(u) <= 1) if signed else ((u >= 0) & (u <= 1))).astype(np.float32)


def test_sign_quantizer_values():
    s = 0.5
    x = jnp.array([-3.0, -0.5, -1e-6, 0.0, 1e-6, 0.25, 0.5, 7.0])
    got = np.asarray(quantize_activation(x, 1, s, signed=True))
    np.testing.assert_array_equal(got, [-0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # 0 -> +s
    np.testing.assert_array_equal(np.asarray(quantize_activation_int(x, 1, s, signed=True)),
                                  [-1, -1, -1, 1, 1, 1, 1, 1])
    assert set(np.unique(got)) == {-s, s}  # two levels, no zero


def test_unsigned_binary_values():
    s = 0.5
    x = jnp.array([-1.0, 0.0, 0.2, 0.25, 0.26, 0.5, 9.0])  # threshold s/2: x > s/2 -> s
    got = np.asarray(quantize_activation(x, 1, s, signed=False))
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(np.asarray(quantize_activation_int(x, 1, s)), [0, 0, 0, 0, 1, 1, 1])
    # the same grid as the explicit 2-level quantizer
    np.testing.assert_array_equal(got, np.asarray(quantize_activation(x, 8, s, levels=2)))


@pytest.mark.parametrize("signed", [True, False])
def test_binary_ste_matches_numpy_hardtanh(signed):
    rng = np.random.default_rng(7 + signed)
    s = 0.3
    x = rng.normal(scale=0.5, size=(257,)).astype(np.float32)
    x[:4] = [s, -s, 0.0, s + 1e-3]  # bounds included, just outside excluded
    ct = rng.normal(size=x.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda v: quantize_activation(v, 1, s, signed=signed), jnp.asarray(x))
    (gx,) = vjp(jnp.asarray(ct))
    np.testing.assert_array_equal(np.asarray(gx), ct * np_hardtanh_mask(x, np.float32(s), signed))
    if signed:
        np.testing.assert_array_equal(np.asarray(out), np_sign_quant(x, np.float32(s)))
        assert float(gx[1]) == ct[1] and float(gx[3]) == 0.0


def test_sign_quantizer_scale_gradient_and_per_channel():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    s = np.array([0.5, 1.0, 2.0, 0.25], np.float32)  # per channel (last axis)
    out = quantize_activation(jnp.asarray(x), 1, jnp.asarray(s), signed=True)
    np.testing.assert_array_equal(np.asarray(out), np_sign_quant(x, s))
    gs = jax.grad(lambda sc: jnp.sum(quantize_activation(jnp.asarray(x), 1, sc, signed=True)))(jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(gs), np.where(x >= 0, 1.0, -1.0).reshape(-1, 4).sum(0))


def test_binary_scale_is_mean_magnitude():
    x = np.array([[-2.0, 1.0], [0.0, -3.0], [4.0, 0.0]], np.float32)  # 3 positions x 2 channels
    assert float(binary_scale(x)) == pytest.approx(10 / 6)
    assert float(binary_scale(x, signed=False)) == pytest.approx(5 / 6)
    np.testing.assert_allclose(np.asarray(binary_scale(x, per_channel=True)), [2.0, 4 / 3])
    np.testing.assert_allclose(np.asarray(binary_scale(x, signed=False, per_channel=True)), [4 / 3, 1 / 3])
    assert float(binary_scale(np.zeros(5))) == 1.0  # no information: a harmless positive scale
    with pytest.raises(ValueError, match="empty"):
        binary_scale(np.zeros(0))


def test_calibrate_one_bit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=4096).astype(np.float32)
    m = float(np.mean(np.abs(x)))
    assert float(calibrate(x, 1, "mean", signed=True)) == pytest.approx(m, rel=1e-5)
    # mean|x| is the least-squares optimum of the sign quantizer: "mse" gives the same step
    assert float(calibrate(x, 1, "mse", signed=True)) == pytest.approx(m, rel=1e-5)
    relu = np.maximum(x, 0)
    assert float(calibrate(relu, 1, "mean")) == pytest.approx(float(relu.mean()), rel=1e-5)
    s_mse = calibrate(relu, 1, "mse")  # {0, s}: searched like any grid, never worse than "max"

    def err(s):
        return float(np.mean((np.asarray(quantize_activation(relu, 1, s)) - relu) ** 2))

    assert err(s_mse) <= err(calibrate(relu, 1, "max")) + 1e-9
    with pytest.raises(ValueError, match="1-bit"):
        calibrate(x, 8, "mean")
