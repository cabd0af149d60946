"""Tests for fgq_jax.tt: TT-SVD, the TT forward, TTDense, accounting and ternary cores."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgq_jax import accounting, tt
from fgq_jax.transforms import WeightQuant

IN, OUT = (2, 3, 4), (5, 2, 2)  # a 24 x 20 kernel, 3 cores


def _kernel(shape=(24, 20), seed=0, decay=True):
    """A random kernel whose TT unfoldings have decaying spectra (so truncation is meaningful)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if decay:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        w = (u * (s * 0.7 ** np.arange(len(s)))) @ vt
    return w.astype(np.float32)


def _unfolding_tails(w, in_modes, out_modes, ranks):
    """Best rank-r_k approximation error of each TT unfolding of w (independent of tt_svd)."""
    d = len(in_modes)
    t = np.asarray(w, np.float64).reshape(tuple(in_modes) + tuple(out_modes))
    t = t.transpose([a for k in range(d) for a in (k, d + k)])
    mn = [m * n for m, n in zip(in_modes, out_modes)]
    tails = []
    for k in range(1, d):
        s = np.linalg.svd(t.reshape(math.prod(mn[:k]), -1), compute_uv=False)
        tails.append(float(np.sqrt(np.sum(s[ranks[k]:] ** 2))))
    return tails


# ---------------------------------------------------------------------------------------- TT-SVD
@pytest.mark.parametrize("in_modes,out_modes", [(IN, OUT), ((4, 1, 6), (2, 10, 1)), ((24,), (20,))])
def test_full_rank_tt_svd_is_exact(in_modes, out_modes):
    w = _kernel(decay=False)
    cores = tt.tt_svd(w, in_modes, out_modes)
    full = tt.max_tt_ranks(in_modes, out_modes)
    assert [g.shape for g in cores] == tt.tt_core_shapes(in_modes, out_modes, full)
    rec = np.asarray(tt.tt_to_dense(cores))
    assert rec.shape == w.shape
    assert np.linalg.norm(rec - w) / np.linalg.norm(w) < 1e-5


def test_truncated_tt_svd_obeys_the_error_bounds():
    w = _kernel()
    ranks = (1, 3, 2, 1)
    cores, disc = tt.tt_svd(w, IN, OUT, ranks, return_discarded=True)
    err = float(np.linalg.norm(np.asarray(tt.tt_to_dense(cores), np.float64) - w))
    tails = _unfolding_tails(w, IN, OUT, ranks)
    assert err > 1e-3 * np.linalg.norm(w)  # something was truncated
    # Oseledets 2011, Thm 2.2: err <= sqrt(sum eps_k^2), eps_k <= tail_k; and err >= max_k tail_k
    assert err <= math.sqrt(sum(disc)) * (1 + 1e-5) + 1e-6
    for e2, tail in zip(disc, tails):
        assert e2 <= tail**2 * (1 + 1e-6) + 1e-9
    assert err <= math.sqrt(sum(t**2 for t in tails)) * (1 + 1e-5)
    assert err >= max(tails) * (1 - 1e-5)
    # max_rank = an int: the same as the equal ranks, clipped to the full ranks
    c2 = tt.tt_svd(w, IN, OUT, max_rank=3)
    assert [g.shape[3] for g in c2] == [3, 3, 1]
    c3 = tt.tt_svd(w, IN, OUT, max_rank=1000)
    assert [g.shape[3] for g in c3] == list(tt.max_tt_ranks(IN, OUT)[1:])


def test_tt_svd_rejects_bad_configurations():
    w = _kernel()
    with pytest.raises(ValueError, match=r"modes do not factor the kernel.*prod\(in_modes=\(2, 3, 5\)\) = 30"):
        tt.tt_svd(w, (2, 3, 5), OUT)
    with pytest.raises(ValueError, match="same length"):
        tt.tt_svd(w, (6, 4), OUT)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 11 exceeds"):
        tt.tt_svd(w, IN, OUT, (1, 11, 2, 1))
    with pytest.raises(ValueError, match="start and end with 1"):
        tt.tt_svd(w, IN, OUT, (2, 3, 2, 1))
    with pytest.raises(ValueError, match="d \\+ 1 = 4 entries"):
        tt.tt_svd(w, IN, OUT, (1, 3, 1))
    with pytest.raises(ValueError, match="ints >= 1"):
        tt.tt_svd(w, (2, 0, 4), OUT)
    with pytest.raises(TypeError, match="floating"):
        tt.tt_svd(w.astype(np.int32), IN, OUT)
    with pytest.raises(ValueError, match="either ranks or max_rank"):
        tt.tt_svd(w, IN, OUT, 2, max_rank=2)


