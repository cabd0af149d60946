"""Ternary weight quantization with fine-grained groups (FGQ, Mellempudi et al. 2017).

Everything here is pure ``jax.numpy`` and jit-able; the kernel may be traced, the group size,
method and grouping are static.

Grouping rule (this module is its only implementation: ``group_ids`` / ``group_onehot`` expose it to
the integer path and the repairs). Kernels use the Flax layout: conv ``(kh, kw, cin, cout)``,
dense ``(in, out)``; the last axis is the output channel. For each output channel the other axes
are flattened row-major (``cin`` fastest) into its reduction vector of length ``L = kh*kw*cin``:

* ``group_size=N`` (int >= 1): consecutive groups of ``N`` elements of that vector; the last group
  is shorter when ``N`` does not divide ``L``; ``N >= L`` gives one group per output channel. When
  ``N`` divides ``cin`` a group is ``N`` consecutive input channels at one ``(kh, kw)`` tap.
* ``group_size="channel"``: one group per output channel (same as ``N >= L``).
* ``group_size=None``: one group for the whole tensor (per-tensor, TWN-style).
* ``grouping="kernel"``: one group per ``(cin, cout)`` kernel slice (its ``kh*kw`` taps, TNT-style);
  ``group_size`` is ignored.

Scales are stored ``[G, cout]`` (G = groups per output channel); per-tensor scales are ``[1, 1]``;
per-kernel-slice scales are ``[cin, cout]``.

Internally a kernel becomes a ``groups`` array ``[..., n]`` (one group per row of the last axis,
ragged groups zero-padded) plus a broadcastable validity ``mask``; every method is a small function
``(groups f32 [..., n], mask bool [..., n]) -> (codes int8 [..., n], scale_pos f32 [...],
scale_neg f32 [...])`` registered in :data:`METHODS`.

The ``"exact"`` method minimises ``||w - alpha t||^2`` per group over ``alpha >= 0`` and
``t in {-1, 0, 1}^n``: with magnitudes sorted descending and prefix sums ``S_k``, the optimum keeps
the ``k* = argmax_k S_k^2 / k`` largest magnitudes with ``alpha = S_k* / k*``. Four
implementations share this definition (chosen statically by the group length ``n``):

* ``n <= 8``: an unrolled Batcher sorting network (XLA fuses it into one loop);
* ``n <= 256``: a bitonic sorting network, one fused pass per stage over cache-sized blocks
  (per-channel groups of 1x1 convs with 64 < cin <= 256 included: 2-4x faster than the histogram
  search there; at n = 512 the unrolled scan of the sorted list becomes pathologically slow);
* ``n`` in 512, 1024 (per-channel groups of 1x1 convs with cin = 512 or 1024): the bitonic
  network with a vectorized (cumsum/argmax) scan for the best cut (1.4-1.7x faster than the
  histogram search there; groups that need padding to a power of two are not);
* larger groups (per channel, per tensor): a sort-free search over histograms of the float bit
  patterns with an optimality certificate (see :func:`_exact_hist`), falling back to a full sort
  for the rare tensor it cannot certify. XLA's CPU sort is ~70x slower than numpy's, so a
  multi-million-element per-tensor group must not be sorted.
Each sorted magnitude list is scanned once for the best cut (:func:`_best_cut_unrolled`).

"Exact" is exact up to float32 rounding of the objective: in a group of thousands of weights two
cuts can differ by less than float32 resolution (~1e-8 relative in ``S_k^2/k``); either may be
returned (their squared errors agree to that precision). The histogram search certifies its cut to
within ``_HIST_TOL`` (1e-6 relative in ``S_k^2/k``); measured against a float64 sort it is
typically within 1e-7.

Ties: only "ends of tie runs" (``s_k > s_{k+1}``) are candidate cut points, so the codes are always
the threshold set ``{|w| >= thr}`` and ``alpha`` is exactly its mean magnitude. This loses nothing:
along a run of equal magnitudes ``S_k^2/k`` is quasi-convex, so its maximum is at a run end.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GroupSize",
    "METHODS",
    "GROUPINGS",
    "TernaryTensor",
    "ternarize",
    "ternarize_ste",
    "quantize_int8_weights",
    "quantize_int8_weights_ste",
    "normalize_group_size",
    "check_kernel_shape",
    "group_ids",
    "group_onehot",
    "scales_shape",
    "broadcast_scales",
    "is_ternary",
    "dequantize_tree",
]

GroupSize = Union[int, None, Literal["channel"]]
GROUPINGS = ("input", "kernel")
MethodFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]

# Static size limits of the four "exact" implementations (group length n).
_UNROLLED_MAX = 8
_BITONIC_MAX = 256
_BITONIC_VEC_MAX = 1024  # powers of two up to this: bitonic network + vectorized cut scan
_NETWORK_BLOCK = 1 << 17  # elements per lax.map block of the bitonic path (~512 KB, L2-sized)


# ==================================================================================================
# argument checking
# ==================================================================================================
def normalize_group_size(group_size: Any) -> GroupSize:
    """Validate ``group_size`` and return it normalised (a Python int, ``"channel"`` or None).

    Raises TypeError for bools, floats and other non-integers; ValueError for ints <= 0 and
    unknown strings.
    """
    if group_size is None:
        return None
    if isinstance(group_size, str):
        if group_size == "channel":
            return "channel"
        raise ValueError(
            f"group_size must be an int >= 1, 'channel' or None; got the string {group_size!r}"
        )
    if isinstance(group_size, (bool, np.bool_)):
        raise TypeError(f"group_size must be an int >= 1, 'channel' or None; got a bool ({group_size})")
    try:
        n = operator.index(group_size)  # accepts int and numpy integers, rejects 4.0
    except TypeError:
        raise TypeError(
            f"group_size must be an int >= 1, 'channel' or None; got {group_size!r} "
            f"({type(group_size).__name__})"
        ) from None
    if n <= 0:
        raise ValueError(f"group_size must be >= 1, got {n}")
    return int(n)


def check_kernel_shape(shape: tuple[int, ...], what: str = "kernel") -> None:
    """Kernels must have >= 2 axes (Flax layout, last axis = output channel)."""
    if len(shape) < 2:
        raise ValueError(
            f"{what} must have at least 2 axes (Flax layout (..., cin, cout) or (in, out)); "
            f"got shape {tuple(shape)} with {len(shape)} axes"
        )
    if 0 in tuple(shape):
        raise ValueError(f"{what} is empty (shape {tuple(shape)}): there are no weights to group")


def _check_method(method: str) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown ternarization method {method!r}; known methods: {sorted(METHODS)}")


def _check_grouping(grouping: str) -> None:
    if not isinstance(grouping, str) or grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")


def _as_float_kernel(kernel: Any) -> jax.Array:
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"kernel must have a floating dtype, got {kernel.dtype}")
    check_kernel_shape(kernel.shape)
    return kernel


# ==================================================================================================
# grouping: kernel <-> groups [..., n]
# ==================================================================================================
@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a kernel of ``shape`` maps to a groups array ``[..., n]`` and scales ``[G, cout]``."""

    shape: tuple[int, ...]
    group_size: GroupSize
    grouping: str

    @property
    def cout(self) -> int:
        return self.shape[-1]

    @property
    def length(self) -> int:  # L: reduction-vector length per output channel
        return math.prod(self.shape[:-1])

    @property
    def n(self) -> int:  # elements per group (padded length of the last group)
        if self.grouping == "kernel":
            return math.prod(self.shape[:-2])
        if self.group_size is None:
            return math.prod(self.shape)
        if self.group_size == "channel":
            return self.length
        return min(self.group_size, self.length)

    @property
    def groups_per_channel(self) -> int:  # G (rows of the scales array)
        if self.grouping == "kernel":
            return self.shape[-2]
        if self.group_size is None:
            return 1
        return -(-self.length // self.n)

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (1, 1) if self.group_size is None and self.grouping == "input" else (
            self.groups_per_channel, self.cout)

    @property
    def pad(self) -> int:  # zero elements appended to each reduction vector
        if self.grouping == "kernel" or self.group_size is None:
            return 0
        return self.groups_per_channel * self.n - self.length


def group_ids(shape, group_size: GroupSize, grouping: str = "input") -> np.ndarray:
    """Group index of each element of an output channel's reduction vector, int64 [L].

    ``L = prod(shape[:-1])``; the reduction vector is the row-major flatten of all kernel axes but
    the last (conv ``(kh, kw, cin)`` with cin fastest; dense ``(in,)``). ``grouping="input"``: int N
    -> ``i // N`` (last group shorter when N does not divide L); "channel" or None -> one group (None
    shares it over the output channels too). ``grouping="kernel"``: ``i % cin``, one group per
    input channel (the kh*kw taps of a (cin, cout) pair). The same groups for every output channel.
    """
    shape = tuple(int(s) for s in shape)
    check_kernel_shape(shape)
    _check_grouping(grouping)
    lay = _Layout(shape, None if grouping == "kernel" else normalize_group_size(group_size), grouping)
    idx = np.arange(lay.length)
    if grouping == "kernel":
        return idx % shape[-2]
    if lay.group_size is None:
        return np.zeros(lay.length, np.int64)
    return idx // lay.n


def scales_shape(shape, group_size: GroupSize, grouping: str = "input") -> tuple[int, int]:
    """Shape of the scales array of a kernel of ``shape``: [G, cout], [1, 1] per tensor, [cin, cout]
    per kernel slice."""
    shape = tuple(int(s) for s in shape)
    check_kernel_shape(shape)
    _check_grouping(grouping)
    gs = None if grouping == "kernel" else normalize_group_size(group_size)
    return _Layout(shape, gs, grouping).scales_shape


def group_onehot(shape, group_size: GroupSize, grouping: str = "input") -> np.ndarray:
    """E float32 [L, G]: E[l, g] = 1 when element l of a reduction vector is in group g."""
    gid = group_ids(shape, group_size, grouping)
    return np.eye(int(gid.max()) + 1, dtype=np.float32)[gid]


def broadcast_scales(scales: jax.Array, shape, group_size: GroupSize, grouping: str = "input") -> jax.Array:
    """Scales [G, cout] (``scales_shape``) -> float array broadcastable to the kernel ``shape``:
    element (.., l, k) holds the scale of the group of element l of output channel k. Traceable, so
    gradients flow to the scales (the relaxation of `fgq_jax.reconstruct`)."""
    shape = tuple(int(s) for s in shape)
    gs = None if grouping == "kernel" else normalize_group_size(group_size)
    return _scales_full(jnp.asarray(scales), _Layout(shape, gs, grouping))


def _to_groups(kernel: jax.Array, lay: _Layout) -> tuple[jax.Array, jax.Array]:
    """kernel -> (groups f32 [..., n], mask bool broadcastable to groups).

    input grouping: [G, cout, n] (row g, col c = elements g*n..g*n+n-1 of channel c's vector);
    per-tensor: [1, 1, size]; kernel grouping: [cin, cout, kh*kw].
    """
    x = kernel.astype(jnp.float32)
    if lay.grouping == "kernel":
        cin, cout = lay.shape[-2:]
        g = jnp.moveaxis(x.reshape(lay.n, cin, cout), 0, -1)
        return g, jnp.ones((1, 1, lay.n), bool)
    if lay.group_size is None:
        return x.reshape(1, 1, -1), jnp.ones((1, 1, lay.n), bool)
    w = x.reshape(lay.length, lay.cout)
    if lay.pad:
        w = jnp.pad(w, ((0, lay.pad), (0, 0)))  # zero padding; masked out below
    g = jnp.moveaxis(w.reshape(lay.groups_per_channel, lay.n, lay.cout), 1, -1)
    pos = np.arange(lay.groups_per_channel * lay.n).reshape(lay.groups_per_channel, 1, lay.n)
    return g, jnp.asarray(pos < lay.length)


def _from_groups(x: jax.Array, lay: _Layout) -> jax.Array:
    """Inverse of :func:`_to_groups` for an array shaped like the groups (e.g. codes)."""
    if lay.grouping == "kernel":
        return jnp.moveaxis(x, -1, 0).reshape(lay.shape)
    if lay.group_size is None:
        return x.reshape(lay.shape)
    w = jnp.moveaxis(x, -1, 1).reshape(lay.groups_per_channel * lay.n, lay.cout)
    return w[: lay.length].reshape(lay.shape)


def _scales_full(scales: jax.Array, lay: _Layout) -> jax.Array:
    """Scales [G, cout] -> array broadcastable to the kernel shape."""
    if lay.grouping == "kernel":
        return jnp.broadcast_to(scales, lay.shape)  # [cin, cout] broadcasts over (kh, kw)
    if lay.group_size is None:
        return scales.reshape(())
    full = jnp.repeat(scales, lay.n, axis=0, total_repeat_length=lay.groups_per_channel * lay.n)
    return full[: lay.length].reshape(lay.shape)


# ==================================================================================================
# the ternary tensor
# ==================================================================================================
@dataclasses.dataclass(frozen=True)
class TernaryTensor:
    """Ternary codes plus per-group scales; a registered pytree (arrays are children).

    Fields:
      codes: int8, the kernel's shape, values in {-1, 0, 1}.
      scales: float32 [G, cout] (per-tensor: [1, 1]; grouping="kernel": [cin, cout]); the scale of
        the +1 codes (and of the -1 codes unless ``neg_scales`` is set). Always >= 0.
      neg_scales: float32 like ``scales`` (asymmetric two-scale tensors: the -1 codes' scale) or None.
      shape, group_size, grouping, method: static metadata.
    """

    codes: jax.Array
    scales: jax.Array
    neg_scales: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    group_size: GroupSize = dataclasses.field(metadata=dict(static=True))
    grouping: str = dataclasses.field(default="input", metadata=dict(static=True))
    method: str = dataclasses.field(default="exact", metadata=dict(static=True))

    @property
    def _layout(self) -> _Layout:
        return _Layout(tuple(self.shape), self.group_size, self.grouping)

    @property
    def asymmetric(self) -> bool:
        return self.neg_scales is not None

    @property
    def num_groups(self) -> int:
        """Total number of groups (= number of scales per sign) in the tensor."""
        lay = self._layout
        return math.prod(lay.scales_shape)

    def group_size_int(self, length: int | None = None) -> int:
        """Elements per group (the padded length of a ragged last group) for a reduction vector of
        ``length`` (default: this kernel's ``L``). Per-tensor groups: the tensor size."""
        lay = self._layout
        if length is None or lay.grouping == "kernel" or lay.group_size is None:
            return lay.n
        if lay.group_size == "channel":
            return int(length)
        return min(int(lay.group_size), int(length))

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """alpha * t as a float array of the kernel's shape (``dtype``, default float32)."""
        return _dequantize_jit(self.codes, self.scales, self.neg_scales, self._layout,
                               jnp.dtype(dtype))


def is_ternary(x: Any) -> bool:
    """True for a :class:`TernaryTensor` (the ``is_leaf`` of every tree walk over ternary trees)."""
    return isinstance(x, TernaryTensor)


def dequantize_tree(tree: Any) -> Any:
    """Replace every TernaryTensor leaf by its float kernel (the fake-quant tree for model.apply)."""
    return jax.tree.map(lambda x: x.dequantize() if is_ternary(x) else x, tree, is_leaf=is_ternary)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _dequantize_jit(codes, scales, neg_scales, lay: _Layout, dtype) -> jax.Array:
    pos = _scales_full(scales, lay)
    neg = pos if neg_scales is None else _scales_full(neg_scales, lay)
    w = jnp.where(codes > 0, pos, jnp.where(codes < 0, -neg, jnp.zeros((), jnp.float32)))
    return w.astype(dtype)


jax.tree_util.register_dataclass(
    TernaryTensor,
    data_fields=["codes", "scales", "neg_scales"],
    meta_fields=["shape", "group_size", "grouping", "method"],
)


# ==================================================================================================
# methods: (groups [..., n] f32, mask [..., n] bool) -> (codes int8 [..., n], pos [...], neg [...])
# ==================================================================================================
def _sign_codes(groups: jax.Array, keep: jax.Array) -> jax.Array:
    """sign(w) where ``keep``, else 0, as int8."""
    return jnp.where(keep, jnp.where(groups > 0, 1, -1), 0).astype(jnp.int8)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0 (empty groups get a zero scale, never NaN)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0).astype(jnp.float32)


