"""Building blocks shared by the model definitions: PyTorch-faithful BatchNorm and pooling.

Everything here follows PyTorch semantics so that converted PyTorch weights give the same outputs:
explicit symmetric padding, max pooling padded with -inf, torch's adaptive average pooling bins,
and BatchNorm running statistics updated with the *unbiased* batch variance.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# PyTorch BatchNorm2d defaults: momentum 0.1 on the new value <=> Flax momentum 0.9 on the old one.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"), what torchvision's ResNets use.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.init.kaiming_normal_(mode="fan_in"), what akamaster's CIFAR ResNets use.
kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def pad2d(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch ``padding=p`` for a 2-D conv/pool: ``((p, p), (p, p))``."""
    return ((p, p), (p, p))


class TorchBatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` whose running variance is updated like PyTorch's.

    Flax updates ``batch_stats/var`` with the biased batch variance; PyTorch uses the unbiased one
    (times n / (n - 1), n = elements per channel). The forward pass is unchanged (both normalise with
    the biased variance); only the stored running variance differs, which matters for BN
    re-estimation with small batches. Still an ``nn.BatchNorm`` (same variables, same isinstance).

    Input: [..., C] (normalised over all axes but ``axis``); output: same shape.
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    # Two-pass variance: E[x^2]-E[x]^2 loses digits when |mean| >> std (we compare to 1e-4).
    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        update = not use_ra and not self.is_initializing()
        old_var = self.get_variable("batch_stats", "var") if update else None
        y = super().__call__(x, use_running_average, mask=mask)
        if update:
            axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
            feature_axes = {a % x.ndim for a in axes}
            if mask is not None:
                # mask is broadcastable to x and constant along the feature axes.
                per_feature = math.prod(x.shape[a] for a in feature_axes)
                n = jnp.sum(jnp.broadcast_to(mask, x.shape)) / per_feature
            else:
                n = math.prod(x.shape[a] for a in range(x.ndim) if a not in feature_axes)
            if self.axis_name is not None:
                n = n * jax.lax.psum(1, self.axis_name)
            new_var = self.get_variable("batch_stats", "var")
            # new = m*old + (1-m)*var_biased  ->  m*old + (1-m)*var_biased*n/(n-1)
            m = self.momentum
            bessel = n / jnp.maximum(n - 1, 1)
            self.put_variable("batch_stats", "var", m * old_var + (new_var - m * old_var) * bessel)
        return y


def pool_output_size(size: int, window: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> int:
    """Output length of PyTorch's pooling along one axis (``torch.nn.MaxPool2d`` docs' formula).

    ``floor`` (or ``ceil`` with ``ceil_mode``) of ``(size + 2*padding - window) / stride``, plus 1;
    in ceil mode a last window that would start in the right padding is dropped, as in PyTorch.
    """
    span = size + 2 * padding - window
    if span < 0:
        raise ValueError(f"pooling window {window} larger than the padded input {size + 2 * padding}")
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> jax.Array:
    """PyTorch ``MaxPool2d(window, stride, padding, ceil_mode=ceil_mode)`` on NHWC ``x`` [B, H, W, C].

    Padding counts as -inf. ``ceil_mode=True`` (SqueezeNet's pools) rounds the output size up: the
    last window may run past the bottom/right edge and then takes the max of the pixels it covers,
    which is what extra -inf padding on that side gives. Returns [B, H', W', C] with H', W' from
    :func:`pool_output_size`.
    """
    pads = []
    for size in x.shape[1:3]:
        out = pool_output_size(size, window, stride, padding, ceil_mode)
        extra = max((out - 1) * stride + window - (size + 2 * padding), 0)  # > 0 only in ceil mode
        pads.append((padding, padding + extra))
    # flax's pool pads inside lax.reduce_window with the reduction's init value (-inf for max).
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


@functools.cache
def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging matrix of torch's adaptive pooling along one axis.

    Bin i covers [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)) (bins may overlap or repeat).
    """
    mat = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil division
        mat[i, start:end] = 1.0 / (end - start)
    mat.setflags(write=False)  # cached: shared between calls
    return mat


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d(output_size)`` on NHWC ``x`` [B, H, W, C] -> [B, oh, ow, C]."""
    _, h, w, _ = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x  # every bin is one pixel: exact identity, as in torch
    ph = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    # Separable average: rows then columns (bins are rectangles).
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)