# ---------------------------------------------------------------------------------------- forward
def _random_cores(in_modes, out_modes, ranks, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no jax.random compilation in these tests
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in tt.tt_core_shapes(in_modes, out_modes, ranks)]


def test_tt_matvec_equals_dense_product():
    cores = _random_cores(IN, OUT, (1, 3, 2, 1))
    w = tt.tt_to_dense(cores)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 24)), jnp.float32)
    y = jax.jit(tt.tt_matvec)(cores, x)
    assert y.shape == (2, 3, 20)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    # the kernel's row index is (i_1, .., i_d) row-major, its column index (j_1, .., j_d)
    g = [np.asarray(c) for c in cores]
    i, j = (1, 2, 3), (4, 0, 1)
    entry = g[0][:, i[0], j[0], :] @ g[1][:, i[1], j[1], :] @ g[2][:, i[2], j[2], :]
    row, col = np.ravel_multi_index(i, IN), np.ravel_multi_index(j, OUT)
    np.testing.assert_allclose(w[row, col], entry[0, 0], rtol=1e-5)
    with pytest.raises(ValueError, match="last axis of prod"):
        tt.tt_matvec(cores, jnp.zeros((2, 25)))
    with pytest.raises(ValueError, match="previous core ends with rank 3"):
        tt.tt_matvec([cores[0], cores[2], cores[2]], x)


def test_ttdense_from_dense_kernel_matches_x_at_w():
    w, b = _kernel(), np.arange(20, dtype=np.float32) / 10
    params = tt.tt_dense_params(w, b, IN, OUT, (1, 4, 3, 1))
    layer = tt.TTDense(IN, OUT, (1, 4, 3, 1))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 24)), jnp.float32)
    init = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    y = jax.jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(y, x @ tt.tt_to_dense(tt.tt_cores_of(params)) + b, rtol=1e-5, atol=1e-5)
    # at full rank the layer reproduces the dense layer itself
    full = tt.max_tt_ranks(IN, OUT)
    yf = jax.jit(tt.TTDense(IN, OUT, full).apply)({"params": tt.tt_dense_params(w, b, IN, OUT)}, x)
    np.testing.assert_allclose(yf, x @ w + b, rtol=1e-4, atol=1e-4)
    # no bias
    nb = tt.TTDense(IN, OUT, 2, use_bias=False)
    p = tt.tt_dense_params(w, None, IN, OUT, 2)
    assert "bias" not in jax.eval_shape(nb.init, jax.random.key(0), x)["params"] and "bias" not in p
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\)"):
        tt.tt_dense_params(w, np.zeros(21, np.float32), IN, OUT, 2)


def test_ttdense_default_init_has_lecun_variance():
    layer = tt.TTDense((8, 8, 8), (4, 4, 4), 4)
    params = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1, 512)))["params"]
    w = np.asarray(jax.jit(tt.tt_to_dense)(tt.tt_cores_of(params)))
    assert 0.5 / 512 < w.var() < 2.0 / 512


@pytest.mark.parametrize("quant", [None, WeightQuant("exact", 4)])
def test_gradients_flow_through_ttdense(quant):
    layer = tt.TTDense(IN, OUT, (1, 3, 2, 1), quant=quant)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 24)), jnp.float32)
    params = tt.tt_dense_params(_kernel(), np.ones(20, np.float32), IN, OUT, (1, 3, 2, 1))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2)))(params)
    for name, g in grads.items():
        assert g.shape == params[name].shape
        assert np.all(np.isfinite(g)) and np.any(g != 0), name


