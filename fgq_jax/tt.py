"""Tensor-Train (TT) fully-connected layers (Novikov et al., "Tensorizing Neural Networks", NIPS 2015).

A dense kernel ``W`` of shape ``[M, N]`` with ``M = m_1 ... m_d`` (``in_modes``) and
``N = n_1 ... n_d`` (``out_modes``) is stored as ``d`` cores ``G_k`` of shape
``[r_{k-1}, m_k, n_k, r_k]`` (``ranks = (r_0, ..., r_d)``, ``r_0 = r_d = 1``):

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

Row and column multi-indices are row-major (``i_1`` slowest), i.e. ``W.reshape(*in_modes,
*out_modes)`` indexes ``W[i_1, ..., i_d, j_1, ..., j_d]``. The kernel uses the Flax layout
``(in, out)``: ``y = x @ W``.

Forward (:func:`tt_matvec`), without ever materialising ``W``: the cores are contracted left to
right. Before core ``k`` the state is ``z[b, p, a, q]`` with ``p`` = (j_1..j_{k-1}) (size
``P_k = n_1 ... n_{k-1}``), ``a`` the rank index ``r_{k-1}`` and ``q`` = (i_k..i_d); the input is
``x.reshape(B, 1, 1, M)``. Step ``k`` splits ``q = (i_k, q')`` and computes

    z'[b, p, j_k, s, q'] = sum_{a, i_k} z[b, p, a, i_k, q'] G_k[a, i_k, j_k, s]

which is a dense product with reduction length ``r_{k-1} m_k`` and ``n_k r_k`` outputs at
``P_k Q_k`` positions (``Q_k = m_{k+1} ... m_d``); merging ``(p, j_k)`` gives the next state. After
core ``d`` the state is ``[B, N]``. Per example it costs

    MACs = sum_k  n_1..n_{k-1} * m_{k+1}..m_d * r_{k-1} m_k n_k r_k

(:func:`tt_macs`) against ``M N`` for the dense layer; e.g. VGG-16 fc6 (25088 x 4096, modes
2x7x8x8x7x4 x 4^6, all ranks 4): 6.9 M MACs vs 102.8 M. For small layers and large ranks the TT
forward can cost *more* MACs than the dense product (the experiment's 4096 x 1024 layer at rank 16).

Each step is exactly a dense layer with kernel ``G_k.reshape(r_{k-1} m_k, n_k r_k)`` (the core's own
memory layout), which is how accounting and ternarization see a core: :func:`tt_layer_shapes`
describes the layer as ``d`` such dense products for :func:`fgq_jax.accounting.count_ops`, and
:func:`ternarize_tt_cores` ternarizes each core in that ``(reduction, out)`` layout with
:func:`fgq_jax.ternary.ternarize`'s grouping rule (groups of ``N`` consecutive elements of the
reduction vector ``(a, i_k)``, ``i_k`` fastest: ``N`` consecutive input-mode indices at one rank index
``a``, for one output ``(j_k, s)``).

TT-SVD (:func:`tt_svd`, Oseledets 2011, "Tensor-Train Decomposition", Alg. 1) on the tensor
``T[(i_1 j_1), ..., (i_d j_d)]`` (``W`` reshaped to ``[m_1..m_d, n_1..n_d]`` and permuted to
``[m_1, n_1, ..., m_d, n_d]``): sequential truncated SVDs of ``[r_{k-1} m_k n_k, rest]`` matrices.
Error bound (Oseledets 2011, Thm 2.2): with ``eps_k`` the Frobenius norm of the singular values
discarded at step ``k``,

    ||W - W_TT||_F <= sqrt(eps_1^2 + ... + eps_{d-1}^2),

and each ``eps_k`` is at most the best rank-``r_k`` approximation error of the ``k``-th unfolding
``T[(i_1 j_1 .. i_k j_k), (rest)]``; conversely ``||W - W_TT||_F`` is at least the largest of those
best-approximation errors (``W_TT``'s ``k``-th unfolding has rank <= ``r_k``). With all ranks at
:func:`max_tt_ranks` nothing is discarded and the decomposition is exact.

Compression figures of the paper (VGG-16, Table 2) are reproduced, not just quoted, by
:func:`paper_fc_compression`; see there which numbers come from the paper and which are computed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax import accounting, ternary

__all__ = [
    "check_tt_shape",
    "normalize_ranks",
    "max_tt_ranks",
    "clip_ranks",
    "tt_core_shapes",
    "tt_svd",
    "tt_to_dense",
    "tt_matvec",
    "tt_normal_init",
    "TTDense",
    "tt_dense_params",
    "tt_cores_of",
    "tt_params",
    "tt_macs",
    "tt_layer_shapes",
    "count_tt_ops",
    "core_kernel_2d",
    "ternarize_tt_cores",
    "ternarize_tt_cores_ste",
    "dequantize_tt_cores",
    "ternary_cores_bits",
    "tt_bits",
    "paper_fc_compression",
    "compression_markdown",
]

Modes = tuple[int, ...]
Ranks = tuple[int, ...]


# ==================================================================================================
# shapes and ranks
# ==================================================================================================
def _check_modes(modes: Any, what: str) -> Modes:
    try:
        out = tuple(modes)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of ints >= 1, got {modes!r}") from None
    if not out:
        raise ValueError(f"{what} must not be empty")
    for m in out:
        if isinstance(m, (bool, np.bool_)) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"{what} must be ints >= 1, got {modes!r}")
    return tuple(int(m) for m in out)


def normalize_ranks(ranks: Any, d: int) -> Ranks:
    """TT-ranks ``(r_0, ..., r_d)`` with ``r_0 = r_d = 1``.

    ``ranks``: an int ``r`` (every internal rank ``r``) or a sequence of ``d + 1`` ints >= 1 whose
    first and last entries are 1.
    """
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, (bool, np.bool_)):
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        return (1,) + (int(ranks),) * (d - 1) + (1,)
    out = _check_modes(ranks, "ranks")
    if len(out) != d + 1:
        raise ValueError(f"ranks must have d + 1 = {d + 1} entries (r_0 .. r_d) for {d} cores, got {out}")
    if out[0] != 1 or out[-1] != 1:
        raise ValueError(f"ranks must start and end with 1 (r_0 = r_d = 1), got {out}")
    return out


def check_tt_shape(in_modes: Any, out_modes: Any, ranks: Any = 1,
                   kernel_shape: Sequence[int] | None = None) -> tuple[Modes, Modes, Ranks]:
    """Validate a TT configuration; returns ``(in_modes, out_modes, ranks)`` as int tuples.

    Raises ValueError when the numbers of input and output modes differ, when a mode or rank is
    not an int >= 1, or (``kernel_shape`` given) when ``prod(in_modes), prod(out_modes)`` is not
    the kernel's shape ``(in, out)``.
    """
    in_modes, out_modes = _check_modes(in_modes, "in_modes"), _check_modes(out_modes, "out_modes")
    if len(in_modes) != len(out_modes):
        raise ValueError(
            f"in_modes {in_modes} and out_modes {out_modes} must have the same length (one core per pair)"
        )
    if kernel_shape is not None:
        kernel_shape = tuple(int(s) for s in kernel_shape)
        if len(kernel_shape) != 2:
            raise ValueError(f"a TT kernel must be 2-D (in, out), got shape {kernel_shape}")
        if math.prod(in_modes) != kernel_shape[0] or math.prod(out_modes) != kernel_shape[1]:
            raise ValueError(
                f"modes do not factor the kernel: prod(in_modes={in_modes}) = {math.prod(in_modes)}, "
                f"prod(out_modes={out_modes}) = {math.prod(out_modes)}, kernel shape {kernel_shape}"
            )
    return in_modes, out_modes, normalize_ranks(ranks, len(in_modes))


def max_tt_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> Ranks:
    """The full TT-ranks: ``r_k = min(prod_{l<=k} m_l n_l, prod_{l>k} m_l n_l)`` (the ranks of the
    unfoldings of a generic kernel); TT-SVD at these ranks is exact."""
    in_modes, out_modes, _ = check_tt_shape(in_modes, out_modes)
    mn = [m * n for m, n in zip(in_modes, out_modes)]
    d = len(mn)
    return tuple(min(math.prod(mn[:k]), math.prod(mn[k:])) for k in range(d + 1))


def clip_ranks(ranks: Any, in_modes: Sequence[int], out_modes: Sequence[int]) -> Ranks:
    """``ranks`` (int or sequence, see :func:`normalize_ranks`) clipped to :func:`max_tt_ranks`."""
    full = max_tt_ranks(in_modes, out_modes)
    return tuple(min(r, f) for r, f in zip(normalize_ranks(ranks, len(full) - 1), full))


def tt_core_shapes(in_modes, out_modes, ranks) -> list[tuple[int, int, int, int]]:
    """``[(r_{k-1}, m_k, n_k, r_k) for k = 1..d]``."""
    in_modes, out_modes, ranks = check_tt_shape(in_modes, out_modes, ranks)
    return [(ranks[k], in_modes[k], out_modes[k], ranks[k + 1]) for k in range(len(in_modes))]


def _check_cores(cores: Sequence[Any]) -> list:
    cores = list(cores)
    if not cores:
        raise ValueError("need at least one TT core")
    for k, g in enumerate(cores):
        if getattr(g, "ndim", None) != 4:
            raise ValueError(
                f"TT core {k} must have 4 axes (r_prev, m, n, r_next), got shape {getattr(g, 'shape', None)}"
            )
        prev = 1 if k == 0 else cores[k - 1].shape[3]
        if g.shape[0] != prev:
            raise ValueError(f"TT core {k} has r_prev = {g.shape[0]} but the previous core ends with rank {prev}")
    if cores[-1].shape[3] != 1:
        raise ValueError(f"the last TT core must end with rank 1, got shape {cores[-1].shape}")
    return cores


def _modes_of(cores) -> tuple[Modes, Modes, Ranks]:
    return (tuple(int(g.shape[1]) for g in cores), tuple(int(g.shape[2]) for g in cores),
            (1,) + tuple(int(g.shape[3]) for g in cores))


# ==================================================================================================
# TT-SVD, reconstruction, forward
# ==================================================================================================
def tt_svd(
    kernel: Any,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Any = None,
    *,
    max_rank: int | None = None,
    return_discarded: bool = False,
):
    """TT-SVD of a dense kernel (host-side numpy, computed in float64).

    Args:
      kernel: [prod(in_modes), prod(out_modes)] float array (Flax layout ``(in, out)``).
      in_modes, out_modes: factorizations of the kernel's two sizes (same number ``d`` of modes).
      ranks: target TT-ranks (int or ``(1, r_1, .., r_{d-1}, 1)``); None: full rank
        (:func:`max_tt_ranks`, exact). Each ``r_k`` must be at most
        ``min(r_{k-1} m_k n_k, prod_{l>k} m_l n_l)`` (the size of step ``k``'s SVD); use
        :func:`clip_ranks` first for an int rank above that.
      max_rank: alternative to ``ranks``: every internal rank ``min(max_rank, full rank)``.
      return_discarded: also return ``eps_k^2`` (sum of the squared discarded singular values) of
        each of the ``d - 1`` steps; ``sqrt(sum)`` bounds the Frobenius error (module docstring).

    Returns:
      list of ``d`` float32 numpy cores ``[r_{k-1}, m_k, n_k, r_k]`` (and the tuple of ``eps_k^2``).
    """
    w = np.asarray(kernel)
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"kernel must have a floating dtype, got {w.dtype}")
    in_modes, out_modes, _ = check_tt_shape(in_modes, out_modes, 1, w.shape)
    d = len(in_modes)
    if ranks is not None and max_rank is not None:
        raise ValueError("give either ranks or max_rank, not both")
    full = max_tt_ranks(in_modes, out_modes)
    if ranks is None:
        ranks = full if max_rank is None else clip_ranks(max_rank, in_modes, out_modes)
    ranks = normalize_ranks(ranks, d)
    mn = [m * n for m, n in zip(in_modes, out_modes)]
    # [m_1..m_d, n_1..n_d] -> [m_1, n_1, m_2, n_2, ...] -> [m_1 n_1, ..., m_d n_d]
    t = w.astype(np.float64).reshape(in_modes + out_modes)
    t = t.transpose([a for k in range(d) for a in (k, d + k)]).reshape(mn)
    cores, discarded = [], []
    c = t.reshape(mn[0], -1)
    for k in range(d - 1):
        rows = ranks[k] * mn[k]
        c = c.reshape(rows, -1)
        if ranks[k + 1] > min(c.shape):
            raise ValueError(
                f"ranks[{k + 1}] = {ranks[k + 1]} exceeds the size of TT-SVD step {k + 1} "
                f"(matrix {c.shape[0]} x {c.shape[1]}, ranks[{k}] = {ranks[k]}); at most "
                f"{min(c.shape)} (full ranks {full}); see clip_ranks"
            )
        u, s, vt = np.linalg.svd(c, full_matrices=False)
        r = ranks[k + 1]
        discarded.append(float(np.sum(s[r:] ** 2)))
        cores.append(u[:, :r].reshape(ranks[k], in_modes[k], out_modes[k], r))
        c = s[:r, None] * vt[:r]
    cores.append(c.reshape(ranks[d - 1], in_modes[d - 1], out_modes[d - 1], 1))
    cores = [g.astype(np.float32) for g in cores]
    return (cores, tuple(discarded)) if return_discarded else cores


def tt_to_dense(cores: Sequence[Any]) -> jax.Array:
    """The dense kernel ``[prod(in_modes), prod(out_modes)]`` of TT cores (for tests and checks:
    it materialises ``W``)."""
    cores = _check_cores(cores)
    a = jnp.asarray(cores[0])[0]  # [m_1, n_1, r_1]
    for g in cores[1:]:
        g = jnp.asarray(g)
        mm, nn_, _ = a.shape
        a = jnp.einsum("MNr,rmns->MmNns", a, g).reshape(mm * g.shape[1], nn_ * g.shape[2], g.shape[3])
    return a[..., 0]


def tt_matvec(cores: Sequence[Any], x: jax.Array) -> jax.Array:
    """``x @ W`` for the TT kernel ``W`` of ``cores``, by left-to-right core contractions.

    x: [..., prod(in_modes)] (any leading batch axes, any float dtype); returns
    [..., prod(out_modes)] in the promoted dtype of ``x`` and the cores. ``W`` is never formed;
    the contraction order and its MAC count are in the module docstring (:func:`tt_macs`).
    """
    cores = _check_cores(cores)
    in_modes, out_modes, _ = _modes_of(cores)
    m, n = math.prod(in_modes), math.prod(out_modes)
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != m:
        raise ValueError(f"x must have a last axis of prod(in_modes={in_modes}) = {m}, got shape {x.shape}")
    lead = x.shape[:-1]
    b = math.prod(lead)
    z = x.reshape(b, 1, 1, m)  # [b, p, a, q]
    p, q = 1, m
    for g in cores:
        g = jnp.asarray(g)
        r0, mk, nk, r1 = g.shape
        q //= mk
        z = jnp.einsum("bpamq,amns->bpnsq", z.reshape(b, p, r0, mk, q), g)
        p *= nk
        z = z.reshape(b, p, r1, q)
    return z.reshape(*lead, n)


# ==================================================================================================
# the Flax layer
# ==================================================================================================
def tt_normal_init(in_modes: Sequence[int], ranks: Sequence[int], scale: float = 1.0):
    """Initializer for core ``k`` such that the kernel entries have variance ``scale / prod(in_modes)``
    (LeCun normal): each entry of ``W`` is a sum of ``prod(r_1..r_{d-1})`` products of ``d`` core
    entries, so i.i.d. ``N(0, sigma^2)`` cores give ``Var(W) = prod(r_internal) sigma^(2d)``."""
    d = len(in_modes)
    var_w = scale / math.prod(in_modes)
    sigma = (var_w / math.prod(ranks[1:-1])) ** (1.0 / (2 * d))

    def init(key, shape, dtype=jnp.float32):
        return sigma * jax.random.normal(key, shape, dtype)

    return init


class TTDense(nn.Module):
    """Dense layer with a TT-matrix kernel: ``[..., prod(in_modes)] -> [..., prod(out_modes)]``.

    Parameters: ``core0 .. core{d-1}`` ([r_{k-1}, m_k, n_k, r_k], float32) and ``bias``
    ([prod(out_modes)], zeros) when ``use_bias``. The cores are deliberately not named
    ``kernel``: :func:`fgq_jax.transforms.default_rules` would ternarize a 4-D core with the conv
    grouping, which is the wrong reduction axis for a core; use ``quant`` or
    :func:`ternarize_tt_cores` instead.

    Attributes:
      in_modes, out_modes: factorizations of the input and output sizes (same length d).
      ranks: int (all internal ranks) or ``(1, r_1, ..., r_{d-1}, 1)``.
      use_bias: add a bias.
      quant: None, or a :class:`fgq_jax.transforms.WeightQuant`: the forward uses ternarized cores
        (:func:`ternarize_tt_cores_ste`: per-core FGQ groups along the core's reduction axis,
        straight-through gradient to the float cores), for ternary-aware fine-tuning.
      core_init: initializer of each core (default :func:`tt_normal_init`).

    Initialise from a trained dense layer with :func:`tt_dense_params` (TT-SVD).
    """

    in_modes: Sequence[int]
    out_modes: Sequence[int]
    ranks: Any
    use_bias: bool = True
    quant: Any = None
    core_init: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shapes = tt_core_shapes(self.in_modes, self.out_modes, self.ranks)
        ranks = (1,) + tuple(s[3] for s in shapes)
        init = self.core_init or tt_normal_init(tuple(self.in_modes), ranks)
        cores = [self.param(f"core{k}", init, s, jnp.float32) for k, s in enumerate(shapes)]
        if self.quant is not None:
            q = self.quant
            cores = ternarize_tt_cores_ste(cores, q.group_size, q.method, asymmetric=q.asymmetric)
        y = tt_matvec(cores, x)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (math.prod(self.out_modes),), jnp.float32)
        return y


def tt_dense_params(
    kernel: Any,
    bias: Any | None,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Any = None,
    *,
    max_rank: int | None = None,
) -> dict:
    """``TTDense`` params (``{"core0": .., ..., "bias": ..}``) from a dense kernel [in, out] (TT-SVD,
    see :func:`tt_svd` for ``ranks`` / ``max_rank``) and its bias [out] (None: no bias entry,
    for ``use_bias=False``). Arrays are float32 jax arrays."""
    cores = tt_svd(kernel, in_modes, out_modes, ranks, max_rank=max_rank)
    params = {f"core{k}": jnp.asarray(g) for k, g in enumerate(cores)}
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        if bias.shape != (math.prod(out_modes),):
            raise ValueError(f"bias must have shape ({math.prod(out_modes)},), got {bias.shape}")
        params["bias"] = bias
    return params


def tt_cores_of(params: Mapping[str, Any]) -> list:
    """The cores ``[core0, core1, ...]`` of a ``TTDense`` params dict, in order."""
    names = [k for k in params if k.startswith("core") and k[4:].isdigit()]
    if not names:
        raise ValueError(f"no TT cores (core0, core1, ...) in params with keys {sorted(params)}")
    order = sorted(names, key=lambda k: int(k[4:]))
    if [int(k[4:]) for k in order] != list(range(len(order))):
        raise ValueError(f"TT cores must be named core0..core{len(order) - 1}, got {order}")
    return [params[k] for k in order]


# ==================================================================================================
# accounting
# ==================================================================================================
def tt_params(in_modes, out_modes, ranks) -> int:
    """Stored parameters of the TT kernel: ``sum_k r_{k-1} m_k n_k r_k`` (no bias)."""
    return sum(math.prod(s) for s in tt_core_shapes(in_modes, out_modes, ranks))


def tt_layer_shapes(in_modes, out_modes, ranks, path: str = "tt") -> list[accounting.LayerShape]:
    """The TT forward as ``d`` dense products, for :func:`fgq_jax.accounting.count_ops`.

    Core ``k`` is a "dense" layer ``{path}/core{k}`` with kernel ``(r_{k-1} m_k, n_k r_k)``
    applied at ``n_1..n_{k-1} * m_{k+1}..m_d`` positions per example (output shape
    ``(positions, n_k r_k)``), exactly the contraction :func:`tt_matvec` performs.
    """
    shapes = tt_core_shapes(in_modes, out_modes, ranks)
    in_modes, out_modes = [s[1] for s in shapes], [s[2] for s in shapes]
    out = []
    for k, (r0, m, n, r1) in enumerate(shapes):
        positions = math.prod(out_modes[:k]) * math.prod(in_modes[k + 1:])
        out.append(accounting.LayerShape(f"{path}/core{k}", "dense", (r0 * m, n * r1), (positions, n * r1)))
    return out


def tt_macs(in_modes, out_modes, ranks) -> int:
    """Multiply-accumulates per example of :func:`tt_matvec` (left-to-right order; module docstring)."""
    return sum(ly.macs for ly in tt_layer_shapes(in_modes, out_modes, ranks))


def count_tt_ops(in_modes, out_modes, ranks, quantized: Any = None, scale_bits: int | str = 16,
                 path: str = "tt") -> accounting.Report:
    """:func:`fgq_jax.accounting.count_ops` of a TT layer whose every core is stored as ``quantized``
    (None / "fp": float32; an int N: ternary with groups of N along the core's reduction axis;
    "channel" / "tensor": one scale per core output column / per core)."""
    layers = tt_layer_shapes(in_modes, out_modes, ranks, path)
    return accounting.count_ops(layers, lambda p: quantized, scale_bits)


def tt_bits(in_modes, out_modes, ranks, quantized: Any = None, scale_bits: int | str = 16) -> int:
    """Storage bits of the TT kernel (codes and scales; float32 cores when ``quantized`` is None)."""
    return count_tt_ops(in_modes, out_modes, ranks, quantized, scale_bits).weight_bits


# ==================================================================================================
# ternary cores
# ==================================================================================================
def core_kernel_2d(core: Any) -> jax.Array:
    """A core ``[r_{k-1}, m_k, n_k, r_k]`` as the dense kernel its contraction step applies:
    ``[r_{k-1} m_k, n_k r_k]`` (reduction, out) — a reshape of its memory layout, no transpose."""
    core = jnp.asarray(core)
    if core.ndim != 4:
        raise ValueError(f"a TT core must have 4 axes (r_prev, m, n, r_next), got shape {core.shape}")
    r0, m, n, r1 = core.shape
    return core.reshape(r0 * m, n * r1)


def ternarize_tt_cores(cores: Sequence[Any], group_size: ternary.GroupSize, method: str = "exact",
                       *, mode: str = "ternary", asymmetric: bool = False) -> list:
    """Ternarize every core with FGQ groups along its contraction (reduction) axis.

    Each core is ternarized as the 2-D kernel :func:`core_kernel_2d` ``[r_{k-1} m_k, n_k r_k]``
    with :func:`fgq_jax.ternary.ternarize` (``group_size``, ``method``, ``asymmetric`` as there):
    a group is ``N`` consecutive entries of the reduction vector ``(a, i_k)`` (``i_k`` fastest) of
    one output column ``(j_k, s)``; scales are ``[ceil(r_{k-1} m_k / N), n_k r_k]``.

    Returns (``mode``): "ternary": a list of TernaryTensors of the 2-D shapes (int8 codes, float32
    scales; :func:`dequantize_tt_cores` turns them back into 4-D cores); "fake": the dequantized
    4-D float cores (drop-in for :func:`tt_matvec`).
    """
    if mode not in ("ternary", "fake"):
        raise ValueError(f"mode must be 'ternary' or 'fake', got {mode!r}")
    cores = _check_cores([jnp.asarray(g) for g in cores])
    tts = [ternary.ternarize(core_kernel_2d(g), group_size, method, asymmetric=asymmetric) for g in cores]
    if mode == "ternary":
        return tts
    return [t.dequantize(g.dtype).reshape(g.shape) for t, g in zip(tts, cores)]


def ternarize_tt_cores_ste(cores: Sequence[Any], group_size: ternary.GroupSize, method: str = "exact",
                           **kw: Any) -> list:
    """Fake-quantized cores for training: forward as ``ternarize_tt_cores(..., mode="fake")``,
    identity gradient to the float cores (:func:`fgq_jax.ternary.ternarize_ste`)."""
    return [ternary.ternarize_ste(core_kernel_2d(g), group_size, method, **kw).reshape(jnp.shape(g))
            for g in cores]


def dequantize_tt_cores(tcores: Sequence[ternary.TernaryTensor], in_modes, out_modes, ranks,
                        dtype=jnp.float32) -> list:
    """4-D float cores from the TernaryTensors of :func:`ternarize_tt_cores` (``mode="ternary"``)."""
    shapes = tt_core_shapes(in_modes, out_modes, ranks)
    if len(tcores) != len(shapes):
        raise ValueError(f"got {len(tcores)} ternary cores for {len(shapes)} TT cores")
    out = []
    for k, (t, s) in enumerate(zip(tcores, shapes)):
        if tuple(t.shape) != (s[0] * s[1], s[2] * s[3]):
            raise ValueError(f"ternary core {k} has shape {t.shape}, expected {(s[0] * s[1], s[2] * s[3])}")
        out.append(t.dequantize(dtype).reshape(s))
    return out


def ternary_cores_bits(tcores: Sequence[ternary.TernaryTensor], scale_bits: int = 16,
                       code_bits: int = 2) -> int:
    """Storage of actual TernaryTensors: ``code_bits`` per code plus ``scale_bits`` per stored scale
    (both scale arrays for asymmetric tensors)."""
    bits = 0
    for t in tcores:
        n_scales = t.scales.size + (t.neg_scales.size if t.neg_scales is not None else 0)
        bits += code_bits * t.codes.size + scale_bits * n_scales
    return bits


# ==================================================================================================
# compression of classic fully-connected layers (the paper's VGG-16 settings, and AlexNet)
# ==================================================================================================
_VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG16_FCS = ((25088, 4096), (4096, 4096), (4096, 1000))
_ALEXNET_CONVS = ((3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3))  # (cin, cout, k)
_ALEXNET_FCS = ((9216, 4096), (4096, 4096), (4096, 1000))


def _vgg16_conv_params() -> int:
    total, cin = 0, 3
    for c in _VGG16_CONVS:
        if c != "M":
            total += 9 * cin * c + c
            cin = c
    return total


def _network_params(conv_params: int, fcs) -> int:
    return conv_params + sum(i * o + o for i, o in fcs)


def network_params(name: str) -> int:
    """Parameters (weights and biases) of "vgg16" (138,357,544) or "alexnet" (61,100,840), the
    torchvision architectures, computed from their layer shapes."""
    if name == "vgg16":
        return _network_params(_vgg16_conv_params(), _VGG16_FCS)
    if name == "alexnet":
        conv = sum(k * k * ci * co + co for ci, co, k in _ALEXNET_CONVS)
        return _network_params(conv, _ALEXNET_FCS)
    raise ValueError(f"unknown network {name!r}; expected 'vgg16' or 'alexnet'")


# The paper's VGG-16 modes (Sec. 6.3: 6-dimensional TT-layers): fc6 25088 = 2*7*8*8*7*4 -> 4096 = 4^6,
# fc7 4096 = 4^6 -> 4^6. fc8 (kept dense in the paper) and AlexNet's layers use modes of our choice.
_SIX_FOURS = (4, 4, 4, 4, 4, 4)
FC_MODES = {
    ("vgg16", "fc6"): ((2, 7, 8, 8, 7, 4), _SIX_FOURS),
    ("vgg16", "fc7"): (_SIX_FOURS, _SIX_FOURS),
    ("vgg16", "fc8"): (_SIX_FOURS, (2, 5, 5, 5, 2, 2)),
    ("alexnet", "fc6"): ((2, 6, 8, 8, 6, 2), _SIX_FOURS),
    ("alexnet", "fc7"): (_SIX_FOURS, _SIX_FOURS),
    ("alexnet", "fc8"): (_SIX_FOURS, (2, 5, 5, 5, 2, 2)),
}
# Novikov et al. 2015, Table 2 (VGG-16 columns): compression of the TT-layers' weights (the dense
# kernels' parameters / the TT cores' parameters, biases excluded) and of the whole network.
PAPER_VGG16 = {
    "TT4 FC FC": {"layers": 50972, "network": 3.9},
    "TT2 FC FC": {"layers": 194622, "network": 3.9},
    "TT1 FC FC": {"layers": 713614, "network": 3.9},
    "TT4 TT4 FC": {"layers": 37732, "network": 7.4},
}


def _architecture_rows(net: str, arch: str, group_sizes: Sequence[int], scale_bits: int) -> dict:
    """One "TTr FC FC"-style architecture: which of fc6/fc7/fc8 are TT (and at which rank)."""
    parts = arch.split()
    fcs = _VGG16_FCS if net == "vgg16" else _ALEXNET_FCS
    total = network_params(net)
    dense_w, tt_w, layers = 0, 0, []
    fp_bits_other = 32 * total
    tern = {n: 0 for n in group_sizes}
    for name, part, (i, o) in zip(("fc6", "fc7", "fc8"), parts, fcs):
        if part == "FC":
            continue
        rank = int(part[2:])
        in_m, out_m = FC_MODES[(net, name)]
        dense_w += i * o
        tt_w += tt_params(in_m, out_m, rank)
        for n in group_sizes:
            tern[n] += tt_bits(in_m, out_m, rank, n, scale_bits)
        layers.append(name)
    row = {
        "network": net,
        "architecture": arch,
        "tt_layers": layers,
        "dense_weights": dense_w,
        "tt_weights": tt_w,
        "layers_compression": dense_w / tt_w,
        "network_params": total,
        "network_params_tt": total - dense_w + tt_w,
        "network_compression": total / (total - dense_w + tt_w),
    }
    for n in group_sizes:
        # ternary TT cores; every other weight and bias stays float32
        row[f"layers_compression_ternary_n{n}"] = 32 * dense_w / tern[n]
        row[f"network_compression_ternary_n{n}"] = fp_bits_other / (fp_bits_other - 32 * dense_w + tern[n])
    paper = PAPER_VGG16.get(arch) if net == "vgg16" else None
    row["paper_layers_compression"] = paper["layers"] if paper else None
    row["paper_network_compression"] = paper["network"] if paper else None
    return row


def paper_fc_compression(group_sizes: Sequence[int] = (4, 16), scale_bits: int = 16) -> dict:
    """Compression of AlexNet's and VGG-16's fully-connected layers in TT format.

    Everything here is *computed* from the layer shapes with :func:`tt_params` / :func:`tt_bits`.
    From the paper (Novikov et al. 2015) are only: the VGG-16 modes of fc6 (2x7x8x8x7x4 -> 4^6) and
    fc7 (4^6 -> 4^6), the equal TT-ranks 1, 2, 4, and the reference figures in
    ``paper_layers_compression`` / ``paper_network_compression`` (Table 2, VGG-16; the "up to
    200,000x" of the abstract is TT2 FC FC's 194,622x, the "up to 7x" network figure is TT4 TT4 FC's
    7.4x). The computed values match those (the paper truncates the layer ratios to integers).
    VGG-16 fc8 and all AlexNet modes are our choice (6 modes like the paper's); AlexNet rows and
    VGG-16 TT rows for fc8 have no paper reference (None).

    Compression ratios count weights only (biases excluded) for layers, and every parameter
    (weights and biases) for networks. ``*_ternary_n{N}``: the TT cores ternarized with groups of N
    (2-bit codes + one ``scale_bits`` scale per group, :func:`tt_bits`) against float32.

    Returns ``{"layers": [...], "architectures": [...]}`` (JSON-serialisable).
    """
    layers = []
    for net, fcs in (("vgg16", _VGG16_FCS), ("alexnet", _ALEXNET_FCS)):
        for name, (i, o) in zip(("fc6", "fc7", "fc8"), fcs):
            in_m, out_m = FC_MODES[(net, name)]
            for rank in (1, 2, 4):
                row = {
                    "network": net, "layer": name, "shape": f"{i}x{o}",
                    "in_modes": "x".join(map(str, in_m)), "out_modes": "x".join(map(str, out_m)),
                    "rank": rank, "dense_weights": i * o, "tt_weights": tt_params(in_m, out_m, rank),
                    "dense_macs": i * o, "tt_macs": tt_macs(in_m, out_m, rank),
                    "modes_from_paper": net == "vgg16" and name in ("fc6", "fc7"),
                }
                row["compression"] = row["dense_weights"] / row["tt_weights"]
                for n in group_sizes:
                    row[f"compression_ternary_n{n}"] = 32 * i * o / tt_bits(in_m, out_m, rank, n, scale_bits)
                layers.append(row)
    archs = [_architecture_rows(net, a, group_sizes, scale_bits)
             for net in ("vgg16", "alexnet")
             for a in ("TT4 FC FC", "TT2 FC FC", "TT1 FC FC", "TT4 TT4 FC", "TT4 TT4 TT4")]
    return {"group_sizes": list(group_sizes), "scale_bits": scale_bits, "layers": layers,
            "architectures": archs}


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows]


def _fmt(v: Any) -> str:
    """Thousands separators; floats with one decimal; None as an empty cell."""
    if v is None:
        return ""
    return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"


def compression_markdown(table: Mapping[str, Any]) -> str:
    """The :func:`paper_fc_compression` result as two markdown tables."""
    ns = table["group_sizes"]
    layer_rows = [
        [r["network"], r["layer"], r["shape"], r["in_modes"], r["out_modes"], str(r["rank"]),
         _fmt(r["dense_weights"]), _fmt(r["tt_weights"]), _fmt(r["compression"])]
        + [_fmt(r[f"compression_ternary_n{n}"]) for n in ns]
        + [_fmt(r["dense_macs"]), _fmt(r["tt_macs"]), "yes" if r["modes_from_paper"] else "no"]
        for r in table["layers"]
    ]
    arch_rows = [
        [r["network"], r["architecture"], _fmt(r["layers_compression"]), _fmt(r["paper_layers_compression"]),
         f"{r['network_compression']:.2f}", _fmt(r["paper_network_compression"])]
        + [f"{_fmt(r[f'layers_compression_ternary_n{n}'])} / {r[f'network_compression_ternary_n{n}']:.2f}"
           for n in ns]
        for r in table["architectures"]
    ]
    out = [
        "# TT compression of AlexNet's and VGG-16's fully-connected layers",
        "",
        "Computed by `fgq_jax.tt.paper_fc_compression`; written by every `python -m experiments.tt_head` "
        "run (`--compression-only`: nothing else). Reference values from Novikov et al. 2015 (Table 2, VGG-16) are in the "
        "`paper` columns; every other number is computed from the shapes. Layer ratios count weights "
        "(no biases); network ratios count all parameters. Ternary: TT cores with 2-bit codes and one "
        f"fp{table['scale_bits']} scale per group of N along each core's reduction axis, vs float32.",
        "",
        "## Layers",
        "",
        *_md_table(["net", "layer", "shape", "in modes", "out modes", "rank", "dense weights", "TT weights",
                    "compression"] + [f"ternary N={n}" for n in ns]
                   + ["dense MACs", "TT MACs", "modes from paper"], layer_rows),
        "",
        "## Networks (fc6 fc7 fc8: TTr = TT layer of rank r, FC = dense)",
        "",
        *_md_table(["net", "architecture", "TT-layers compression", "paper", "network compression", "paper"]
                   + [f"layers / network, ternary N={n}" for n in ns], arch_rows),
    ]
    return "\n".join(out) + "\n"