def _masked_mean_abs(groups: jax.Array, keep: jax.Array) -> jax.Array:
    keep = jnp.broadcast_to(keep, groups.shape)
    return _safe_div(jnp.sum(jnp.where(keep, jnp.abs(groups), 0.0), -1), jnp.sum(keep, -1))


def _method_twn(groups, mask):
    """TWN (Li & Liu 2016): delta = 0.7 * mean|w|; alpha = mean of |w| over |w| > delta."""
    a = jnp.abs(groups)
    delta = 0.7 * _masked_mean_abs(groups, mask)
    keep = mask & (a > delta[..., None])
    alpha = _masked_mean_abs(groups, keep)
    return _sign_codes(groups, keep), alpha, alpha


def _method_absmean(groups, mask):
    """BitNet b1.58: alpha = mean|w|; t = round(clip(w / alpha, -1, 1)); alpha = 0 -> codes 0."""
    alpha = _masked_mean_abs(groups, mask)
    safe = jnp.where(alpha > 0, alpha, 1.0)[..., None]
    t = jnp.round(jnp.clip(groups / safe, -1.0, 1.0))
    t = jnp.where(mask & (alpha[..., None] > 0), t, 0.0)
    return t.astype(jnp.int8), alpha, alpha


def _method_binary(groups, mask):
    """BinaryConnect / XNOR: t = sign(w) with sign(0) = +1 (codes in {-1, +1}); alpha = mean|w|."""
    alpha = _masked_mean_abs(groups, mask)
    codes = jnp.where(mask, jnp.where(groups >= 0, 1, -1), 0).astype(jnp.int8)
    return codes, alpha, alpha


