"""Integer inference path: FGQ folded into one int8 x int8 -> int32 GEMM per layer.

A ternary layer (``fgq_jax.ternary.TernaryTensor``) computes ``y_k = sum_g alpha_{g,k} sum_{i in g}
t_{i,k} x_i``: one multiply per group. FGQ's promise is an 8-bit pipeline, so here each output
channel ``k`` gets one float scale ``s_k`` and every group scale becomes an integer multiplier:

    s_k     = max_g alpha_{g,k} / 127                    (max over the negative scales too, if any)
    m_{g,k} = clip(round(alpha_{g,k} / s_k), 1, 127)     for alpha_{g,k} > 0;  0 for alpha_{g,k} == 0
    W_int   = m_{g(i),k} * t_{i,k}                       int8 in [-127, 127]

so the largest group of a channel gets multiplier 127 (the finest grid the int8 range allows, and
the choice that makes ``s_k`` the only float per channel). Rounding error: ``|m s_k - alpha| <= s_k/2``
whenever ``alpha >= s_k / 2``; a group with ``0 < alpha < s_k / 2`` is clipped up to ``m = 1`` (a
zero multiplier would delete the group) and its error is ``s_k - alpha < s_k``. ``IntegerWeights
.report()`` counts and measures both cases. Asymmetric tensors (``neg_scales``) fold the same way:
``W_int = m+ [t = 1] - m- [t = -1]``.

Activations are integer codes with a per-tensor step ``s_x`` (``fgq_jax.activations``
conventions): uint8 ``0..2^b-1`` after a ReLU (zero-point 0) or int8 ``-(2^(b-1)-1)..2^(b-1)-1``.
A layer then computes the int32 accumulator ``acc = sum_i x_i W_int`` with int8 operands and
``preferred_element_type=int32`` and rescales once: ``y = float32(acc) * (s_k * s_x) + bias``.

uint8 activations on an int8 x int8 multiplier: ``lax.conv_general_dilated`` wants equal operand
dtypes and XLA's fast integer kernels are s8 x s8, so a uint8 code ``x`` is fed as ``x - 128`` (int8)
and the exact correction ``128 * sum_i W_int[i, k]`` is added to the int32 accumulator (the standard
zero-point trick; padding is applied *before* the shift so padded taps are corrected too). The
accumulator is identical, bit for bit, to ``sum_i x_i W_int`` — the tests check it.

Three ways to run the same layer:

* ``integer_conv`` / ``integer_dense``: the integer accumulator; for convs ``impl`` says how.
  ``impl="gemm"`` (default): one int8 ``jnp.dot`` per kernel row over a (kw, cin) im2col patch,
  summed in int32 — XLA-CPU's fast s8 GEMM (YNNPACK), and it runs on GPUs; ``impl="im2col"``: one
  ``jnp.dot`` over the full (kh, kw, cin) patch; ``impl="conv"``: ``lax.conv_general_dilated`` on
  int8 with implicit zero padding (the zero-point correction then depends on how many taps of
  each output position fall inside the input: ``_tap_sums``) — CPU only (cuDNN has no
  s8 x s8 -> s32 convolution: XLA answers UNIMPLEMENTED); ``"conv2"`` / ``"conv4"`` /
  ``"conv8"``: the same with 2 / 4 / 8 neighbouring columns of the last spatial axis folded into
  the channels (free reshapes, a block-Toeplitz kernel), which turns a 16-channel layer into a
  64-channel one that XLA-CPU's int8 convolution runs fast; ``impl="fconv"``: float32 convs of
  the codes over input-channel chunks short enough that every partial sum is an integer below
  2**24 (``_fconv_acc``), cast to int32 and summed; ``impl="auto"``: ``resolve_impl``'s static
  per-layer rule. All give the same int32 accumulator (the tests check every one against the
  emulation). ``integer_plan`` lists the execution each layer of a model gets.
* ``emulate_integer_conv`` / ``emulate_integer_dense``: the same arithmetic in float32, exact
  (proof in ``_emulate_acc``), then the same rescale.
* ``literal_group_conv`` / ``literal_group_dense``: the paper's literal form — per-group int32
  partial sums of ``t * x`` and one float multiply by ``alpha_g`` per group, then a float sum. It uses
  the *unrounded* alphas, so it equals the float fake-quant forward up to float rounding.

``integer_apply`` runs a whole Linen model (e.g. the CIFAR ResNets) with every folded
``nn.Conv`` / ``nn.Dense`` replaced by one of these, via ``flax.linen.intercept_methods``
(``impl`` one string for every conv, or ``{path: impl}``).
``rounded_fake_quant`` gives the float kernel ``s_k m_g t`` so the accuracy cost of the rounding can
be measured with the ordinary fake-quant evaluator.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fgq_jax.intercept import layer_path
from fgq_jax.ternary import group_ids, is_ternary
from fgq_jax.transforms import path_to_str

__all__ = [
    "IntegerWeights",
    "fold_ternary",
    "fold_int8",
    "fold_params",
    "folding_report",
    "rounded_fake_quant",
    "rounded_fake_quant_tree",
    "quantize_input",
    "integer_conv",
    "integer_dense",
    "emulate_integer_conv",
    "emulate_integer_dense",
    "literal_group_conv",
    "literal_group_dense",
    "integer_apply",
    "integer_plan",
    "resolve_impl",
    "make_integer_forward",
    "MODES",
]

W_QMAX = 127  # int8 weight range [-127, 127] (symmetric; -128 unused)
MODES = ("integer", "emulate", "literal")
IMPLS = ("gemm", "im2col", "conv", "conv2", "conv4", "conv8", "fconv", "auto")
_PACKS = {"conv": 1, "conv2": 2, "conv4": 4, "conv8": 8}
# impl="auto" on CPU: pack the last spatial axis until pack * cin >= this (see resolve_impl)
_AUTO_PACKED_CIN = 64
_UINT8_ZERO_POINT = 128
# Emulation: float32 represents every integer of magnitude <= 2**24 exactly.
_F32_EXACT = 2**24
_EMU_BASE = 16  # activation codes are split as x = 16 * hi + lo, lo in [0, 15]
_EMU_CHUNK = 8192  # reduction chunk: 8192 * 15 * 127 = 15_605_760 < 2**24 (see _emulate_acc)


# --------------------------------------------------------------------------------------------------
# grouping: fgq_jax.ternary.group_ids is the rule; gathers of its groups
# --------------------------------------------------------------------------------------------------
def _group_gather(gid: np.ndarray) -> np.ndarray:
    """[G, Nmax] indices into the reduction vector, group by group; pad entries point at index L."""
    length = gid.shape[0]
    num = int(gid.max()) + 1
    members = [np.flatnonzero(gid == g) for g in range(num)]
    nmax = max(len(m) for m in members)
    out = np.full((num, nmax), length, np.int32)
    for g, m in enumerate(members):
        out[g, : len(m)] = m
    return out


# --------------------------------------------------------------------------------------------------
# folded weights
# --------------------------------------------------------------------------------------------------
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kernel", "scale", "multipliers", "neg_multipliers", "codes", "alphas", "neg_alphas"],
    meta_fields=["group_size", "grouping"],
)
@dataclasses.dataclass(frozen=True)
class IntegerWeights:
    """One layer folded for the integer path (a pytree: pass it through jit freely).

    Attributes:
      kernel: int8, the layer's kernel shape (Flax layout, last axis = output channel);
        ``W_int = m_g * t`` in [-127, 127].
      scale: float32 [cout], the per-channel ``s_k`` (0 for an all-zero channel).
      multipliers: int8 [G, cout], ``m_g`` in [1, 127] (0 where alpha_g == 0); None for ``fold_int8``.
      neg_multipliers: int8 [G, cout] for asymmetric ternary tensors, else None.
      codes: int8 ternary codes (kernel shape) — kept for the literal per-group form; None for int8.
      alphas / neg_alphas: float32 [G, cout], the unrounded group scales (literal form, report).
      group_size, grouping: static, as in the TernaryTensor (the groups of ``multipliers``).
    """

    kernel: jax.Array
    scale: jax.Array
    multipliers: jax.Array | None = None
    neg_multipliers: jax.Array | None = None
    codes: jax.Array | None = None
    alphas: jax.Array | None = None
    neg_alphas: jax.Array | None = None
    group_size: Any = None
    grouping: str = "input"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape)

    @property
    def num_groups(self) -> int:
        """Groups per output channel (G)."""
        return 1 if self.multipliers is None else int(self.multipliers.shape[0])

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float kernel the integer path really applies: ``s_k * W_int`` (rounded multipliers)."""
        return (self.kernel.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype)

    def report(self) -> dict[str, float]:
        """Rounding error of alpha -> m * s_k (eager; concrete arrays only). Keys:

        groups: number of (group, channel) pairs with alpha > 0;
        clipped: how many of them have alpha < s_k / 2 (multiplier forced up to 1);
        max_err_over_step: max |m s_k - alpha| / s_k (<= 0.5 unless something was clipped);
        max_rel_err / mean_rel_err: |m s_k - alpha| / alpha over groups with alpha > 0;
        weight_rel_err: ||s_k W_int - W_ternary||_F / ||W_ternary||_F.
        """
        if self.multipliers is None:  # fold_int8: no groups, nothing rounded here
            return dict(groups=0, clipped=0, max_err_over_step=0.0, max_rel_err=0.0,
                        mean_rel_err=0.0, weight_rel_err=0.0)
        s = np.asarray(self.scale, np.float64)[None, :]
        pairs = [(self.alphas, self.multipliers)]
        if self.neg_alphas is not None:
            pairs.append((self.neg_alphas, self.neg_multipliers))
        err_s, rel, clipped, groups = [], [], 0, 0
        for a, m in pairs:
            a = np.asarray(a, np.float64)
            a = np.broadcast_to(a, (a.shape[0], s.shape[1]))
            m = np.asarray(m, np.float64)
            pos = a > 0
            e = np.abs(m * s - a)[pos]
            sk = np.broadcast_to(s, a.shape)[pos]
            err_s.append(e / sk)
            rel.append(e / a[pos])
            clipped += int(np.sum(a[pos] < sk / 2))
            groups += int(pos.sum())
        err_s, rel = np.concatenate(err_s), np.concatenate(rel)
        w_t = _ternary_float_kernel(self)
        w_r = np.asarray(self.dequantize(), np.float64)
        nrm = np.linalg.norm(w_t)
        return dict(
            groups=groups,
            clipped=clipped,
            max_err_over_step=float(err_s.max()) if err_s.size else 0.0,
            max_rel_err=float(rel.max()) if rel.size else 0.0,
            mean_rel_err=float(rel.mean()) if rel.size else 0.0,
            weight_rel_err=float(np.linalg.norm(w_r - w_t) / nrm) if nrm > 0 else 0.0,
        )