# ---------------------------------------------------------------------------------------- accounting
def _brute_force_macs(cores, m):
    """MACs of every dot_general in tt_matvec's jaxpr, for one example."""
    jaxpr = jax.make_jaxpr(lambda x: tt.tt_matvec(cores, x))(jnp.zeros((1, m)))
    total = 0
    for eqn in jaxpr.jaxpr.eqns:
        assert eqn.primitive.name != "pjit"  # everything is inlined, nothing hides in a sub-jaxpr
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in lhs_contract)
    return total


@pytest.mark.parametrize("in_modes,out_modes,ranks", [
    (IN, OUT, (1, 3, 2, 1)), ((8, 8, 8, 8), (4, 8, 8, 4), 8), ((4, 4), (4, 4), (1, 16, 1)),
])
def test_params_and_macs_against_brute_force(in_modes, out_modes, ranks):
    layer = tt.TTDense(in_modes, out_modes, ranks, use_bias=False)
    m = math.prod(in_modes)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, m)))["params"]
    assert tt.tt_params(in_modes, out_modes, ranks) == sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    cores = [jnp.zeros(s) for s in tt.tt_core_shapes(in_modes, out_modes, ranks)]
    assert tt.tt_macs(in_modes, out_modes, ranks) == _brute_force_macs(cores, m)
    # the float TT layer's storage: 32 bits per core entry
    assert tt.tt_bits(in_modes, out_modes, ranks) == 32 * tt.tt_params(in_modes, out_modes, ranks)


def test_tt_macs_closed_form_example():
    # in (8,8,8,8) out (4,8,8,4) rank r: 24576 r + 32768 r^2 MACs, 64 r + 128 r^2 weights
    for r in (1, 4, 16):
        assert tt.tt_macs((8,) * 4, (4, 8, 8, 4), r) == 24576 * r + 32768 * r * r
        assert tt.tt_params((8,) * 4, (4, 8, 8, 4), r) == 64 * r + 128 * r * r


# one set of core shapes for the ternary tests: ternarize compiles once per (shape, N)
T_IN, T_OUT, T_RANKS = (4, 4, 4), (4, 3, 4), (1, 5, 6, 1)


def _svd_cores(seed=5):
    return tt.tt_svd(_kernel((64, 48), seed=seed), T_IN, T_OUT, T_RANKS)


def test_ternary_bits_accounting_matches_real_ternary_cores():
    in_m, out_m, ranks = T_IN, T_OUT, T_RANKS
    cores = _svd_cores(4)
    for n in (3, 4, "channel"):
        tcores = tt.ternarize_tt_cores(cores, n)
        assert tt.ternary_cores_bits(tcores) == tt.tt_bits(in_m, out_m, ranks, n)
        rep = tt.count_tt_ops(in_m, out_m, ranks, n)
        # ternary: one multiplication per group and output element, as accounting.py counts them
        groups = [math.ceil(s[0] * s[1] / (s[0] * s[1] if n == "channel" else n))
                  for s in tt.tt_core_shapes(in_m, out_m, ranks)]
        assert rep.mults == sum(ly.outputs * g for ly, g in zip(tt.tt_layer_shapes(in_m, out_m, ranks), groups))
        assert rep.macs == tt.tt_macs(in_m, out_m, ranks)
    # N = 4 divides every r_{k-1} m_k (4, 20, 24): 2 + 16/4 = 6 bits per core entry
    assert tt.tt_bits(in_m, out_m, ranks, 4) == 6 * tt.tt_params(in_m, out_m, ranks)