def _method_exact(groups, mask):
    """FGQ exact: per group the least-squares optimal alpha >= 0 and t in {-1,0,1}^n."""
    # Padding becomes 0: a zero magnitude is never kept, so it cannot change the optimum.
    thr, alpha = _exact_threshold(jnp.where(mask, groups, 0.0))
    return _threshold_codes(groups, mask, thr), alpha, alpha


def _threshold_codes(groups, mask, thr):
    """sign(w) on {|w| >= thr}. Written without |w| so that XLA does not keep the magnitudes
    array alive (and copy it into the search loop) just for this last pass."""
    t = thr[..., None]
    return jnp.where(mask & (groups >= t), 1, jnp.where(mask & (groups <= -t), -1, 0)).astype(jnp.int8)


METHODS: dict[str, MethodFn] = {
    "exact": _method_exact,
    "twn": _method_twn,
    "absmean": _method_absmean,
    "binary": _method_binary,
}


def _asymmetric_scales(groups, mask, codes):
    """Two scales (TNT-style): mean |w| of the +1 codes and of the -1 codes (0 if none)."""
    pos = _masked_mean_abs(groups, mask & (codes > 0))
    neg = _masked_mean_abs(groups, mask & (codes < 0))
    return pos, neg


# ==================================================================================================
# exact: sorted-magnitude search
# ==================================================================================================
def _best_cut(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Best cut of magnitudes sorted descending along axis -2 (zeros and padding last).

    s: f32 [..., n, m]. Returns (thr, alpha), each [..., m]: keep {|w| >= thr}, scale alpha.
    Candidates are ends of tie runs with a positive magnitude; no candidate (all-zero group) ->
    thr = inf, alpha = 0. Vectorised form (cumsum + argmax) for the large-n fallback.
    """
    n = s.shape[-2]
    csum = jnp.cumsum(s, axis=-2)
    k = jnp.arange(1, n + 1, dtype=jnp.float32)[:, None]
    nxt = jnp.concatenate([s[..., 1:, :], jnp.full_like(s[..., :1, :], -jnp.inf)], axis=-2)
    cand = (s > 0) & (s > nxt)
    # S/s_max keeps S^2 far from float32 overflow; a positive factor does not move the argmax
    r = csum / jnp.where(s[..., :1, :] > 0, s[..., :1, :], 1.0)
    f = jnp.where(cand, r * r / k, -1.0)
    best = jnp.argmax(f, axis=-2)[..., None, :]
    any_cand = jnp.any(cand, axis=-2)
    thr = jnp.where(any_cand, jnp.take_along_axis(s, best, -2)[..., 0, :], jnp.inf)
    kk = (best[..., 0, :] + 1).astype(jnp.float32)
    alpha = jnp.where(any_cand, jnp.take_along_axis(csum, best, -2)[..., 0, :] / kk, 0.0)
    return thr, alpha


def _best_cut_unrolled(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Same as :func:`_best_cut` for small n, as one running pass over k = 1..n.

    XLA fuses this chain into a single elementwise loop; its column cumsum/argmax reductions
    are several times slower on CPU.
    """
    n = s.shape[-2]
    rows = [s[..., i, :] for i in range(n)]
    inv = 1.0 / jnp.where(rows[0] > 0, rows[0], 1.0)
    csum = jnp.zeros_like(rows[0])
    best_f = jnp.full_like(csum, -1.0)
    thr = jnp.full_like(csum, jnp.inf)
    best_s = jnp.zeros_like(csum)
    best_k = jnp.ones_like(csum)
    for k in range(1, n + 1):
        v = rows[k - 1]
        csum = csum + v
        r = csum * inv
        cand = (v > 0) & (v > rows[k]) if k < n else v > 0
        f = jnp.where(cand, r * r / k, -1.0)
        better = f > best_f
        best_f = jnp.where(better, f, best_f)
        thr = jnp.where(better, v, thr)
        best_s = jnp.where(better, csum, best_s)
        best_k = jnp.where(better, float(k), best_k)
    return thr, best_s / best_k


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for n inputs.

    Built for the next power of two and pruned to indices < n, which is valid when the (virtual)
    padding sorts last: a comparator with j >= n then never swaps.
    """
    p2 = 1 << max(n - 1, 0).bit_length()
    pairs, p = [], 1
    while p < p2:
        k = p
        while k >= 1:
            for j in range(k % p, p2 - k, 2 * k):
                for i in range(min(k, p2 - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return [(i, j) for i, j in pairs if j < n]


def _sort_desc_unrolled(x: jax.Array) -> jax.Array:
    """Sort [..., n, m] descending along axis -2 with an unrolled Batcher network (small n)."""
    s = [x[..., i, :] for i in range(x.shape[-2])]
    for i, j in _batcher_pairs(len(s)):
        s[i], s[j] = jnp.maximum(s[i], s[j]), jnp.minimum(s[i], s[j])
    return jnp.stack(s, axis=-2)


def _sort_desc_bitonic(x: jax.Array) -> jax.Array:
    """Sort [..., n, m] descending along axis -2 with a bitonic network (n padded to a power of 2).

    Each stage is a reshape + max/min over the whole array, so XLA emits one fused elementwise
    pass per stage (log2(n) * (log2(n)+1) / 2 stages) instead of a generic sort (which calls a
    comparator per comparison and is ~20x slower on CPU). The "flip" form of the network is used:
    the first stage of each merge compares i with its mirror image in the block, so every
    comparator puts the max first and no per-block direction masks are needed.
    """
    lead, n, m = x.shape[:-2], x.shape[-2], x.shape[-1]
    p2 = 1 << max(n - 1, 0).bit_length()
    if p2 != n:  # padding sorts last
        pad = jnp.full(lead + (p2 - n, m), -jnp.inf, x.dtype)
        x = jnp.concatenate([x, pad], axis=-2)
    k = 2
    while k <= p2:
        # flip: merge two sorted halves of each block of k (the second read backwards)
        xr = x.reshape(lead + (p2 // k, 2, k // 2, m))
        lo, hi = xr[..., 0, :, :], jnp.flip(xr[..., 1, :, :], axis=-2)
        x = jnp.stack([jnp.maximum(lo, hi), jnp.flip(jnp.minimum(lo, hi), axis=-2)], axis=-3)
        x = x.reshape(lead + (p2, m))
        j = k // 4
        while j >= 1:  # half-cleaners
            xr = x.reshape(lead + (p2 // (2 * j), 2, j, m))
            lo, hi = xr[..., 0, :, :], xr[..., 1, :, :]
            x = jnp.stack([jnp.maximum(lo, hi), jnp.minimum(lo, hi)], axis=-3).reshape(lead + (p2, m))
            j //= 2
        k *= 2
    return x[..., :n, :]


def _exact_sorted(a: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
    """Exact threshold by sorting each group. a: f32 [..., n] magnitudes (padding: 0).

    Works on the [..., n, m] view (m = the axis before n, the output channels for the
    input-channel grouping): for a kernel that is its natural memory layout, so there is no
    transpose, and every network stage reads contiguous rows.
    """
    if a.ndim == 1:
        a = a[None]
    x = jnp.swapaxes(a, -1, -2)
    if impl == "unrolled":
        thr, alpha = _best_cut_unrolled(_sort_desc_unrolled(x))
    elif impl in ("bitonic", "bitonic_vec"):
        # The ~20 network stages each make a pass over the data: run them on cache-sized blocks
        # of groups (lax.map) so that those passes stay in L2 (2-4x faster on a 2-core CPU).
        lead, (n, m) = x.shape[:-2], x.shape[-2:]
        x3 = x.reshape((-1, n, m))
        # "bitonic_vec" (n > 256): the unrolled scan's chain of n steps gets slow to compile and
        # to run; the cumsum/argmax scan is then faster
        cut = _best_cut_unrolled if impl == "bitonic" else _best_cut
        batch = max(1, _NETWORK_BLOCK // (n * m))
        if x3.shape[0] > batch:
            thr, alpha = jax.lax.map(lambda y: cut(_sort_desc_bitonic(y)), x3, batch_size=batch)
        else:
            thr, alpha = cut(_sort_desc_bitonic(x3))
        thr, alpha = thr.reshape(lead + (m,)), alpha.reshape(lead + (m,))
    else:  # "sort": XLA's generic sort (slow on CPU; fallback only)
        thr, alpha = _best_cut(-jnp.sort(-x, axis=-2))
    return _materialize(thr), alpha


def _materialize(x: jax.Array) -> jax.Array:
    """x, computed once. XLA (which drops optimization barriers on CPU before fusion) would
    otherwise fuse a long per-group chain into each per-element consumer and recompute it for
    every element of the group. A reduction is never fused into its consumers."""
    return jnp.max(jnp.stack([x, jnp.full_like(x, -jnp.inf)]), axis=0)


# ==================================================================================================
# exact: sort-free histogram search for large groups
# ==================================================================================================
_HIST_TOL = 1e-6  # relative slack of the optimality bound (float32 rounding of the binned sums)


def _hist_bins(groups: int, n: int) -> int:
    """Bins per group for the histogram search: ~n/8 (a power of 2 in [64, 65536]), capped so
    that groups * bins stays <= 4M (the scatter target)."""
    bins = 1 << max(6, min(16, (max(n // 8, 1)).bit_length() - 1))
    while bins > 64 and groups * bins > (1 << 22):
        bins //= 2
    return bins


def _bit_length_u32(x: jax.Array) -> jax.Array:
    return (32 - jax.lax.clz(x)).astype(jnp.uint32)


def _opaque(fn, x):
    """fn(x) for a small pytree x, computed in a while loop that runs once but whose trip count XLA
    cannot prove (it depends on the data), so that XLA's simplifier cannot fuse fn's reductions
    with the reductions that produced x."""
    leaf = jax.tree.leaves(x)[0]
    bits = jax.lax.bitcast_convert_type(jnp.ravel(leaf)[0].astype(jnp.float32), jnp.int32)
    once = (bits | 1) != 0  # True, but not a constant to XLA
    out0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, x))
    _, out = jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(x)),
                                (once, out0))
    return out


_HIST_CHUNK = 1 << 18  # elements per scatter chunk: its temporaries stay in cache


def _sum_and_max(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum, max) of each group of ``a`` (f32 [n, M] or [n]), each f32 [M] (M = 1 for 1-D).

    Over a 1-D array XLA merges the two scalar reductions into one variadic reduce, which its CPU
    backend does not vectorize (~10x slower than either alone: 4-5 ms on a 2.4M-weight tensor). So
    a 1-D array is reduced as the columns of a [n / d, d] view (vectorized even when merged) and
    the d partials are finished behind :func:`_opaque`, which XLA cannot fold back into one scalar
    reduction."""
    n = a.shape[0]
    rows = a.shape[1] if a.ndim == 2 else 1
    d = math.gcd(n, 1024) if a.ndim == 1 else 1
    if d >= 8:
        a2 = a.reshape(n // d, d)
        return _opaque(lambda p: (jnp.sum(p[0])[None], jnp.max(p[1])[None]),
                       (jnp.sum(a2, axis=0), jnp.max(a2, axis=0)))
    return jnp.sum(a, axis=0).reshape(rows), jnp.max(a, axis=0).reshape(rows)


def _hist_pass(a: jax.Array, lo, shift, nb, active, bins: int) -> jax.Array:
    """One histogram level of :func:`_exact_hist`: f32 [M, bins, 2] (residual sum, count) of the
    elements of each group of ``a`` (f32 [n, M] or [n]) whose bit pattern lies in the group's open
    range [lo, lo + nb << shift) (uint32 [M] each; inactive groups: nothing). One scatter-add,
    streamed over the data in cache-sized chunks."""
    n = a.shape[0]
    rows = a.shape[1] if a.ndim == 2 else 1
    per = (lambda v: v[None, :]) if a.ndim == 2 else (lambda v: v)  # [rows] -> broadcast to a row
    chunk = max(1, min(n, _HIST_CHUNK // rows))
    n_chunks, rem = divmod(n, chunk)
    seg_base = per(jnp.arange(rows, dtype=jnp.int32) * bins)
    lo3, sh3, nb3, act3 = (per(v) for v in (lo, shift, nb, active))

    def add(h, blk):
        bits = jax.lax.bitcast_convert_type(blk, jnp.uint32)
        b = (bits - lo3) >> sh3
        inside = (bits >= lo3) & (b < nb3) & act3
        # residuals against the bin's lower edge keep the float32 sums accurate
        edge = jax.lax.bitcast_convert_type(lo3 + (b << sh3), jnp.float32)
        upd = jnp.stack([blk - edge, jnp.ones_like(blk)], -1)
        seg = jnp.where(inside, seg_base + b.astype(jnp.int32), rows * bins)  # else: dump slot
        return h.at[seg.reshape(-1)].add(upd.reshape(-1, 2), mode="promise_in_bounds")

    h = jnp.zeros((rows * bins + 1, 2), jnp.float32)
    if n_chunks > 1:
        h = jax.lax.fori_loop(
            0, n_chunks,
            lambda i, h: add(h, jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=0)), h)
    elif n_chunks == 1:
        h = add(h, a[:chunk])
    if rem:
        h = add(h, a[n_chunks * chunk:])
    return h[:-1].reshape(rows, bins, 2)


def _exact_hist(a: jax.Array, *, bins: int | None = None, max_levels: int = 16,
                fallback: bool = True, src: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact threshold for large groups without sorting.

    a: f32 [n, M] or [n] (M = 1) magnitudes (>= 0; padding 0); the groups are the M columns
    (for a kernel reshaped to [L, cout] that is its own memory layout: nothing is transposed).
    Returns (thr [M], alpha [M], certified bool [M]); ``fallback``: groups of a tensor with any
    uncertified group are recomputed by a full sort (so thr/alpha are always exact).

    For x >= 0, bitcast(x, uint32) is monotone in x, so the best cut can be searched over float
    *bit patterns*. Each level histograms the open range [lo, lo + nb << shift) of every group
    into nb <= ``bins`` bins (count and residual sum: one scatter-add, streamed over the data in
    cache-sized chunks). That gives the exact objective f = S^2/K at every bin edge (each edge is
    a valid cut) and an upper bound for cuts strictly inside a bin,
    (S_above + c * upper_edge)^2 / K. Bins whose bound beats the best edge value are "open"; the
    next level re-histograms the smallest range covering all open bins at a finer shift. A bin of
    one bit pattern holds equal magnitudes, and f is quasi-convex along a run of ties, so it never
    stays open: the search ends, certified, when no bin is open (for normal-like weights after
    one or two levels). Groups still open after ``max_levels`` are reported as not certified.

    The first range starts at mean|w| / 4: the smallest kept magnitude is >= 1/3 of the kept
    mean, which is >= the group mean (zero padding only lowers it); so zeros and tiny values
    are never binned.
    """
    n = a.shape[0]
    rows = a.shape[1] if a.ndim == 2 else 1
    bins = bins or _hist_bins(rows, n)
    log_bins = int(math.log2(bins))
    assert 1 << log_bins == bins

    total, amax = _sum_and_max(a)
    inv_amax = jnp.where(amax > 0, 1.0 / jnp.where(amax > 0, amax, 1.0), 1.0)  # S/amax: no overflow
    lo0 = jnp.maximum(jax.lax.bitcast_convert_type(total / (4.0 * n), jnp.uint32), 1)
    hi0 = jax.lax.bitcast_convert_type(amax, jnp.uint32) + 1
    span0 = jnp.where(hi0 > lo0, hi0 - lo0, 1)
    shift0 = _bit_length_u32((span0 - 1) >> log_bins)  # smallest shift: bins << shift >= span
    nb0 = jnp.minimum(((span0 - 1) >> shift0) + 1, bins).astype(jnp.uint32)

    bidx = jnp.arange(bins + 1, dtype=jnp.uint32)[None, :]
    ibins = jnp.arange(bins, dtype=jnp.int32)[None, :]
    take = lambda arr, i: jnp.take_along_axis(arr, i.astype(jnp.int32)[:, None], 1)[:, 0]  # noqa

    def level(state):
        it, lo, shift, nb, k_above, s_above, best_f, best_t, best_s, best_k, done, a = state
        hist = _hist_pass(a, lo, shift, nb, ~done, bins)
        edges_bits = lo[:, None] + (bidx << shift[:, None])  # [rows, bins + 1]
        # edges past the largest finite float only bound empty bins: clamp (no inf/NaN)
        edges = jax.lax.bitcast_convert_type(jnp.minimum(edges_bits, 0x7F7FFFFF), jnp.float32)
        in_range = bidx[:, :bins] < nb[:, None]
        cnt = jnp.where(in_range, hist[..., 1], 0.0)
        sums = jnp.where(in_range, hist[..., 0] + cnt * edges[:, :bins], 0.0)
        # K[b], S[b]: elements in bins >= b plus everything above the range
        kc = jnp.flip(jnp.cumsum(jnp.flip(cnt, 1), 1), 1) + k_above[:, None]
        sc = jnp.flip(jnp.cumsum(jnp.flip(sums, 1), 1), 1) + s_above[:, None]
        safe_k = jnp.where(kc > 0, kc, 1.0)
        r = sc * inv_amax[:, None]
        f = jnp.where((kc > 0) & in_range, r * r / safe_k, -1.0)  # objective at each lower edge
        # max + first index of it as two plain reductions (argmax is a slow variadic reduce on CPU)
        fb = jnp.max(f, axis=1)
        bb = jnp.min(jnp.where(f == fb[:, None], ibins, bins), axis=1)
        better = (fb > best_f) & ~done
        best_f = jnp.where(better, fb, best_f)
        best_t = jnp.where(better, take(edges_bits, bb), best_t)
        best_s = jnp.where(better, take(sc, bb), best_s)
        best_k = jnp.where(better, take(kc, bb), best_k)
        # bound for cuts strictly inside bin b (needs >= 2 elements and > 1 bit pattern)
        s_next = jnp.concatenate([sc[:, 1:], s_above[:, None]], 1)
        ub = (s_next + cnt * edges[:, 1:]) * inv_amax[:, None]
        u = jnp.where((cnt >= 2) & (shift[:, None] > 0) & in_range, ub * ub / safe_k, -1.0)
        is_open = u > (best_f * (1.0 + _HIST_TOL))[:, None]
        # next level: the smallest range [start, top) of bins covering every open bin
        start = jnp.min(jnp.where(is_open, ibins, bins), axis=1)
        top = jnp.max(jnp.where(is_open, ibins + 1, 0), axis=1)
        new_done = done | (start >= bins)  # no open bin
        start, top = start.astype(jnp.uint32), top.astype(jnp.uint32)
        width = (top - start) << shift
        new_shift = _bit_length_u32((width - 1) >> log_bins)
        new_nb = jnp.minimum(((width - 1) >> new_shift) + 1, bins).astype(jnp.uint32)
        keep = lambda old, new: jnp.where(new_done, old, new)  # noqa: E731
        k_above = keep(k_above, jnp.where(top < bins, take(kc, jnp.minimum(top, bins - 1)), k_above))
        s_above = keep(s_above, jnp.where(top < bins, take(sc, jnp.minimum(top, bins - 1)), s_above))
        return (it + 1, keep(lo, lo + (start << shift)), keep(shift, new_shift), keep(nb, new_nb),
                k_above, s_above, best_f, best_t, best_s, best_k, new_done, a)

    zf = jnp.zeros((rows,), jnp.float32)
    empty = amax <= 0
    # `a` rides in the loop state (unchanged) so that XLA moves it in and out of the loop
    # instead of copying it, and the fallback below can reuse the same buffer.
    state = (jnp.int32(0), lo0, shift0, nb0, zf, zf, jnp.full((rows,), -1.0, jnp.float32),
             jnp.zeros((rows,), jnp.uint32), zf, zf, empty, a)
    state = jax.lax.while_loop(
        lambda st: (st[0] < max_levels) & ~jnp.all(st[-2]), level, state)
    best_f, best_t, best_s, best_k, done, a = state[-6:]
    found = best_f > 0
    thr = jnp.where(found, jax.lax.bitcast_convert_type(best_t, jnp.float32), jnp.inf)
    alpha = jnp.where(found, best_s / jnp.where(found, best_k, 1.0), 0.0)
    if fallback:
        # Not certified (adversarial value distributions, or max_levels too small): redo the
        # whole tensor with XLA's (slow but exact) sort.
        def by_sort(x):
            t, al = _best_cut(-jnp.sort(-jnp.abs(x).reshape(n, rows), axis=0))
            return t.reshape(rows), al.reshape(rows)

        # `src` (the signed weights, |src| = a) as the operand: then XLA need not keep `a` itself
        # materialised for the (rarely taken) sort branch
        thr, alpha = jax.lax.cond(jnp.all(done), lambda x: (thr, alpha), by_sort,
                                  a if src is None else src)
    return thr, alpha, done


def _exact_threshold(x: jax.Array, impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Exact threshold and scale per group. x: f32 [..., n] weights (padding: 0).

    Returns (thr [...], alpha [...]); the optimal codes are sign(w) on {|w| >= thr}
    (thr = inf, alpha = 0 for an all-zero group).
    ``impl`` (testing): "unrolled" | "bitonic" | "bitonic_vec" | "sort" | "hist"; default by n.
    """
    n = x.shape[-1]
    if impl is None:
        impl = ("unrolled" if n <= _UNROLLED_MAX else "bitonic" if n <= _BITONIC_MAX
                else "bitonic_vec" if n <= _BITONIC_VEC_MAX and n & (n - 1) == 0 else "hist")
    if impl != "hist":
        return _exact_sorted(jnp.abs(x), impl)
    lead = x.shape[:-1]
    # Groups as the columns of [n, M]: for the per-channel and per-tensor groupings this is the
    # kernel's own [L, cout] memory layout (int N > 64 with several groups needs a transpose).
    x3 = x.reshape((-1,) + x.shape[-2:]) if x.ndim >= 2 else x[None, None]
    cols = jnp.moveaxis(x3, -1, 0).reshape(n, -1)
    if cols.shape[1] == 1:
        cols = cols.reshape(n)  # 1-D: no size-1 axis for XLA to lay out (and copy) two ways
    thr, alpha, _ = _exact_hist(jnp.abs(cols), src=cols)
    return thr.reshape(lead), alpha.reshape(lead)


# ==================================================================================================
# public API
# ==================================================================================================
def _ternarize_impl(kernel, group_size, method, asymmetric, grouping, impl=None):
    lay = _Layout(tuple(kernel.shape), group_size, grouping)
    groups, mask = _to_groups(kernel, lay)
    if method == "exact" and impl is not None:  # testing hook: force one implementation
        thr, alpha = _exact_threshold(jnp.where(mask, groups, 0.0), impl)
        codes, pos, neg = _threshold_codes(groups, mask, thr), alpha, alpha
    else:
        codes, pos, neg = METHODS[method](groups, mask)
    if asymmetric:
        pos, neg = _asymmetric_scales(groups, mask, codes)
    shape2 = lay.scales_shape
    return TernaryTensor(
        codes=_from_groups(codes, lay),
        scales=pos.reshape(shape2).astype(jnp.float32),
        neg_scales=neg.reshape(shape2).astype(jnp.float32) if asymmetric else None,
        shape=lay.shape,
        group_size=group_size,
        grouping=grouping,
        method=method,
    )


_ternarize_jit = jax.jit(_ternarize_impl, static_argnums=(1, 2, 3, 4, 5))


def ternarize(
    kernel: jax.Array,
    group_size: GroupSize,
    method: str = "exact",
    *,
    asymmetric: bool = False,
    grouping: str = "input",
) -> TernaryTensor:
    """Ternarize a kernel in groups (see the module docstring for the grouping rule).

    Args:
      kernel: float array with >= 2 axes, Flax layout (last axis = output channel). May be traced.
      group_size: int N >= 1, "channel" or None (static). Ignored (stored as None) when
        ``grouping="kernel"``.
      method: "exact" (FGQ optimal), "twn", "absmean" or "binary" (static).
      asymmetric: separate scales for the +1 and -1 codes (mean |w| of each), stored in
        ``scales`` / ``neg_scales``.
      grouping: "input" (default) or "kernel" (one group per (cin, cout) kernel slice).

    Returns:
      TernaryTensor with int8 codes of the kernel's shape and float32 scales [G, cout].

    Raises ValueError for a concrete kernel holding NaN/Inf (as ``transforms.quantize_params``
    does; a traced kernel cannot be checked).
    """
    _check_grouping(grouping)
    group_size = None if grouping == "kernel" else normalize_group_size(group_size)
    _check_method(method)
    kernel = _as_float_kernel(kernel)
    if not isinstance(kernel, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(kernel))):
        bad = int(kernel.size - jnp.count_nonzero(jnp.isfinite(kernel)))
        raise ValueError(f"kernel (shape {kernel.shape}) has {bad} NaN/Inf value(s); refusing to "
                         "ternarize it (a NaN would zero its whole group, an Inf its scale)")
    return _ternarize_jit(kernel, group_size, method, bool(asymmetric), grouping)


def _straight_through(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """fn(x) in the forward pass, identity gradient (straight-through estimator)."""

    @jax.custom_vjp
    def ste(x):
        return fn(x)

    def fwd(x):
        return fn(x), None

    def bwd(_, g):
        return (g,)

    ste.defvjp(fwd, bwd)
    return ste(x)


def ternarize_ste(kernel: jax.Array, group_size: GroupSize, method: str = "exact",
                  **kw: Any) -> jax.Array:
    """Fake-quantized kernel for training: forward = ``ternarize(...).dequantize()`` (in the
    kernel's dtype), gradient = identity to the latent float kernel (straight-through).
    ``kw``: ``asymmetric``, ``grouping`` as in :func:`ternarize`."""
    kernel = jnp.asarray(kernel)
    return _straight_through(
        lambda k: ternarize(k, group_size, method, **kw).dequantize(k.dtype), kernel)


def quantize_int8_weights(kernel: jax.Array, per_channel: bool = True) -> jax.Array:
    """Symmetric int8 fake-quantization (the 8-bit first/last-layer policy).

    scale = max|w| / 127 per output channel (last axis) or per tensor; returns
    ``clip(round(w / scale), -127, 127) * scale`` in the kernel's dtype (all-zero channel -> 0).
    """
    return _int8_jit(_as_float_kernel(kernel), bool(per_channel))


@functools.partial(jax.jit, static_argnums=1)
def _int8_jit(kernel: jax.Array, per_channel: bool) -> jax.Array:
    w = kernel.astype(jnp.float32)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    s = amax / 127.0
    s_safe = jnp.where(s > 0, s, 1.0)
    q = jnp.clip(jnp.round(w / s_safe), -127, 127)
    return jnp.where(s > 0, q * s, 0.0).astype(kernel.dtype)


def quantize_int8_weights_ste(kernel: jax.Array, per_channel: bool = True) -> jax.Array:
    """:func:`quantize_int8_weights` with a straight-through (identity) gradient."""
    kernel = jnp.asarray(kernel)
    return _straight_through(lambda k: quantize_int8_weights(k, per_channel), kernel)