def _ternary_float_kernel(iw: IntegerWeights) -> np.ndarray:
    """The unrounded ternary kernel alpha_g * t (float64, numpy) from a folded layer."""
    shape = iw.shape
    length, cout = math.prod(shape[:-1]), shape[-1]
    gid = group_ids(shape, iw.group_size, iw.grouping)
    t = np.asarray(iw.codes).reshape(length, cout)
    a = np.broadcast_to(np.asarray(iw.alphas, np.float64), (gid.max() + 1, cout))[gid]
    an = a if iw.neg_alphas is None else np.broadcast_to(
        np.asarray(iw.neg_alphas, np.float64), (gid.max() + 1, cout))[gid]
    return (np.where(t > 0, a, 0.0) - np.where(t < 0, an, 0.0)).reshape(shape)


def _multipliers(alpha: jax.Array, s_safe: jax.Array) -> jax.Array:
    m = jnp.clip(jnp.round(alpha / s_safe[None, :]), 1, W_QMAX)
    return jnp.where(alpha > 0, m, 0).astype(jnp.int8)


def fold_ternary(tt) -> IntegerWeights:
    """Fold a ``TernaryTensor`` into an int8 kernel ``m_g t`` and per-channel scales ``s_k``.

    Pure jnp (jit-able). Uses only the contract fields of the TernaryTensor: ``codes``, ``scales``
    [G, cout] (or [1, 1] for one scale for the whole tensor), ``neg_scales``, ``group_size``,
    ``grouping``. Group scales must be >= 0.
    """
    codes = jnp.asarray(tt.codes).astype(jnp.int8)
    shape = tuple(codes.shape)
    length, cout = math.prod(shape[:-1]), shape[-1]
    grouping = getattr(tt, "grouping", "input") or "input"
    gid = group_ids(shape, tt.group_size, grouping)
    num = int(gid.max()) + 1

    def full(a):
        a = jnp.asarray(a, jnp.float32)
        if a.ndim != 2 or a.shape[0] not in (1, num) or a.shape[1] not in (1, cout):
            raise ValueError(
                f"scales of shape {a.shape} do not match {num} groups x {cout} channels "
                f"(kernel {shape}, group_size={tt.group_size!r}, grouping={grouping!r})"
            )
        if not isinstance(a, jax.core.Tracer) and bool(jnp.any(a < 0)):
            raise ValueError("group scales must be >= 0 to fold into integer multipliers")
        return jnp.broadcast_to(a, (num, cout))

    alpha = full(tt.scales)
    neg = None if getattr(tt, "neg_scales", None) is None else full(tt.neg_scales)
    amax = alpha.max(axis=0) if neg is None else jnp.maximum(alpha.max(axis=0), neg.max(axis=0))
    s = amax / W_QMAX
    s_safe = jnp.where(s > 0, s, 1.0)
    m = _multipliers(alpha, s_safe)
    mn = None if neg is None else _multipliers(neg, s_safe)
    t = codes.reshape(length, cout)
    gidx = jnp.asarray(gid)
    mp_el = m[gidx].astype(jnp.int16)  # [L, cout]
    mn_el = mp_el if mn is None else mn[gidx].astype(jnp.int16)
    w = jnp.where(t > 0, mp_el, 0) - jnp.where(t < 0, mn_el, 0)
    return IntegerWeights(
        kernel=w.astype(jnp.int8).reshape(shape),
        scale=jnp.where(s > 0, s, 0.0).astype(jnp.float32),
        multipliers=m,
        neg_multipliers=mn,
        codes=codes,
        alphas=alpha,
        neg_alphas=neg,
        group_size=tt.group_size,
        grouping=grouping,
    )


