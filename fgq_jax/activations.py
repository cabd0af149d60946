"""Uniform activation quantizers with a clipped straight-through estimator, and their calibrators.

FGQ keeps activations in low-precision fixed point (8 or 4 bits) while the weights are ternary. This
module provides the fake-quant operator used in the float graph, the integer-code twin used by an
integer path, and calibrators that pick the quantization *step* (``scale``) from sample activations.

Conventions (shared by every function here):

* ``scale`` is the step between two adjacent levels, a positive float (scalar, or anything that
  broadcasts against ``x``). It may be a traced array: changing it never triggers a recompile.
* ``bits`` / ``signed`` / ``levels`` are static Python values.
* unsigned (after ReLU): integer levels ``0 .. 2**bits - 1``;
  signed: symmetric ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1`` (the most negative two's-complement
  code is unused so the grid is symmetric; ``bits=2, signed=True`` therefore gives the three ternary
  levels {-s, 0, s}).
* ``levels=n`` overrides ``bits`` with an explicit number of levels: unsigned -> ``0 .. n-1``
  (``levels=2`` is the binary activation {0, s}); signed -> ``n`` must be odd, ``-(n-1)/2 .. (n-1)/2``.
* rounding is round-half-to-even (``jnp.round``, same as ``numpy.round``), then clipping.
* ``bits=1`` is the binary activation of BNN / XNOR-Net (Courbariaux et al. 2016, Rastegari et al.
  2016): signed -> the sign quantizer ``s * sign(x)`` with the two levels {-s, +s} (``sign(0) = +1``;
  there is no zero level, the codes are {-1, +1}); unsigned (after ReLU) -> {0, s}, ``x > s/2 -> s``
  (the 2-level grid ``levels=2``; round-half-even sends ``x = s/2`` to 0). Its gradient is BNN's
  hard-tanh STE expressed in units of the scale: 1 where ``|x| <= s`` (signed) or ``0 <= x <= s``
  (unsigned), 0 elsewhere -- BNN's ``|u| <= 1`` for ``u = x / s``. The clip is tied to ``s`` rather than
  to the constant 1 because these activations are not batch-normalised to unit scale (they are the
  raw inputs of the layers), so a fixed clip at 1 would pass or block gradients depending on each
  layer's arbitrary range. The scale is ``mean|x|`` (:func:`binary_scale`, XNOR-Net's optimum for the
  sign quantizer), per tensor or per channel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ActConfig",
    "Calibration",
    "qrange",
    "quantize_activation",
    "quantize_activation_int",
    "calibrate",
    "binary_scale",
    "ActivationSampler",
    "pow2_exponent",
]

_METHODS = ("max", "percentile", "mse", "mean")
BITS_RANGE = (1, 16)


@dataclasses.dataclass(frozen=True)
class ActConfig:
    """Which layer inputs are quantized, to how many bits, and signed or not.

    Static (hashable): changing it means a different compiled forward. The per-layer *steps* are not
    part of it; they travel as arrays.

    Attributes:
      layers: tuple of (layer_path, bits, signed), one per quantized layer input.
    """

    layers: tuple[tuple[str, int, bool], ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p, _, _ in self.layers)

    def spec(self) -> dict[str, tuple[int, bool]]:
        return {p: (b, s) for p, b, s in self.layers}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How activation steps are chosen from sample activations (see :func:`calibrate`).

    method: "max" | "percentile" | "mse" | "mean" (1-bit activations only: XNOR-Net's mean|x|, see
      :func:`binary_scale`); percentile: for "percentile", in (0, 100];
    pow2: round each step to a power of two; max_samples: per layer, larger samples are subsampled
    (the maximum is kept).
    """

    method: str = "mse"
    percentile: float = 99.99
    pow2: bool = False
    max_samples: int = 1 << 18

    def __post_init__(self):
        if self.method not in _METHODS:
            raise ValueError(f"Calibration.method must be one of {_METHODS}, got {self.method!r}")
        if isinstance(self.percentile, bool) or not 0 < float(self.percentile) <= 100:
            raise ValueError(f"Calibration.percentile must be in (0, 100], got {self.percentile!r}")
        if not isinstance(self.pow2, bool):
            raise ValueError(f"Calibration.pow2 must be a bool, got {self.pow2!r}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 2:
            raise ValueError(f"Calibration.max_samples must be an int >= 2, got {self.max_samples!r}")


# --------------------------------------------------------------------------------------------------
# integer range
# --------------------------------------------------------------------------------------------------
def qrange(bits: int = 8, signed: bool = False, levels: int | None = None) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` (both inclusive) of a quantizer.

    >>> qrange(8), qrange(8, signed=True), qrange(2, signed=True), qrange(levels=2)
    ((0, 255), (-127, 127), (-1, 1), (0, 1))
    >>> qrange(1), qrange(1, signed=True)
    ((0, 1), (-1, 1))

    ``bits=1, signed=True`` is the sign quantizer: its codes are -1 and +1 only (0 is not a level).
    """
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        levels = int(levels)
        if not signed:
            return 0, levels - 1
        if levels % 2 == 0:
            raise ValueError(
                f"a signed (symmetric, zero-centred) quantizer needs an odd number of levels, got {levels}"
            )
        return -(levels - 1) // 2, (levels - 1) // 2
    lo, hi = BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= hi:
        raise ValueError(f"bits must be an int in [{lo}, {hi}], got {bits!r}")
    bits = int(bits)
    if bits == 1:
        return (-1, 1) if signed else (0, 1)
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def _check_scale(scale) -> None:
    """Reject a non-positive / non-finite *concrete* scale (traced scales cannot be inspected)."""
    if isinstance(scale, jax.core.Tracer):
        return
    s = np.asarray(scale)
    if s.size and not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError(f"scale (the quantization step) must be finite and > 0, got {scale!r}")


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reduce a broadcast gradient ``g`` back to ``shape`` (the inverse of numpy broadcasting)."""
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


# --------------------------------------------------------------------------------------------------
# fake quantization with a clipped STE
# --------------------------------------------------------------------------------------------------
def _compute_dtype(x) -> jnp.dtype:
    # Low-precision floats (bf16/fp16) cannot hold x/scale precisely enough for 8-bit codes.
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fake_quant(x, scale, qmin: int, qmax: int):
    ct = _compute_dtype(x)
    s = jnp.asarray(scale, ct)
    q = jnp.clip(jnp.round(x.astype(ct) / s), qmin, qmax)
    return (q * s).astype(x.dtype)


def _fake_quant_fwd(x, scale, qmin, qmax):
    return _fake_quant(x, scale, qmin, qmax), (x, scale)


def _fake_quant_bwd(qmin, qmax, res, g):
    x, scale = res
    ct = _compute_dtype(x)
    s = jnp.asarray(scale, ct)
    v = x.astype(ct) / s
    inside = (v >= qmin) & (v <= qmax)  # representable range [qmin*s, qmax*s], bounds included
    gx = jnp.where(inside, g, jnp.zeros_like(g)).astype(x.dtype)
    # Scale gradient (LSQ, Esser et al. 2020, without its gradient-scale factor): d(s*q)/ds with the
    # STE on round() is round(v) - v inside the range and the clip bound outside. Calibrated scales
    # usually receive no gradient anyway; this only makes a learned step possible.
    q = jnp.round(v)
    ds_elem = jnp.where(inside, q - v, jnp.clip(q, qmin, qmax))
    gs = _sum_to_shape(ds_elem * g.astype(ct), jnp.shape(scale)).astype(jnp.result_type(scale))
    return gx, gs


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _is_sign(bits: int, signed: bool, levels: int | None) -> bool:
    """The 1-bit signed quantizer is ``s * sign(x)``, not a clipped rounding of ``x / s``."""
    return levels is None and bits == 1 and signed


@jax.custom_vjp
def _sign_quant(x, scale):
    ct = _compute_dtype(x)
    s = jnp.asarray(scale, ct)
    return jnp.where(x.astype(ct) >= 0, s, -s).astype(x.dtype)


def _sign_quant_fwd(x, scale):
    return _sign_quant(x, scale), (x, scale)


def _sign_quant_bwd(res, g):
    x, scale = res
    ct = _compute_dtype(x)
    xc = x.astype(ct)
    # BNN's hard-tanh STE in units of the scale: d/dx = 1 where |x| <= s (bounds included).
    inside = jnp.abs(xc) <= jnp.asarray(scale, ct)
    gx = jnp.where(inside, g, jnp.zeros_like(g)).astype(x.dtype)
    # d(s * sign(x))/ds = sign(x), with sign(0) = +1 as in the forward.
    ds_elem = jnp.where(xc >= 0, 1.0, -1.0).astype(ct)
    gs = _sum_to_shape(ds_elem * g.astype(ct), jnp.shape(scale)).astype(jnp.result_type(scale))
    return gx, gs


_sign_quant.defvjp(_sign_quant_fwd, _sign_quant_bwd)


def quantize_activation(
    x: jax.Array,
    bits: int,
    scale: jax.Array | float,
    signed: bool = False,
    levels: int | None = None,
) -> jax.Array:
    """Fake-quantize activations: ``clip(round(x / scale), qmin, qmax) * scale``.

    Args:
      x: float array, any shape (e.g. NHWC activations).
      bits: static int in [1, 16] (typically 8, 4, 2 or 1); ignored when ``levels`` is given.
        ``bits=1``: binary activations (see the module docstring): signed -> ``s * sign(x)`` in
        {-s, +s}, unsigned -> {0, s}.
      scale: the step, float > 0; scalar (per-tensor) or broadcastable to ``x``; may be traced.
      signed: static; symmetric signed grid instead of the unsigned post-ReLU one.
      levels: static; explicit number of levels (``levels=2`` -> binary {0, s}).

    Returns:
      array of ``x.shape`` and ``x.dtype`` whose values lie on the grid ``scale * {qmin..qmax}``.

    Gradient (clipped straight-through estimator): ``d out / d x`` is 1 where ``x`` lies inside the
    representable range ``[qmin*scale, qmax*scale]`` (bounds included) and 0 outside it. The gradient
    with respect to ``scale`` is the LSQ one (``round(x/s) - x/s`` inside, the clip bound outside).
    For the sign quantizer (``bits=1, signed=True``) that range is ``[-s, s]`` (BNN's hard-tanh clip
    in units of ``s``) and the scale gradient is ``sign(x)``.
    """
    qmin, qmax = qrange(bits, signed, levels)
    _check_scale(scale)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if _is_sign(bits, signed, levels):
        return _sign_quant(x, scale)
    return _fake_quant(x, scale, qmin, qmax)


def quantize_activation_int(
    x: jax.Array,
    bits: int,
    scale: jax.Array | float,
    signed: bool = False,
    levels: int | None = None,
) -> jax.Array:
    """Integer codes of :func:`quantize_activation`: ``clip(round(x / scale), qmin, qmax)`` as int32.

    ``quantize_activation(x, ...) == quantize_activation_int(x, ...) * scale`` exactly (up to the
    float dtype of ``x``). ``bits=1, signed=True``: codes in {-1, +1} (``x >= 0 -> +1``). Not differentiable (integer output) — use it on the integer inference path.
    """
    qmin, qmax = qrange(bits, signed, levels)
    _check_scale(scale)
    x = jnp.asarray(x)
    ct = _compute_dtype(x) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if _is_sign(bits, signed, levels):  # codes {-1, +1}: the scale does not move the sign
        return jnp.where(x.astype(ct) >= 0, 1, -1).astype(jnp.int32)
    q = jnp.clip(jnp.round(x.astype(ct) / jnp.asarray(scale, ct)), qmin, qmax)
    return q.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
def _magnitudes(x: jax.Array, signed: bool) -> jax.Array:
    """The values whose range the quantizer must cover: |x| (signed) or max(x, 0) (unsigned, since
    negative inputs of an unsigned quantizer land on 0 whatever the step)."""
    x = jnp.ravel(x).astype(jnp.float32)
    return jnp.abs(x) if signed else jnp.maximum(x, 0.0)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "num_candidates"))
def _mse_step(x: jax.Array, qmin: int, qmax: int, num_candidates: int) -> jax.Array:
    """Step minimising mean((fake_quant(x) - x)**2) over ``2 * num_candidates`` clipping ranges:

    * ``max * k / num_candidates`` for k = 1..num_candidates (a linear grid; k = num_candidates is
      the "max" step, so the result is never worse than the max calibrator on the same sample), and
    * the quantiles of the magnitudes at levels ``1 - p`` for ``p`` geometrically spaced from 1/2 to
      1/n: on heavy-tailed data the best range can be far below 1 % of the max, where a linear grid
      has no candidate.
    """
    mags = _magnitudes(x, signed=qmin < 0)
    n = mags.size
    top = jnp.max(mags)
    linear = top * jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / num_candidates
    tail = np.geomspace(0.5, 1.0 / max(n, 2), num_candidates)  # static: depends on n only
    quant = jnp.quantile(mags, jnp.asarray(1.0 - tail, jnp.float32))
    steps = jnp.concatenate([linear, quant]) / qmax
    safe = jnp.where(steps > 0, steps, 1.0)
    xf = jnp.ravel(x).astype(jnp.float32)

    def err(s):
        xq = jnp.clip(jnp.round(xf / s), qmin, qmax) * s
        return jnp.mean(jnp.square(xq - xf))

    # lax.map with a batch keeps memory at O(batch * x.size) while vectorising over candidates.
    errs = jax.lax.map(err, safe, batch_size=min(2 * num_candidates, 8))
    errs = jnp.where(steps > 0, errs, jnp.inf)
    # argmin returns the first minimum; the max candidate comes first among equals of the linear grid.
    return jnp.where(jnp.any(steps > 0), steps[jnp.argmin(errs)], 0.0)


def binary_scale(x, signed: bool = True, per_channel: bool = False) -> jax.Array:
    """XNOR-Net's activation scale of a 1-bit quantizer: the mean magnitude ``mean|x|``.

    For the sign quantizer ``s * sign(x)`` this is the least-squares optimum
    (``argmin_s mean((x - s*sign(x))**2) = mean|x|``). Unsigned (after a ReLU): ``mean(max(x, 0))``
    over all the values (the zeros included), so the {0, s} threshold ``s/2`` sits low and the code
    says mostly whether the unit fired.

    Args:
      x: float array [..., C] (e.g. NHWC activations, or a flat sample [n] when per tensor).
      signed: the quantizer is the signed one (|x|) or the unsigned one (max(x, 0)).
      per_channel: one scale per entry of the last axis (shape [C]) instead of one per tensor.

    Returns:
      float32 array, shape () or [C], every entry > 0 (an entry whose values are all 0 gets 1.0).
    """
    x = jnp.asarray(x, jnp.float32)
    if x.size == 0:
        raise ValueError("cannot compute a binary scale from an empty sample")
    mags = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
    if per_channel:
        if x.ndim < 1:
            raise ValueError(f"per_channel needs an array with a channel axis, got shape {x.shape}")
        s = jnp.mean(mags.reshape(-1, x.shape[-1]), axis=0)
    else:
        s = jnp.mean(mags)
    return jnp.where(s > 0, s, 1.0)


def calibrate(
    x,
    bits: int,
    method: str = "max",
    signed: bool = False,
    percentile: float = 99.99,
    pow2: bool = False,
    *,
    levels: int | None = None,
    num_candidates: int = 100,
) -> jax.Array:
    """Choose the per-tensor step ``scale`` for :func:`quantize_activation` from sample activations.

    Args:
      x: sample activations, any shape (flattened); float. Concatenate several batches (or use
        :class:`ActivationSampler`) to calibrate over more than one batch.
      bits, signed, levels: the quantizer the step is for (see :func:`qrange`).
      method: ``"max"``: ``max|x| / qmax`` (no clipping on the sample);
        ``"percentile"``: ``percentile(|x|, percentile) / qmax`` (linear interpolation, as numpy);
        ``"mse"``: the step minimising the mean squared quantization error on the sample among
        ``num_candidates`` clipping ranges ``max|x| * k / num_candidates`` plus ``num_candidates``
        upper quantiles of ``|x|`` (see ``_mse_step``); never worse than "max" on the sample.
        For unsigned quantizers ``max(x, 0)`` replaces ``|x|`` (negatives are clipped to 0 anyway).
        ``"mean"`` (``bits=1`` only): XNOR-Net's ``mean|x|`` (:func:`binary_scale`). For the signed
        1-bit (sign) quantizer ``"mse"`` is the same closed form (mean|x| is its least-squares
        optimum); for the unsigned 1-bit one {0, s} ``"mse"`` searches the step as for any bits.
      percentile: in (0, 100], used by ``"percentile"``.
      pow2: round the step *up* to a power of two (the paper's dynamic fixed point: integer codes with
        a power-of-two exponent). Rounding up (ceil) keeps the clipping range at least as wide as the
        calibrated one — no extra saturation — at the cost of a step at most 2x coarser.

    Returns:
      float32 scalar array, the step (> 0). A sample with no positive range (e.g. all zeros after a
      ReLU) carries no information; the step ``1 / qmax`` (range 1.0) is returned then.

    Raises:
      ValueError: unknown method, bad percentile, empty or non-finite sample.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {_METHODS}")
    qmin, qmax = qrange(bits, signed, levels)
    x = jnp.asarray(x)
    if x.size == 0:
        raise ValueError("cannot calibrate on an empty sample")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("calibration sample contains NaN or Inf")
    if method == "mean" and bits != 1:
        raise ValueError(f"calibration method 'mean' is for 1-bit activations only, got bits={bits!r}")
    mags = _magnitudes(x, signed=qmin < 0)
    if method == "mean" or (method == "mse" and _is_sign(bits, signed, levels)):
        step = binary_scale(x, signed=signed)
    elif method == "max":
        rng = jnp.max(mags)
        step = rng / qmax
    elif method == "percentile":
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        rng = jnp.percentile(mags, float(percentile))
        step = rng / qmax
    else:
        if int(num_candidates) < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates!r}")
        step = _mse_step(x, qmin, qmax, int(num_candidates))
    step = jnp.where(step > 0, step, 1.0 / qmax).astype(jnp.float32)
    if pow2:
        step = jnp.exp2(jnp.ceil(jnp.log2(step)))
    return step


class ActivationSampler:
    """Streaming collector of calibration samples over several batches.

    Each :meth:`update` keeps at most ``per_batch`` randomly chosen values of the batch plus its
    extreme values (min and max), so ``"max"`` calibration stays exact over the whole stream while
    memory stays bounded (``per_batch`` floats per batch). ``"percentile"`` / ``"mse"`` then work on
    the pooled subsample.

    >>> s = ActivationSampler()
    >>> for batch in batches: s.update(activations(batch))     # doctest: +SKIP
    >>> step = s.calibrate(8, "percentile")                      # doctest: +SKIP
    """

    def __init__(self, per_batch: int = 65536, seed: int = 0):
        if per_batch < 1:
            raise ValueError(f"per_batch must be >= 1, got {per_batch!r}")
        self.per_batch = int(per_batch)
        self._rng = np.random.default_rng(seed)
        self._chunks: list[np.ndarray] = []
        self.count = 0  # total number of values seen

    def update(self, x) -> ActivationSampler:
        """Add one batch of activations (any shape); returns ``self``."""
        v = np.asarray(x, dtype=np.float32).ravel()
        if v.size == 0:
            return self
        if not np.all(np.isfinite(v)):
            raise ValueError("calibration sample contains NaN or Inf")
        self.count += v.size
        if v.size > self.per_batch:
            keep = self._rng.choice(v.size, self.per_batch, replace=False)
            v = np.concatenate([v[keep], [v.min(), v.max()]])
        self._chunks.append(v)
        return self

    def update_all(self, xs: Iterable) -> ActivationSampler:
        for x in xs:
            self.update(x)
        return self

    @property
    def samples(self) -> np.ndarray:
        """The pooled samples, float32 [n]."""
        return np.concatenate(self._chunks) if self._chunks else np.zeros((0,), np.float32)

    def calibrate(self, bits: int, method: str = "max", signed: bool = False, **kw) -> jax.Array:
        """:func:`calibrate` on the pooled samples."""
        return calibrate(self.samples, bits, method, signed, **kw)


def pow2_exponent(step) -> int:
    """The exponent ``e`` of a power-of-two step ``2**e`` (as produced by ``calibrate(pow2=True)``)."""
    e = math.log2(float(step))
    if e != round(e):
        raise ValueError(f"step {float(step)!r} is not a power of two")
    return int(round(e))