def test_paper_compression_figures():
    table = tt.paper_fc_compression()
    archs = {(r["network"], r["architecture"]): r for r in table["architectures"]}
    for arch, paper in tt.PAPER_VGG16.items():
        row = archs[("vgg16", arch)]
        assert int(row["layers_compression"]) == paper["layers"]  # the paper truncates
        assert round(row["network_compression"], 1) == paper["network"]
    # VGG-16 fc6 at rank 4: 2016 TT weights for a 102,760,448-weight kernel
    fc6 = [r for r in table["layers"] if (r["network"], r["layer"], r["rank"]) == ("vgg16", "fc6", 4)][0]
    assert fc6["tt_weights"] == 2016 and fc6["dense_weights"] == 25088 * 4096
    bits = sum(2 * math.prod(s) + 16 * math.ceil(s[0] * s[1] / 4) * s[2] * s[3]
               for s in tt.tt_core_shapes((2, 7, 8, 8, 7, 4), (4,) * 6, 4))
    assert fc6["compression_ternary_n4"] == pytest.approx(32 * 25088 * 4096 / bits)
    assert tt.network_params("vgg16") == 138_357_544
    assert "| vgg16 | TT2 FC FC | 194,622.1 | 194,622 | 3.89 | 3.9 |" in tt.compression_markdown(table)


def test_alexnet_parameter_count_matches_the_model():
    from fgq_jax.models import variable_shapes

    shapes = variable_shapes("alexnet")["params"]
    assert tt.network_params("alexnet") == sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    assert shapes["fc6"]["kernel"].shape == (9216, 4096)


# ---------------------------------------------------------------------------------------- ternary
def test_ternary_cores_are_codes_times_group_scales():
    cores = _svd_cores()
    tcores = tt.ternarize_tt_cores(cores, 4)
    fake = tt.ternarize_tt_cores(cores, 4, mode="fake")
    deq = tt.dequantize_tt_cores(tcores, T_IN, T_OUT, T_RANKS)
    for g, t, f, d in zip(cores, tcores, fake, deq):
        r0, m, n, r1 = g.shape
        assert t.shape == (r0 * m, n * r1) and t.scales.shape == (math.ceil(r0 * m / 4), n * r1)
        assert set(np.unique(np.asarray(t.codes))) <= {-1, 0, 1}
        np.testing.assert_array_equal(f, d)
        # each value is a code times its group's scale: groups of 4 consecutive rows of the 2-D core
        scale_rows = np.repeat(np.asarray(t.scales), 4, axis=0)[: r0 * m]
        np.testing.assert_array_equal(np.asarray(f).reshape(r0 * m, n * r1), np.asarray(t.codes) * scale_rows)
        assert np.all(np.asarray(t.scales) > 0)


def test_ternary_group_size_one_is_lossless():
    cores = _random_cores(IN, OUT, (1, 3, 2, 1), seed=7)
    for got, want in zip(tt.ternarize_tt_cores(cores, 1, mode="fake"), cores):
        np.testing.assert_array_equal(got, want)


def test_ternary_groups_run_along_the_contracted_input_mode():
    """A core built as sign pattern x (one magnitude per group along (r_prev, m), N = m) is
    represented exactly; ternarizing along any other axis would mix magnitudes and fail."""
    rng = np.random.default_rng(0)
    r0, m, n, r1 = 3, 4, 6, 1
    mags = rng.uniform(0.5, 2.0, (r0, 1, n, r1))  # constant over m: one group = all of m
    core = (np.sign(rng.standard_normal((r0, m, n, r1))) * mags).astype(np.float32)
    first = rng.standard_normal((1, 2, 2, r0)).astype(np.float32)
    got = tt.ternarize_tt_cores([first, core], m, mode="fake")[1]
    np.testing.assert_allclose(got, core, rtol=1e-6)
    # a group straddling two rank indices (N = 2m) must lose information
    assert not np.allclose(tt.ternarize_tt_cores([first, core], 2 * m, mode="fake")[1], core)


def test_ternarize_tt_cores_ste_gradient_is_identity():
    cores = [jnp.asarray(g) for g in _svd_cores(8)]
    fake = tt.ternarize_tt_cores(cores, 4, mode="fake")
    ste = tt.ternarize_tt_cores_ste(cores, 4)
    for a, b in zip(ste, fake):
        np.testing.assert_array_equal(a, b)
    g = jax.grad(lambda cs: sum(jnp.sum(c * 3.0) for c in tt.ternarize_tt_cores_ste(cs, 4)))(cores)
    for gi in g:
        np.testing.assert_array_equal(gi, 3.0)
    with pytest.raises(ValueError, match="mode must be"):
        tt.ternarize_tt_cores(cores, 4, mode="int")