def fold_int8(kernel: jax.Array) -> IntegerWeights:
    """Per-channel symmetric int8 weights (the 8-bit first/last layer policy) for the integer path:
    ``s_k = max|w_k| / 127``, ``W_int = round(w / s_k)``. Folding a kernel that is already int8
    fake-quantized per channel recovers its integer codes."""
    kernel = jnp.asarray(kernel, jnp.float32)
    amax = jnp.max(jnp.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)
    s = amax / W_QMAX
    s_safe = jnp.where(s > 0, s, 1.0)
    w = jnp.clip(jnp.round(kernel / s_safe), -W_QMAX, W_QMAX).astype(jnp.int8)
    return IntegerWeights(kernel=w, scale=jnp.where(s > 0, s, 0.0).astype(jnp.float32),
                          group_size="channel")


def fold_params(params: Any) -> dict[str, IntegerWeights]:
    """Fold every TernaryTensor leaf of a params tree (``quantize_params(..., mode="ternary")``).

    Returns ``{layer_path: IntegerWeights}`` keyed by the '/'-joined path of the *layer* (the leaf
    path without its trailing ``/kernel``), the keys ``integer_apply`` and evaluate's act steps use.
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_ternary)[0]
    out = {}
    for path, leaf in flat:
        if is_ternary(leaf):
            p = path_to_str(path)
            out[p[: -len("/kernel")] if p.endswith("/kernel") else p] = fold_ternary(leaf)
    return out


def folding_report(folded: Mapping[str, IntegerWeights]) -> dict[str, float]:
    """Network-level summary of the per-layer reports (for a sweep row): total groups / clipped,
    worst max_err_over_step and max_rel_err, group-weighted mean_rel_err, worst weight_rel_err."""
    reps = [iw.report() for iw in folded.values()]
    groups = sum(r["groups"] for r in reps)
    return dict(
        groups=groups,
        clipped=sum(r["clipped"] for r in reps),
        max_err_over_step=max((r["max_err_over_step"] for r in reps), default=0.0),
        max_rel_err=max((r["max_rel_err"] for r in reps), default=0.0),
        mean_rel_err=(sum(r["mean_rel_err"] * r["groups"] for r in reps) / groups) if groups else 0.0,
        max_weight_rel_err=max((r["weight_rel_err"] for r in reps), default=0.0),
    )


def rounded_fake_quant(tt) -> jax.Array:
    """Float kernel ``s_k * m_g * t`` (float32): the ternary kernel with rounded multipliers — a
    drop-in for ``tt.dequantize()`` to measure the accuracy cost of the integer folding."""
    return fold_ternary(tt).dequantize()


def rounded_fake_quant_tree(tree: Any) -> Any:
    """Replace every TernaryTensor leaf by ``rounded_fake_quant(leaf)`` (others unchanged): the twin
    of ``ptq.dequantize_tree`` with rounded multipliers, ready for ``model.apply`` / ``Evaluator``."""
    return jax.tree.map(
        lambda x: rounded_fake_quant(x) if is_ternary(x) else x, tree, is_leaf=is_ternary
    )


# --------------------------------------------------------------------------------------------------
# activations -> integer codes
# --------------------------------------------------------------------------------------------------
def quantize_input(x: jax.Array, step, bits: int = 8, signed: bool = False) -> jax.Array:
    """Integer activation codes (uint8 unsigned / int8 signed) of ``quantize_activation(x, bits,
    step, signed)`` — the same rounding (round-half-even of x / step, then clip). ``bits=1`` (binary
    activations) gives {0, 1} codes (unsigned) or the sign quantizer's {-1, +1} (signed): the int8
    GEMM then computes the binary layer exactly, without bit packing (XNOR/popcount kernels are not
    implemented here; `fgq_jax.accounting` counts those operations)."""
    from fgq_jax.activations import quantize_activation_int

    if bits > 8:
        raise ValueError(f"the integer path takes activations of <= 8 bits, got {bits}")
    q = quantize_activation_int(x, bits, step, signed=signed)
    return q.astype(jnp.int8 if signed else jnp.uint8)


# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------
def _tuple(v, n: int) -> tuple[int, ...]:
    if v is None:
        v = 1
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    if len(v) != n:
        raise ValueError(f"expected {n} values, got {v}")
    return v


def _explicit_pads(in_spatial, kernel_spatial, strides, padding, dilation) -> list[tuple[int, int]]:
    n = len(kernel_spatial)
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID", "SAME_LOWER"):
            raise NotImplementedError(f"padding {padding!r} is not supported on the integer path")
        dil_k = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, dilation)]
        return [tuple(int(a) for a in pr) for pr in lax.padtype_to_pads(in_spatial, dil_k, strides, p)]
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * n
    pads = []
    for p in padding:
        pads.append((int(p), int(p)) if isinstance(p, (int, np.integer)) else (int(p[0]), int(p[1])))
    if len(pads) != n:
        raise ValueError(f"padding {padding!r} does not match {n} spatial dims")
    return pads


def _pad_spatial(x: jax.Array, pads) -> jax.Array:
    if not any(lo or hi for lo, hi in pads):
        return x
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise NotImplementedError("negative padding is not supported on the integer path")
    return jnp.pad(x, [(0, 0), *pads, (0, 0)])  # constant 0 = the code of the value 0.0


def _im2col(xp: jax.Array, kernel_spatial, strides, dilation) -> jax.Array:
    """Patches of an already padded NHWC-like input: [B, *out_spatial, L], L ordered (taps..., cin)
    row-major with cin fastest — the flatten order of a Flax kernel's (kh, kw, cin) axes. Pure
    slicing, so exact for any dtype."""
    b, *sp, c = xp.shape
    out = [(s - (k - 1) * d - 1) // st + 1 for s, k, d, st in zip(sp, kernel_spatial, dilation, strides)]
    if any(o <= 0 for o in out):
        raise ValueError(f"empty conv output for input {xp.shape} and kernel {kernel_spatial}")
    cols = []
    for tap in itertools.product(*[range(k) for k in kernel_spatial]):
        start = [0, *[t * d for t, d in zip(tap, dilation)], 0]
        limit = [b, *[t * d + (o - 1) * st + 1 for t, d, o, st in zip(tap, dilation, out, strides)], c]
        cols.append(lax.slice(xp, start, limit, [1, *strides, 1]))
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _out_size(size: int, k: int, d: int, st: int) -> int:
    return (size - (k - 1) * d - 1) // st + 1


def _conv_dn(ndim: int) -> lax.ConvDimensionNumbers:
    sp = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *sp), rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *sp),
    )


def _check_codes(x_codes: jax.Array) -> None:
    if x_codes.dtype not in (jnp.uint8, jnp.int8):
        raise TypeError(f"activation codes must be uint8 or int8, got {x_codes.dtype}")


def _check_overflow(length: int) -> None:
    # |acc| <= L * 255 * 127 must stay below 2**31 (also bounds the zero-point-shifted partials).
    if length * 255 * W_QMAX >= 2**31:
        raise ValueError(f"reduction length {length} could overflow the int32 accumulator")


def _as_int8_operand(xp: jax.Array) -> tuple[jax.Array, int]:
    """uint8 codes -> (x - 128) as int8 and zero point 128; int8 codes unchanged (zero point 0)."""
    if xp.dtype == jnp.uint8:
        return (xp.astype(jnp.int16) - _UINT8_ZERO_POINT).astype(jnp.int8), _UINT8_ZERO_POINT
    return xp, 0


def _zp_correction(w2d: jax.Array, zp: int) -> jax.Array:
    """zp * sum_i W[i, k] (int32 [cout]): restores sum_i x_i W from sum_i (x_i - zp) W."""
    return zp * jnp.sum(w2d.astype(jnp.int32), axis=0)


def _rescale(acc: jax.Array, scale: jax.Array, x_step, bias) -> jax.Array:
    """The single rescale: float32(acc) * (s_k * s_x) (+ bias). Shared by every path."""
    mult = jnp.asarray(scale, jnp.float32) * jnp.asarray(x_step, jnp.float32)
    y = acc.astype(jnp.float32) * mult
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return y


# --------------------------------------------------------------------------------------------------
# int32 accumulators: the integer GEMM and its float emulation
# --------------------------------------------------------------------------------------------------
_K_ALIGN = 4


def _s8_dot(lhs: jax.Array, rhs: jax.Array, dims=None) -> jax.Array:
    """int8 x int8 -> int32 ``dot_general`` (default: [M, L] @ [L, N]) with the contraction
    zero-padded to a multiple of 4 (exact: padded products are 0). The padding is a no-op for the
    usual shapes (cin multiple of 4); it sidesteps an XLA-GPU (jax 0.11.2, H200) miscompile seen
    for a batched s8 dot with contraction 50 (wrong int32 results) — integer GEMM libraries want
    K % 4 == 0."""
    if dims is None:
        dims = (((lhs.ndim - 1,), (0,)), ((), ()))
    (lc, rc), _ = dims
    (lc,), (rc,) = lc, rc
    k = lhs.shape[lc]
    pad = (-k) % _K_ALIGN
    if pad:
        lp = [(0, 0)] * lhs.ndim
        lp[lc] = (0, pad)
        rp = [(0, 0)] * rhs.ndim
        rp[rc] = (0, pad)
        lhs, rhs = jnp.pad(lhs, lp), jnp.pad(rhs, rp)
    return lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.int32)


def _gemm_acc(p: jax.Array, w2d: jax.Array) -> jax.Array:
    """int32 [M, cout] = p [M, L] (uint8/int8 codes) @ w2d [L, cout] (int8), int8 x int8 -> int32."""
    ps, zp = _as_int8_operand(p)
    acc = _s8_dot(ps, w2d)
    return acc + _zp_correction(w2d, zp) if zp else acc


def _emulate_acc(p: jax.Array, w2d: jax.Array) -> jax.Array:
    """The accumulator ``sum_i x_i W[i, k]`` computed with float32 GEMMs, exactly.

    Proof of exactness. Split each code ``x = 16 hi + lo`` with ``lo = x mod 16 in [0, 15]`` and
    ``hi = floor(x / 16)`` (uint8: hi in [0, 15]; int8: hi in [-8, 7]), so |hi|, |lo| <= 15, and
    |W| <= 127. Every product is an integer of magnitude <= 15 * 127 = 1905, and every partial sum of
    at most 8192 of them (the reduction is cut into chunks of 8192) is an integer of magnitude
    <= 8192 * 1905 = 15_605_760 < 2**24. float32 represents all integers up to 2**24 exactly, so each
    product, addition or FMA inside a chunk's GEMM is exact *whatever the summation order or blocking*
    the backend chooses (precision=HIGHEST excludes reduced-precision passes such as TF32/bf16).
    The exact chunk results are converted to int32 and combined as ``16 * acc_hi + acc_lo`` in
    int32, which cannot overflow (``_check_overflow``). Hence the result equals the mathematical
    ``sum_i x_i W[i, k]`` — the same value the integer GEMM must produce.
    """
    length = p.shape[-1]
    xf = p.astype(jnp.float32)
    hi = jnp.floor(xf / _EMU_BASE)
    lo = xf - _EMU_BASE * hi
    both = jnp.concatenate([hi, lo], axis=0)  # [2M, L]
    wf = w2d.astype(jnp.float32)
    acc = None
    for c0 in range(0, length, _EMU_CHUNK):
        c1 = min(c0 + _EMU_CHUNK, length)
        part = jnp.dot(both[:, c0:c1], wf[c0:c1], precision=lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
        part = part.astype(jnp.int32)
        acc = part if acc is None else acc + part
    m = p.shape[0]
    return _EMU_BASE * acc[:m] + acc[m:]


def _literal(p: jax.Array, iw: IntegerWeights, x_step, bias) -> jax.Array:
    """Paper's literal form on patches p [M, L]: per-group int32 partial sums of t * x (int8 x int8
    -> int32, one batched GEMM over groups), then one float multiply by alpha_g per group and sum."""
    if iw.codes is None:  # int8 layers (fold_int8) have no groups: the integer GEMM is their form
        return _rescale(_gemm_acc(p, iw.kernel.reshape(p.shape[-1], -1)), iw.scale, x_step, bias)
    length = p.shape[-1]
    cout = iw.shape[-1]
    gid = group_ids(iw.shape, iw.group_size, iw.grouping)
    num = int(gid.max()) + 1
    ps, zp = _as_int8_operand(p)
    t = iw.codes.reshape(length, cout).astype(jnp.int8)
    if np.all(np.diff(gid) >= 0):  # contiguous groups ("input" grouping): pad L and reshape
        nmax = int(np.bincount(gid).max())
        extra = num * nmax - length
        if extra:
            ps = jnp.pad(ps, ((0, 0), (0, extra)))
            t = jnp.pad(t, ((0, extra), (0, 0)))
        pg = ps.reshape(ps.shape[0], num, nmax)  # [M, G, Nmax]
        tg = t.reshape(num, nmax, cout)  # [G, Nmax, cout]
    else:  # strided groups ("kernel" grouping): gather each group's members
        gather = jnp.asarray(_group_gather(gid))  # [G, Nmax], pad -> L
        nmax = gather.shape[1]
        ps = jnp.concatenate([ps, jnp.zeros((ps.shape[0], 1), ps.dtype)], axis=1)
        pg = jnp.take(ps, gather, axis=1)
        t = jnp.concatenate([t, jnp.zeros((1, cout), t.dtype)], axis=0)
        tg = jnp.take(t, gather, axis=0)

    def partial_sums(codes_g):  # -> int32 [M, G, cout]; padded entries carry code 0
        if nmax <= 16:  # tiny contractions: XLA's fused multiply-reduce beats a batched GEMM
            s = jnp.sum(pg.astype(jnp.int32)[..., None] * codes_g.astype(jnp.int32)[None], axis=2)
        else:
            s = _s8_dot(pg, codes_g, (((2,), (1,)), ((1,), (0,))))  # [G, M, cout]
            s = jnp.moveaxis(s, 0, 1)
        if zp:
            s = s + zp * jnp.sum(codes_g.astype(jnp.int32), axis=1)[None]
        return s

    alpha = jnp.asarray(iw.alphas, jnp.float32)[None]  # [1, G, cout]
    if iw.neg_alphas is None:
        y = jnp.sum(partial_sums(tg).astype(jnp.float32) * alpha, axis=1)
    else:
        pos = partial_sums((tg > 0).astype(jnp.int8)).astype(jnp.float32)
        neg = partial_sums((tg < 0).astype(jnp.int8)).astype(jnp.float32)
        y = jnp.sum(pos * alpha - neg * jnp.asarray(iw.neg_alphas, jnp.float32)[None], axis=1)
    y = y * jnp.asarray(x_step, jnp.float32)
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return y


# --------------------------------------------------------------------------------------------------
# public layer functions
# --------------------------------------------------------------------------------------------------
def _conv_geometry(x_codes, iw, strides, padding, kernel_dilation):
    """Checks and static geometry of a conv on codes: (strides, dilation, explicit pads)."""
    _check_codes(x_codes)
    kshape = iw.shape
    nsp = len(kshape) - 2
    if x_codes.ndim != nsp + 2:
        raise ValueError(f"input {x_codes.shape} does not match a {nsp}-D kernel {kshape}")
    if x_codes.shape[-1] != kshape[-2]:
        raise ValueError(f"input channels {x_codes.shape[-1]} != kernel cin {kshape[-2]} "
                         "(feature_group_count != 1 is not supported)")
    strides = _tuple(strides, nsp)
    dil = _tuple(kernel_dilation, nsp)
    pads = _explicit_pads(x_codes.shape[1:-1], kshape[:-2], strides, padding, dil)
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise NotImplementedError("negative padding is not supported on the integer path")
    _check_overflow(math.prod(kshape[:-1]))
    out = [_out_size(s + lo + hi, k, d, st)
           for s, (lo, hi), k, d, st in zip(x_codes.shape[1:-1], pads, kshape[:-2], dil, strides)]
    if any(o <= 0 for o in out):
        raise ValueError(f"empty conv output for input {x_codes.shape} and kernel {kshape}")
    return strides, dil, pads


def _conv_setup(x_codes, iw, strides, padding, kernel_dilation):
    strides, dil, pads = _conv_geometry(x_codes, iw, strides, padding, kernel_dilation)
    return _pad_spatial(x_codes, pads), strides, dil


def _tap_sums(in_spatial, iw, strides, pads, dil) -> jax.Array:
    """int32 [1, *out, cout]: ``sum`` of ``W_int[tap, c, k]`` over the input channels and the taps
    that fall inside the (unpadded) input at each output position — the zero-point correction of a
    conv whose zero padding is implicit. A float32 conv of an all-ones image, exact: every partial
    sum is an integer of magnitude <= L * 127 < 2**24 (``_check_overflow`` bounds L)."""
    nsp = len(in_spatial)
    ones = jnp.ones((1, *in_spatial, 1), jnp.float32)
    wsum = jnp.sum(iw.kernel.astype(jnp.float32), axis=-2, keepdims=True)  # [*k, 1, cout]
    t = lax.conv_general_dilated(ones, wsum, strides, pads, rhs_dilation=dil,
                                 dimension_numbers=_conv_dn(nsp + 2),
                                 precision=lax.Precision.HIGHEST)
    return t.astype(jnp.int32)


def _pack_geometry(width, kw, sw, dw, lo, hi, pack):
    """Packing ``pack`` neighbours of the last spatial axis into channels: (kw', lo', hi', offsets)
    or None when the layer cannot be packed (see ``_packed_kernel``)."""
    if pack == 1:
        return None
    out = _out_size(width + lo + hi, kw, dw, sw)
    if dw != 1 or pack % sw or width % pack or out % (pack // sw):
        return None
    q = pack // sw
    # output column q*j + r reads input column pack*j + r*sw - lo + t: packed column j + d, element e
    offs = [(r, t, *divmod(r * sw - lo + t, pack)) for r in range(q) for t in range(kw)]
    dmin, dmax = min(o[2] for o in offs), max(o[2] for o in offs)
    lo2, hi2 = -dmin, (out // q - 1) + dmax - (width // pack - 1)
    if lo2 < 0 or hi2 < 0:
        return None
    return dmax - dmin + 1, lo2, hi2, [(r, t, d - dmin, e) for r, t, d, e in offs]


def _packed_kernel(w: jax.Array, kw2: int, offs, pack: int, q: int) -> jax.Array:
    """[*k, kw, cin, cout] -> [*k, kw', pack * cin, q * cout]: the kernel of the same conv on an
    input whose last spatial axis has ``pack`` neighbours folded into the channels and whose output
    has ``q`` neighbours folded into the channels (a block-Toeplitz kernel; unused entries 0)."""
    *k, kw, cin, cout = w.shape
    src = np.full((kw2, pack, q), kw, np.int32)  # index kw = the appended zero tap
    for r, t, d, e in offs:
        src[d, e, r] = t
    wz = jnp.concatenate([w, jnp.zeros((*k, 1, cin, cout), w.dtype)], axis=len(k))
    wp = jnp.take(wz, jnp.asarray(src.reshape(-1)), axis=len(k))  # [*k, kw'*pack*q, cin, cout]
    wp = wp.reshape(*k, kw2, pack, q, cin, cout)
    wp = jnp.moveaxis(wp, len(k) + 2, len(k) + 3)  # [*k, kw', pack, cin, q, cout]
    return wp.reshape(*k, kw2, pack * cin, q * cout)


def _conv_packed(x, w, strides, pads, dil, pack, out_dtype, precision=None):
    """``lax.conv_general_dilated`` (implicit zero padding ``pads``) with ``pack`` neighbours of the
    last spatial axis folded into the channels when ``pack > 1`` (free reshapes of channels-last
    arrays; the same sums, only regrouped, so integer results are unchanged)."""
    dn = _conv_dn(x.ndim)
    geo = _pack_geometry(x.shape[-2], w.shape[-3], strides[-1], dil[-1], *pads[-1], pack)
    if geo is None:
        if pack != 1:
            raise ValueError(f"cannot pack {pack} columns of input {x.shape} for kernel {w.shape}, "
                             f"strides {strides}, dilation {dil}, pads {pads}")
        return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dil, dimension_numbers=dn,
                                        preferred_element_type=out_dtype, precision=precision)
    kw2, lo2, hi2, offs = geo
    q = pack // strides[-1]
    b, *sp, width, cin = x.shape
    xp = x.reshape(b, *sp, width // pack, pack * cin)
    wp = _packed_kernel(w, kw2, offs, pack, q)
    y = lax.conv_general_dilated(xp, wp, (*strides[:-1], 1), [*pads[:-1], (lo2, hi2)],
                                 rhs_dilation=(*dil[:-1], 1), dimension_numbers=dn,
                                 preferred_element_type=out_dtype, precision=precision)
    return y.reshape(*y.shape[:-2], y.shape[-2] * q, y.shape[-1] // q)


def _fconv_chunk(xdtype, taps: int) -> int:
    """Input channels per float32 conv chunk: every partial sum of ``taps * chunk`` products
    |x| * |W| <= xmax * 127 stays <= 2**24 (uint8: 518 products, int8: 1032)."""
    xmax = 255 if xdtype == jnp.uint8 else 128
    return (_F32_EXACT // (xmax * W_QMAX)) // taps


def _fconv_acc(x, iw, strides, pads, dil):
    """The int32 accumulator from float32 convs of the integer codes, exactly.

    The input channels are cut into chunks of ``_fconv_chunk`` channels, so one chunk's reduction
    has at most 518 products of |x| <= 255 and |W| <= 127 (1032 for int8 codes, |x| <= 128): every
    partial sum, in whatever order or blocking the backend adds them, is an integer of magnitude
    <= 2**24 and so exact in float32 (precision=HIGHEST: no reduced-precision passes; assumes the
    backend computes the conv as sums of products — an im2col/direct GEMM, as XLA-CPU does — and
    not in a transform domain such as Winograd or FFT). Each chunk's exact result is cast to int32
    and the chunks are summed in int32 (no overflow: ``_check_overflow``)."""
    kshape = iw.shape
    cin = kshape[-2]
    chunk = _fconv_chunk(x.dtype, math.prod(kshape[:-2]))
    if chunk < 1:
        raise ValueError(f"kernel {kshape}: one input channel alone has too many taps for an "
                         "exact float32 conv; use impl='gemm'")
    xf = x.astype(jnp.float32)
    wf = iw.kernel.astype(jnp.float32)
    acc = None
    for c0 in range(0, cin, chunk):
        c1 = min(c0 + chunk, cin)
        part = lax.conv_general_dilated(
            xf[..., c0:c1], wf[..., c0:c1, :], strides, pads, rhs_dilation=dil,
            dimension_numbers=_conv_dn(x.ndim), precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32).astype(jnp.int32)
        acc = part if acc is None else acc + part
    return acc


def resolve_impl(impl: str, x_shape, kshape, strides=1, padding="SAME",
                 kernel_dilation=1, backend: str | None = None) -> str:
    """The concrete execution of one conv layer for ``impl`` (static: shapes and dtypes only).

    ``impl="auto"`` is a static rule measured on XLA-CPU (jax 0.10, 2-core Sapphire Rapids,
    ResNet-20/-50 layers at batch 128; BENCHMARKS.md "Issue 15, part 3"):

    * not on CPU: "gemm" (cuDNN has no int8 convolution; float convs there may use Winograd/FFT);
    * 1x1 kernels: "gemm" (a plain int8 dot, no patch copy);
    * else the int8 convolution with implicit padding, packing ``pack`` neighbouring columns of
      the last spatial axis into the channels, ``pack`` = the smallest of 1, 2, 4 with
      ``pack * cin >= 64`` that the geometry allows ("conv", "conv2", "conv4"): XLA-CPU's int8
      convolution (YNNPACK) is 3-5x a float32 conv from 64 channels in, but for 16 channels in
      and out it falls back to a slow generic loop (10x slower than float32);
    * if the packing the geometry allows leaves ``pack * cin < 32``: "gemm".

    Other impls are returned unchanged (checked). Every impl gives the same int32 accumulator.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    nsp = len(kshape) - 2
    if backend != "cpu" or math.prod(kshape[:-2]) == 1:
        return "gemm"
    strides = _tuple(strides, nsp)
    dil = _tuple(kernel_dilation, nsp)
    pads = _explicit_pads(tuple(x_shape[1:-1]), kshape[:-2], strides, padding, dil)
    cin = kshape[-2]
    want = next(p for p in (1, 2, 4) if p * cin >= _AUTO_PACKED_CIN or p == 4)
    for pack in (4, 2, 1):
        if pack > want:
            continue
        if pack == 1 or _pack_geometry(x_shape[-2], kshape[-3], strides[-1], dil[-1], *pads[-1],
                                       pack) is not None:
            if pack * cin < _AUTO_PACKED_CIN // 2:  # too narrow for the int8 convolution
                return "gemm"
            return {1: "conv", 2: "conv2", 4: "conv4"}[pack]
    return "gemm"


def _conv_acc(x, iw, strides, dil, pads, impl):
    kshape = iw.shape
    length, cout = math.prod(kshape[:-1]), kshape[-1]
    if impl == "auto":
        impl = resolve_impl(impl, x.shape, kshape, strides, pads, dil)
    if impl in _PACKS:  # int8 conv, implicit zero padding: padded taps are 0 in the shifted domain
        xs, zp = _as_int8_operand(x)
        acc = _conv_packed(xs, iw.kernel, strides, pads, dil, _PACKS[impl], jnp.int32)
        return acc + zp * _tap_sums(x.shape[1:-1], iw, strides, pads, dil) if zp else acc
    if impl == "fconv":
        return _fconv_acc(x, iw, strides, pads, dil)
    xp = _pad_spatial(x, pads)
    if impl == "im2col":  # one GEMM over the full (taps, cin) patch
        p = _im2col(xp, kshape[:-2], strides, dil)
        out = p.shape[:-1]
        return _gemm_acc(p.reshape(-1, length), iw.kernel.reshape(length, cout)).reshape(*out, cout)
    if impl != "gemm":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    # One GEMM per tap of the first spatial kernel axis over a (remaining taps, cin) patch, summed
    # in int32: the same accumulator; XLA-CPU concatenates 3 slices much faster than 9.
    xs, zp = _as_int8_operand(xp)
    k0, rest = kshape[0], kshape[1:-2]
    sub_len = math.prod(kshape[1:-1])
    b = xp.shape[0]
    h_out = _out_size(xp.shape[1], k0, dil[0], strides[0])
    acc = None
    for i in range(k0):
        lo = i * dil[0]
        rows = lax.slice_in_dim(xs, lo, lo + (h_out - 1) * strides[0] + 1, strides[0], axis=1)
        rows = rows.reshape(b * h_out, *rows.shape[2:])  # the first spatial axis joins the batch
        p = _im2col(rows, rest, strides[1:], dil[1:])  # [B*Ho, *out_rest, sub_len]
        part = _s8_dot(p.reshape(-1, sub_len), iw.kernel[i].reshape(sub_len, cout))
        acc = part if acc is None else acc + part
    if zp:
        acc = acc + _zp_correction(iw.kernel.reshape(length, cout), zp)
    return acc.reshape(b, h_out, *p.shape[1:-1], cout)


def integer_conv(
    x_codes: jax.Array,
    iw: IntegerWeights,
    x_step,
    strides=1,
    padding="SAME",
    kernel_dilation=1,
    *,
    bias=None,
    impl: str = "gemm",
    return_acc: bool = False,
) -> jax.Array:
    """Integer conv: int32 accumulator ``sum x W_int`` of the codes, then ``acc * (s_k * s_x) + bias``.

    x_codes: uint8 (unsigned, zero-point 0) or int8 codes, channels-last [B, *spatial, cin].
    iw: folded kernel (``fold_ternary`` / ``fold_int8``), Flax layout (*k, cin, cout).
    x_step: the activation step s_x (scalar, may be traced).
    padding: "SAME" / "VALID" / int / sequence of ints or (lo, hi) pairs, as ``nn.Conv``.
    impl: how the accumulator is computed (all give the same int32 accumulator, bit for bit):
      "gemm" (one int8 jnp.dot per kernel row over a (kw, cin) im2col patch, summed in int32;
      runs on GPUs), "im2col" (one int8 jnp.dot over the full (kh, kw, cin) patch), "conv" (int8
      lax.conv_general_dilated with implicit zero padding and a per-position zero-point
      correction; CPU only), "conv2" / "conv4" / "conv8" (the same with 2 / 4 / 8 neighbouring
      columns of the last spatial axis packed into the channels, for narrow layers), "fconv"
      (float32 convs of the codes over input-channel chunks small enough to be exact, summed in
      int32) or "auto" (``resolve_impl``'s per-layer rule).
    return_acc: return the int32 accumulator [B, *out, cout] instead of the rescaled float32 output.
    """
    strides, dil, pads = _conv_geometry(x_codes, iw, strides, padding, kernel_dilation)
    acc = _conv_acc(x_codes, iw, strides, dil, pads, impl)
    return acc if return_acc else _rescale(acc, iw.scale, x_step, bias)


def emulate_integer_conv(
    x_codes, iw: IntegerWeights, x_step, strides=1, padding="SAME", kernel_dilation=1, *,
    bias=None, return_acc: bool = False,
) -> jax.Array:
    """Float32 emulation of ``integer_conv``: exact accumulator (see ``_emulate_acc``), same rescale."""
    xp, strides, dil = _conv_setup(x_codes, iw, strides, padding, kernel_dilation)
    kshape = iw.shape
    length, cout = math.prod(kshape[:-1]), kshape[-1]
    p = _im2col(xp, kshape[:-2], strides, dil)
    acc = _emulate_acc(p.reshape(-1, length), iw.kernel.reshape(length, cout))
    acc = acc.reshape(*p.shape[:-1], cout)
    return acc if return_acc else _rescale(acc, iw.scale, x_step, bias)


def literal_group_conv(
    x_codes, iw: IntegerWeights, x_step, strides=1, padding="SAME", kernel_dilation=1, *, bias=None,
) -> jax.Array:
    """The paper's literal form of a ternary conv: per-group int32 partial sums over each group's
    slice of the (kh, kw, cin) patch, one multiply by the (unrounded) alpha_g per group, a sum, then
    the activation step. Memory: an int32 [B*out_pixels, G, cout] intermediate."""
    xp, strides, dil = _conv_setup(x_codes, iw, strides, padding, kernel_dilation)
    kshape = iw.shape
    length, cout = math.prod(kshape[:-1]), kshape[-1]
    p = _im2col(xp, kshape[:-2], strides, dil)
    y = _literal(p.reshape(-1, length), iw, x_step, bias)
    return y.reshape(*p.shape[:-1], cout)


def _dense_setup(x_codes, iw):
    _check_codes(x_codes)
    if len(iw.shape) != 2 or x_codes.shape[-1] != iw.shape[0]:
        raise ValueError(f"input {x_codes.shape} does not match dense kernel {iw.shape}")
    _check_overflow(iw.shape[0])
    return x_codes.reshape(-1, iw.shape[0]), x_codes.shape[:-1]


def integer_dense(x_codes, iw: IntegerWeights, x_step, *, bias=None, return_acc: bool = False):
    """Integer dense layer on codes [..., in]: int8 x int8 -> int32 jnp.dot, one rescale."""
    p, lead = _dense_setup(x_codes, iw)
    acc = _gemm_acc(p, iw.kernel).reshape(*lead, iw.shape[1])
    return acc if return_acc else _rescale(acc, iw.scale, x_step, bias)


def emulate_integer_dense(x_codes, iw: IntegerWeights, x_step, *, bias=None, return_acc: bool = False):
    """Float32 emulation of ``integer_dense`` (exact accumulator, same rescale)."""
    p, lead = _dense_setup(x_codes, iw)
    acc = _emulate_acc(p, iw.kernel).reshape(*lead, iw.shape[1])
    return acc if return_acc else _rescale(acc, iw.scale, x_step, bias)


def literal_group_dense(x_codes, iw: IntegerWeights, x_step, *, bias=None):
    """The paper's literal per-group form of a ternary dense layer."""
    p, lead = _dense_setup(x_codes, iw)
    return _literal(p, iw, x_step, bias).reshape(*lead, iw.shape[1])


# --------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------
def _module_conv(mod: nn.Conv, codes, iw, step, bias, mode, impl, record=None):
    ks = (mod.kernel_size,) if isinstance(mod.kernel_size, int) else tuple(mod.kernel_size)
    nsp = len(ks)
    if _tuple(mod.input_dilation, nsp) != (1,) * nsp:
        raise NotImplementedError(f"{mod.path}: input_dilation is not supported on the integer path")
    if mod.feature_group_count != 1:
        raise NotImplementedError(f"{mod.path}: feature_group_count != 1 is not supported")
    if getattr(mod, "mask", None) is not None:
        raise NotImplementedError(f"{mod.path}: masked convs are not supported")
    dil = _tuple(mod.kernel_dilation, nsp)
    padding = mod.padding
    if isinstance(padding, str) and padding.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
        # Same pre-padding as nn.Conv, applied to the codes (wrap / reflect / zero are exact on ints).
        p = padding.upper()
        if p == "CAUSAL":
            pads = [(dil[0] * (ks[0] - 1), 0)]
            codes = jnp.pad(codes, [(0, 0), *pads, (0, 0)])
        else:
            kd = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
            pads = [((k - 1) // 2, k // 2) for k in kd]
            mode_np = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[p]
            codes = jnp.pad(codes, [(0, 0), *pads, (0, 0)], mode=mode_np)
        padding = "VALID"
    nbatch = codes.ndim - (nsp + 1)
    lead = codes.shape[:nbatch]
    if nbatch != 1:
        codes = codes.reshape((-1,) + codes.shape[nbatch:])
    strides = _tuple(mod.strides, nsp)
    if mode == "integer":
        impl = resolve_impl(impl, codes.shape, iw.shape, strides, padding, dil)
    if record is not None:
        record[layer_path(mod)] = impl if mode == "integer" else mode
    fn = {"integer": functools.partial(integer_conv, impl=impl),
          "emulate": emulate_integer_conv, "literal": literal_group_conv}[mode]
    y = fn(codes, iw, step, strides, padding, dil, bias=bias)
    if nbatch != 1:
        y = y.reshape(*lead, *y.shape[1:])
    return y


def _materialize(x: jax.Array, step) -> jax.Array:
    """``x``, written to memory once before it is quantized (XLA-CPU only; identity elsewhere).

    A folded layer's float input (e.g. a ResNet block's output) often has two readers: the quantize
    of this layer and a residual add. XLA-CPU then fuses the input's whole elementwise producer
    chain (rescale, BN, ReLU and the residual adds of earlier blocks) into both readers and
    recomputes it block after block: in ResNet-20 these fusions cost 3x the convs (6-18 ms per
    layer instead of ~1 ms). ``lax.optimization_barrier`` does not stop it (XLA-CPU expands the
    barrier before fusion); a conditional does. Its other branch is never taken for a valid step
    (step > 0) and gives NaN (two identical branches would be simplified away)."""
    if jax.default_backend() != "cpu":  # a GPU conditional would sync with the host per layer
        return x
    return lax.cond(jnp.all(jnp.asarray(step) > 0), lambda v: v, lambda v: jnp.full_like(v, jnp.nan), x)


def integer_apply(
    module: nn.Module,
    variables: Mapping[str, Any],
    folded: Mapping[str, IntegerWeights],
    act_steps: Mapping[str, Any],
    x: jax.Array,
    mode: str = "integer",
    *,
    act_cfg=None,
    bits: int = 8,
    signed: bool | Mapping[str, bool] = False,
    impl: str | Mapping[str, str] = "auto",
    plan_out: dict | None = None,
    **apply_kwargs,
):
    """``module.apply(variables, x, **apply_kwargs)`` with every folded conv/dense on the integer path.

    For each ``nn.Conv`` / ``nn.Dense`` whose path ('/'-joined, e.g. "stage1_block0/conv1") is in
    ``folded``: the input is quantized to integer codes with the layer's step ``act_steps[path]``,
    then ``mode`` = "integer" (the integer accumulator, computed as ``impl`` says: one of ``IMPLS``
    for every conv, "auto" for ``resolve_impl``'s per-layer rule, or a ``{path: impl}`` mapping,
    missing paths "auto"; dense layers always run the int8 GEMM), "emulate" (exact float32
    emulation) or "literal" (the paper's per-group form, unrounded alphas) computes the layer with
    the folded kernel (the kernel in ``variables`` is ignored but must have the same shape); the
    layer's own bias is added. Layers not folded run in float; if their path is in ``act_cfg`` /
    ``act_steps`` their input is fake-quantized first, exactly as ``fgq_jax.intercept`` does.

    act_cfg: an ``activations.ActConfig`` (anything with ``.spec() -> {path: (bits, signed)}``); when
      given it decides each layer's bits and signedness, else ``bits`` / ``signed`` (a bool or a
      ``{path: bool}`` mapping) do. Bits must be <= 8 on folded layers.
    plan_out: a dict that receives ``{path: execution}`` of every folded layer at trace time (the
      resolved impl in mode "integer", "gemm" for dense layers; the mode otherwise) — see
      ``integer_plan``.
    Pure and jit-able (``folded`` and ``act_steps`` are pytrees of arrays); ``train`` defaults to
    False. Returns what ``module.apply`` returns.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    spec = dict(act_cfg.spec()) if act_cfg is not None else {}
    folded = {k[: -len("/kernel")] if k.endswith("/kernel") else k: v for k, v in folded.items()}
    act_steps = dict(act_steps or {})
    seen: set[str] = set()

    def layer_q(path):
        if path in spec:
            return spec[path]
        s = signed.get(path, False) if isinstance(signed, Mapping) else bool(signed)
        return bits, s

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (nn.Conv, nn.Dense)):
            return next_fun(*args, **kwargs)
        path = layer_path(mod)
        xin = args[0]
        iw = folded.get(path)
        if iw is None:
            if path in act_steps and (act_cfg is None or path in spec):
                b, s = layer_q(path)
                from fgq_jax.activations import quantize_activation

                xin = quantize_activation(xin, b, act_steps[path], signed=s)
            return next_fun(xin, *args[1:], **kwargs)
        if path not in act_steps:
            raise ValueError(f"layer {path!r} is folded for the integer path but has no activation step")
        seen.add(path)
        kshape = tuple(mod.get_variable("params", "kernel").shape)
        if kshape != iw.shape:
            raise ValueError(f"{path}: folded kernel {iw.shape} != model kernel {kshape}")
        b, s = layer_q(path)
        step = act_steps[path]
        codes = quantize_input(_materialize(xin, step), step, b, s)
        bias = mod.get_variable("params", "bias") if mod.use_bias else None
        if isinstance(mod, nn.Dense):
            if plan_out is not None:
                plan_out[path] = "gemm" if mode == "integer" else mode
            fn = {"integer": integer_dense, "emulate": emulate_integer_dense,
                  "literal": literal_group_dense}[mode]
            return fn(codes, iw, step, bias=bias)
        layer_impl = impl.get(path, "auto") if isinstance(impl, Mapping) else impl
        return _module_conv(mod, codes, iw, step, bias, mode, layer_impl, plan_out)

    apply_kwargs.setdefault("train", False)
    with nn.intercept_methods(interceptor):
        out = module.apply(variables, x, **apply_kwargs)
    missing = set(folded) - seen
    if missing:
        raise ValueError(f"folded layers never called by the model: {sorted(missing)}")
    return out


def make_integer_forward(
    module: nn.Module, mode: str = "integer", *, act_cfg=None, bits: int = 8,
    signed: bool | Mapping[str, bool] = False, impl: str | Mapping[str, str] = "auto",
) -> Callable:
    """A jitted ``f(variables, folded, act_steps, x) -> logits`` for ``integer_apply`` (eval mode)."""
    signed_t = tuple(sorted(signed.items())) if isinstance(signed, Mapping) else signed
    impl = dict(impl) if isinstance(impl, Mapping) else impl

    @jax.jit
    def forward(variables, folded, act_steps, x):
        s = dict(signed_t) if isinstance(signed_t, tuple) else signed_t
        return integer_apply(module, variables, folded, act_steps, x, mode, act_cfg=act_cfg,
                             bits=bits, signed=s, impl=impl)

    return forward


def integer_plan(
    module: nn.Module, variables: Mapping[str, Any], folded: Mapping[str, IntegerWeights],
    act_steps: Mapping[str, Any], x: jax.Array, *, impl: str | Mapping[str, str] = "auto",
    **kwargs,
) -> dict[str, str]:
    """``{layer path: execution}`` that ``integer_apply(..., mode="integer", impl=impl)`` uses for
    each folded layer on an input shaped like ``x`` (traced abstractly with ``jax.eval_shape``;
    nothing is computed). ``kwargs`` as ``integer_apply`` (act_cfg, bits, signed, ...)."""
    plan: dict[str, str] = {}
    jax.eval_shape(lambda v, f, s, xx: integer_apply(module, v, f, s, xx, "integer", impl=impl,
                                                     plan_out=plan, **kwargs),
                   variables, folded, act_steps, x)
    return plan
