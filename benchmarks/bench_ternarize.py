"""Benchmark: exact (FGQ) ternarization of a ResNet-50-shaped parameter tree.

The 54 kernels (53 conv + 1 dense) of torchvision's ResNet-50 in Flax layout, 25.5M weights,
random normal values, ternarized with ``method="exact"`` at N in {4, 64, "channel", None (per
tensor)}:

* JAX: ``fgq_jax.ternary.ternarize`` on every kernel (one jit-compiled program per unique kernel
  shape); compile time (first call) reported separately from the steady-state median;
* numpy: a plain numpy implementation of the same algorithm (sort |w| descending per group,
  prefix sums, argmax S_k^2/k), in the same run, on the same data.

Both results are checked to give the same squared quantization error before timing.

    python -m benchmarks.bench_ternarize            # full run
    python -m benchmarks.bench_ternarize --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import jax
import numpy as np

from fgq_jax.ternary import ternarize


def resnet50_kernel_shapes() -> list[tuple[int, ...]]:
    """Kernel shapes of torchvision's ResNet-50 in Flax layout: conv (kh, kw, cin, cout), fc (in, out)."""
    shapes = [(7, 7, 3, 64)]
    cin = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(1, 1, cin, width), (3, 3, width, width), (1, 1, width, 4 * width)]
            if b == 0:
                shapes.append((1, 1, cin, 4 * width))  # downsample projection
            cin = 4 * width
    shapes.append((2048, 1000))
    return shapes


def numpy_exact(kernel: np.ndarray, group_size: int | None):
    """Plain numpy FGQ exact ternarization (same grouping rule). Returns (codes, scales, thr)."""
    shape = kernel.shape
    cout = shape[-1]
    length = kernel.size // cout
    w = kernel.reshape(length, cout)
    if group_size is None:
        g = kernel.reshape(1, -1, 1)
    else:
        n = length if group_size == "channel" else min(group_size, length)
        num = -(-length // n)
        if num * n != length:
            w = np.concatenate([w, np.zeros((num * n - length, cout), w.dtype)])
        g = w.reshape(num, n, cout)
    a = np.abs(g)
    s = -np.sort(-a, axis=1)
    csum = np.cumsum(s, axis=1)
    k = np.arange(1, s.shape[1] + 1, dtype=np.float32)[None, :, None]
    best = np.argmax(csum * csum / k, axis=1)[:, None]
    thr = np.take_along_axis(s, best, 1)
    alpha = np.take_along_axis(csum, best, 1) / (best + 1)
    keep = (a >= thr) & (a > 0)
    codes = (np.sign(g) * keep).astype(np.int8)
    if group_size is None:
        codes = codes.reshape(shape)
    else:
        codes = codes.reshape(-1, cout)[:length].reshape(shape)
    return codes, alpha[:, 0, :].astype(np.float32)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_interleaved(fn_a, reps_a: int, fn_b, reps_b: int) -> tuple[list[float], list[float]]:
    """Alternate the two timings so that a change in machine load hits both alike."""
    ta, tb = [], []
    for i in range(max(reps_a, reps_b)):
        if i < reps_a:
            ta.append(_timed(fn_a))
        if i < reps_b:
            tb.append(_timed(fn_b))
    return ta, tb


def _jax_run(kernels, group_size):
    res = [ternarize(k, group_size, "exact") for k in kernels]
    jax.block_until_ready(res)
    return res


def _opt_error(kernel: np.ndarray, codes: np.ndarray, group_size) -> float:
    """||w - alpha t||^2 (float64) with each group's least-squares alpha for the given codes:
    compares the chosen supports independently of how each side rounded its scales."""
    cout = kernel.shape[-1]
    length = kernel.size // cout
    w = np.abs(kernel.astype(np.float64)).reshape(length, cout)
    kept = (codes.reshape(length, cout) != 0).astype(np.float64)
    if group_size is None:
        w, kept = w.reshape(1, -1, 1), kept.reshape(1, -1, 1)
    else:
        n = length if group_size == "channel" else min(group_size, length)
        num = -(-length // n)
        pad = ((0, num * n - length), (0, 0))
        w, kept = np.pad(w, pad).reshape(num, n, cout), np.pad(kept, pad).reshape(num, n, cout)
    s = np.sum(w * kept, axis=1)
    k = np.sum(kept, axis=1)
    return float(np.sum(w * w) - np.sum(np.where(k > 0, s * s / np.maximum(k, 1), 0.0)))


def _check_same(kernels_np, jax_res, np_res, group_size) -> float:
    """Max over kernels of (err_jax - err_numpy) / err_numpy with optimal scales for each side's
    codes (<= ~1e-7: same optimum; negative: JAX found a better cut than float32 numpy)."""
    worst = -np.inf
    for k, tj, (cn, _) in zip(kernels_np, jax_res, np_res):
        ej = _opt_error(k, np.asarray(tj.codes), group_size)
        en = _opt_error(k, cn, group_size)
        worst = max(worst, (ej - en) / en)
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="steady-state repeats (JAX)")
    ap.add_argument("--np-repeats", type=int, default=None, help="numpy repeats")
    ap.add_argument("--sizes", default="4,64,channel,None",
                    help="comma-separated group sizes (ints, channel, None = per tensor)")
    args = ap.parse_args(argv)
    reps = args.repeats or (3 if args.quick else 10)
    np_reps = args.np_repeats or (1 if args.quick else 3)
    sizes = [None if s.strip() == "None" else s.strip() if s.strip() == "channel" else int(s)
             for s in args.sizes.split(",")]

    shapes = resnet50_kernel_shapes()
    rng = np.random.default_rng(0)
    kernels_np = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    kernels = [jax.device_put(k) for k in kernels_np]
    total = sum(math.prod(s) for s in shapes)
    print(f"ResNet-50 kernel tree: {len(shapes)} kernels "
          f"({sum(len(s) == 4 for s in shapes)} conv + {sum(len(s) == 2 for s in shapes)} dense), "
          f"{total / 1e6:.2f}M weights, {len(set(shapes))} unique shapes")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"repeats: jax {reps}, numpy {np_reps}; load average {os.getloadavg()[0]:.1f}")

    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        res = _jax_run(kernels, n)
        compile_s = time.perf_counter() - t0
        np_res = [numpy_exact(k, n) for k in kernels_np]
        diff = _check_same(kernels_np, res, np_res, n)
        jt, nt = _time_interleaved(lambda: _jax_run(kernels, n), reps,
                                   lambda: [numpy_exact(k, n) for k in kernels_np], np_reps)
        jm, nm = statistics.median(jt), statistics.median(nt)
        rows.append((n, compile_s, jm, min(jt), total / jm, nm, nm / jm, diff))
        print(f"  N={n}: max rel. error excess of jax over numpy {diff:.1e}", flush=True)

    print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print("| N | compile+first run s | steady median s (min) | weights/s | numpy s | numpy/jax |")
    print("|---|---|---|---|---|---|")
    for n, c, jm, jmin, wps, nm, ratio, _ in rows:
        print(f"| {n} | {c:.2f} | {jm:.3f} ({jmin:.3f}) | {wps / 1e6:.0f}M | {nm:.3f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
