"""Cross-layer weight equalization (Nagel et al., "Data-Free Quantization", ICCV 2019).

A layer whose output reaches the next layers through positive-homogeneous operations only (ReLU,
max pool, channel concat, dropout) can have each output channel c divided by s_c > 0 if the
consumers' input channel c is multiplied by s_c: relu(x / s) = relu(x) / s for s > 0, so the FP
network computes exactly the same function. Choosing s_c = sqrt(r1_c / r2_c), with r1_c the range
(max |w|) of the producers' output channel c and r2_c that of the consumers' input channel c,
makes both ranges sqrt(r1_c r2_c): channels that one layer barely uses and the other scales up are
balanced out. Iterated over all pairs until the scales stop moving.

Why it matters for FGQ: a group of N consecutive *input-channel* weights shares one ternary scale,
so input channels of very different magnitudes in one group are quantized badly (the small ones go
to zero). Equalization evens out the consumers' input channels; the producers' per-output-channel
rescaling does not change their relative quantization error (a group lies in one output channel).
It needs no data and no BatchNorm, which is what networks such as SqueezeNet lack.

Which layers pair up is a fact of the architecture: `fgq_jax.models.ModelSpec.equalization_pairs`.
Kernels are Flax layouts (conv [kh, kw, in, out], dense [in, out]): output channels on the last
axis, input channels on the second-to-last, for both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from fgq_jax.transforms import get_at, set_at

__all__ = ["EqualizationPair", "channel_ranges", "equalization_scales", "equalize_params"]


@dataclasses.dataclass(frozen=True)
class EqualizationPair:
    """Producers whose outputs, concatenated in this order on the channel axis, are the input of
    every consumer, with only positive-homogeneous operations in between. Paths are '/'-joined
    params paths of conv/dense layers."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...]


def channel_ranges(kernel: jnp.ndarray, axis: int) -> jnp.ndarray:
    """max |w| per channel along `axis` (-1: output channels, -2: input channels); float32 [C]."""
    k = jnp.abs(jnp.asarray(kernel, jnp.float32))
    k = jnp.moveaxis(k, axis, -1)
    return jnp.max(k.reshape(-1, k.shape[-1]), axis=0)


def equalization_scales(r1: jnp.ndarray, r2: jnp.ndarray) -> jnp.ndarray:
    """s = sqrt(r1 / r2) per channel; 1 where either range is 0 (a dead channel stays as it is)."""
    ok = (r1 > 0) & (r2 > 0)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, r1 / jnp.where(ok, r2, 1.0), 1.0)), 1.0)


def _equalize_pair(params: dict, pair: EqualizationPair) -> tuple[dict, float]:
    """One equalization step of one pair; returns (params, max |log s|)."""
    kernels = [get_at(params, p)["kernel"] for p in pair.producers]
    r1 = jnp.concatenate([channel_ranges(k, -1) for k in kernels])
    for c in pair.consumers:
        cin = get_at(params, c)["kernel"].shape[-2]
        if cin != r1.shape[0]:
            raise ValueError(
                f"equalization: consumer {c!r} has {cin} input channels but its producers "
                f"{list(pair.producers)} give {r1.shape[0]}"
            )
    r2 = jnp.max(jnp.stack([channel_ranges(get_at(params, c)["kernel"], -2) for c in pair.consumers]), 0)
    s = equalization_scales(r1, r2)
    start = 0
    for p, k in zip(pair.producers, kernels):
        n = k.shape[-1]
        layer = dict(get_at(params, p))
        layer["kernel"] = k / s[start : start + n].astype(k.dtype)
        if "bias" in layer:
            layer["bias"] = layer["bias"] / s[start : start + n].astype(layer["bias"].dtype)
        params = set_at(params, p, layer)
        start += n
    for c in pair.consumers:
        layer = dict(get_at(params, c))
        k = layer["kernel"]
        layer["kernel"] = k * s.astype(k.dtype)[:, None]
        params = set_at(params, c, layer)
    return params, float(jnp.max(jnp.abs(jnp.log(s))))


def equalize_params(
    params: Mapping[str, Any],
    pairs: tuple[EqualizationPair, ...],
    *,
    max_iterations: int = 100,
    tol: float = 1e-4,
) -> dict:
    """Cross-layer equalization of `params` over `pairs` (the FP function is unchanged up to
    float rounding). Sweeps all pairs in order until no scale moves by more than `tol` (in log) or
    `max_iterations` sweeps; returns new params (the input is not modified)."""
    if not pairs:
        raise ValueError("equalization: the model declares no equalization pairs "
                         "(ModelSpec.equalization_pairs); it cannot be equalized")
    params = dict(params)
    for _ in range(max_iterations):
        moved = 0.0
        for pair in pairs:
            params, m = _equalize_pair(params, pair)
            moved = max(moved, m)
        if moved < tol:
            break
    return params
