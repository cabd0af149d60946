"""Label-free block reconstruction of a ternarized network (AdaRound / BRECQ / QDrop style).

Block by block, in call order, the ternary codes and per-group scales of the block's quantized layers
are optimised so that the quantized block, fed the *quantized* network's input to it (activation
quantization inside the block as the recipe says), reproduces the *full-precision* block's output on
the full-precision network's input:

    min_{V, s}  || block_q(x_in; W(V, s)) - block_fp(x_fp) ||^2 / || block_fp(x_fp) ||^2  +  lam * R(V)

A *block* (a "unit" here) is a top-level submodule of the model that holds ternary layers (a ResNet
basic block ``stage1_block0``, a SqueezeNet fire ``features_3``); a ternary conv/dense at the top
level is a unit of its own. Everything else in the unit (BatchNorm, FP layers) stays as it is, with
its running statistics (inference mode).

Relaxation (AdaRound's rectified sigmoid, on the ternary grid): per weight w with its group's scale
s (the +1 scale for w >= 0, the -1 scale for w < 0 with two scales), r = w / s, the soft code is

    c = b + span * h(V),   h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

with b = clip(floor(r), -1, 0), span = 1 for the ternary methods (c in [-1, 1]; rounding h gives
{-1, 0, +1}), and b = -1, span = 2 for "binary" (codes stay in {-1, +1}). V starts where
h(V) = r - b, i.e. the soft kernel starts at the FP kernel clipped to [-s, s], and nearest rounding
(h >= 1/2, close to the exact FGQ threshold s/2) gives back the initial codes. The scales are
learned in log space (so they stay > 0). R(V) = mean(1 - |2h - 1|^beta) is off for the first
`warmup` fraction of the iterations, then beta anneals from 20 to 2 and pushes every h to 0 or 1;
at the end the codes are rounded (V >= 0), so every kernel is exactly ternary with its group
scales: a `TernaryTensor` like any other (export, accounting and the integer path take it as is).

QDrop (Wei et al. 2022) option: each element of the block's input is, with probability `qdrop`,
the full-precision network's value instead of the quantized network's one, which flattens the loss
landscape toward both and generalises better from few images.

Each unit's optimisation is one jit-compiled `lax.fori_loop` (minibatches drawn inside from a key),
so a unit costs one compilation; the result is deterministic for a seed.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fgq_jax.activations import ActConfig
from fgq_jax.intercept import intercepting, linear_layer_paths
from fgq_jax.repairs import layer_moments, normalized_batches
from fgq_jax.ternary import TernaryTensor, broadcast_scales, dequantize_tree, is_ternary
from fgq_jax.transforms import get_at, path_to_str, set_at

__all__ = ["ReconSettings", "Unit", "find_units", "reconstruct"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1
BETA_START, BETA_END = 20.0, 2.0


@dataclasses.dataclass(frozen=True)
class ReconSettings:
    """Budget and hyper-parameters of one reconstruction (hashable: static for jit).

    unit: "block" (top-level submodules, minibatch Adam on the block's forward) or "layer" (each
    ternary layer alone, its output error written exactly as a quadratic form of two L x L input
    moment matrices accumulated over all the images, so each step costs one L x L x cout product:
    ~100x cheaper than "block" on a CPU; no QDrop, batch_size unused).
    iterations: Adam steps per unit; batch_size: images per step; qdrop: probability that an input
    element is the FP one (0 = plain BRECQ); lr_codes / lr_scales: Adam learning rates of V and of
    the log scales; reg: weight lam of the rounding regulariser (the loss is relative, so lam is
    large next to AdaRound's 0.01: with a few hundred steps a weak push leaves h far from binary and
    rounding then loses what was gained); warmup: fraction of the iterations without it;
    ste: instead, the rounded codes forward and the soft codes' gradient backward (straight-through;
    measured worse on the test model with these learning rates, kept as an option).
    """

    iterations: int = 500
    batch_size: int = 32
    unit: str = "block"
    qdrop: float = 0.5
    lr_codes: float = 2e-2
    lr_scales: float = 1e-3
    reg: float = 1.0
    warmup: float = 0.2
    ste: bool = False

    def __post_init__(self):
        for name in ("iterations", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ReconSettings.{name} must be an int >= 1, got {v!r}")
        if self.unit not in ("block", "layer"):
            raise ValueError(f"ReconSettings.unit must be 'block' or 'layer', got {self.unit!r}")
        if not 0.0 <= float(self.qdrop) <= 1.0:
            raise ValueError(f"ReconSettings.qdrop must be in [0, 1], got {self.qdrop!r}")
        if not 0.0 <= float(self.warmup) < 1.0:
            raise ValueError(f"ReconSettings.warmup must be in [0, 1), got {self.warmup!r}")
        for name in ("lr_codes", "lr_scales", "reg"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"ReconSettings.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Unit:
    """A reconstruction unit: top-level submodule `name` and the ternary layer paths inside it
    (full paths, e.g. "stage1_block0/conv1"; for a single top-level layer, just its name)."""

    name: str
    layers: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Structure: units, their modules and their inputs/outputs


def find_units(module: nn.Module, variables: Mapping[str, Any], input_shape, ternary_layers) -> list[Unit]:
    """The units of a model in call order: every top-level submodule holding a ternary layer.

    ternary_layers: paths of the layers whose kernels are TernaryTensors.
    """
    ternary_layers = set(ternary_layers)
    units: dict[str, list[str]] = {}
    for path in linear_layer_paths(module, variables, input_shape):
        if path in ternary_layers:
            units.setdefault(path.split("/")[0], []).append(path)
    missing = ternary_layers - {p for ps in units.values() for p in ps}
    if missing:
        raise ValueError(f"find_units: ternary layers {sorted(missing)} are never called by the model")
    return [Unit(name, tuple(ps)) for name, ps in units.items()]


def _unit_call(module: nn.Module, variables, input_shape, name: str):
    """(unbound copy of top-level submodule `name`, its extra call args, its kwargs), from an
    abstract pass. ValueError when it is not called exactly once with an array input."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and tuple(mod.path) == (name,):
            calls.append((mod.clone(parent=None), args[1:], dict(kwargs)))
        return next_fun(*args, **kwargs)

    def run(v):
        with nn.intercept_methods(interceptor):
            return module.apply(v, jnp.zeros((1, *input_shape), jnp.float32), train=False)

    jax.eval_shape(run, variables)
    if len(calls) != 1:
        raise ValueError(f"reconstruct: top-level submodule {name!r} is called {len(calls)} times; "
                         "a unit must be called exactly once")
    for a in (*calls[0][1], *calls[0][2].values()):
        if isinstance(a, jax.Array):
            raise ValueError(f"reconstruct: unit {name!r} takes more than one array argument")
    return calls[0]


def _sub_act_cfg(act_cfg: ActConfig, unit: str) -> ActConfig:
    """The act_cfg entries inside `unit`, with paths relative to it (the unit's own input: "")."""
    out = []
    for path, bits, signed in act_cfg.layers:
        if path == unit:
            out.append(("", bits, signed))
        elif path.startswith(unit + "/"):
            out.append((path[len(unit) + 1:], bits, signed))
    return ActConfig(tuple(out))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _unit_io(module, act_cfg, name, variables, act_steps, x):
    """(input, output) of top-level submodule `name` in one (quantized if act_cfg) forward."""
    io = {}

    def observer(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and tuple(context.module.path) == (name,):
            io["x"], io["y"] = args[0], y
        return y

    intercepting(lambda: module.apply(variables, x, train=False), act_cfg, act_steps, observer=observer)
    return io["x"], io["y"]


def _capture(module, act_cfg, name, variables, act_steps, images, family, batch_size=256):
    xs, ys = [], []
    for x in normalized_batches(images, family, batch_size):
        a, b = _unit_io(module, act_cfg, name, variables, act_steps, x)
        xs.append(a)
        ys.append(b)
    return jnp.concatenate(xs), jnp.concatenate(ys)


# --------------------------------------------------------------------------------------------------
# The relaxation


def _h(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _grid(method: str) -> tuple[float, float]:
    """(lowest code b_min, span) of a method's code set: binary {-1, +1}, ternary {-1, 0, +1}."""
    return (-1.0, 2.0) if method == "binary" else (-1.0, 1.0)


def _scale_arrays(tt: TernaryTensor, pos: jax.Array, neg: jax.Array | None):
    """Per-element (+1 scale, -1 scale), broadcastable to the kernel."""
    p = broadcast_scales(pos, tt.shape, tt.group_size, tt.grouping)
    n = p if neg is None else broadcast_scales(neg, tt.shape, tt.group_size, tt.grouping)
    return p, n


def init_relaxation(tt: TernaryTensor, kernel_fp: jax.Array) -> dict[str, jax.Array]:
    """Learnable state of one layer: {"v": f32 kernel shape, "base": f32 kernel shape (constant),
    "log_pos": f32 [G, cout], "log_neg": like log_pos (two scales only)}.

    h(v) starts at (r - base) / span, r = w / s (clipped to the code range), moved just across 1/2
    where that would round to other codes than ``tt.codes``: rounding the start gives back ``tt``.
    """
    lo, span = _grid(tt.method)
    w = jnp.asarray(kernel_fp, jnp.float32)
    pos = jnp.maximum(tt.scales.astype(jnp.float32), 1e-12)
    neg = None if tt.neg_scales is None else jnp.maximum(tt.neg_scales.astype(jnp.float32), 1e-12)
    sp, sn = _scale_arrays(tt, pos, neg)
    r = jnp.where(w >= 0, w / sp, w / sn)
    if span == 1.0:
        base = jnp.clip(jnp.floor(r), -1.0, 0.0)
    else:
        base = jnp.full_like(r, lo)
    frac = jnp.clip((r - base) / span, 0.0, 1.0)
    # Where nearest rounding disagrees with the given codes (the exact FGQ threshold is not exactly
    # s/2; other methods differ more), start just on the codes' side of 1/2: the hard-rounded start
    # is then exactly the input ternarization.
    h0 = (tt.codes.astype(jnp.float32) - base) / span
    if not bool(jnp.all((h0 == 0) | (h0 == 1))):
        raise ValueError(f"reconstruct: codes of a {tt.method} kernel disagree with its weights' signs")
    frac = jnp.where((frac >= 0.5) == (h0 == 1), frac, 0.5 + 0.02 * (h0 - 0.5))
    sig = (frac - GAMMA) / (ZETA - GAMMA)
    state = {"v": jnp.log(sig) - jnp.log1p(-sig), "base": base, "log_pos": jnp.log(pos)}
    if neg is not None:
        state["log_neg"] = jnp.log(neg)
    return state


def _soft_kernel(tt: TernaryTensor, state, hard: bool = False, ste: bool = False) -> jax.Array:
    """The relaxed kernel s * c (c soft, or rounded when `hard`), float32 of the kernel shape.
    ste: the rounded codes forward, the soft codes' gradient backward (straight-through)."""
    _, span = _grid(tt.method)
    h = _h(state["v"])
    if hard:
        h = (state["v"] >= 0).astype(jnp.float32)
    elif ste:
        h = h + jax.lax.stop_gradient((state["v"] >= 0).astype(jnp.float32) - h)
    c = state["base"] + span * h
    sp, sn = _scale_arrays(tt, jnp.exp(state["log_pos"]), jnp.exp(state["log_neg"]) if "log_neg" in state else None)
    return jnp.where(c >= 0, c * sp, c * sn)


def _round_regulariser(state, beta) -> jax.Array:
    h = _h(state["v"])
    return jnp.mean(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)


def harden(tt: TernaryTensor, state) -> TernaryTensor:
    """The exactly ternary result: codes = base + span * [v >= 0] (int8), the learned scales."""
    _, span = _grid(tt.method)
    codes = (state["base"] + span * (state["v"] >= 0)).astype(jnp.int8)
    pos = jnp.exp(state["log_pos"]).astype(tt.scales.dtype)
    neg = None if tt.neg_scales is None else jnp.exp(state["log_neg"]).astype(tt.neg_scales.dtype)
    return dataclasses.replace(tt, codes=codes, scales=pos, neg_scales=neg)


# --------------------------------------------------------------------------------------------------
# One unit


def _rel(layer: str, unit: str) -> str:
    return "" if layer == unit else layer[len(unit) + 1:]


def _unit_apply(sub_module, sub_act, args, kwargs, unit_vars, tts, states, x, act_steps, hard=False,
                ste=False):
    """The unit's output with its ternary kernels replaced by the relaxed (or hard) ones.

    unit_vars: the unit's variables; tts / states: {relative layer path: TernaryTensor / state}.
    """
    params = unit_vars["params"]
    for rel, tt in tts.items():
        kernel = _soft_kernel(tt, states[rel], hard, ste)
        if rel == "":
            params = {**params, "kernel": kernel}
        else:
            params = set_at(params, rel + "/kernel", kernel)
    v = {**unit_vars, "params": params}
    return intercepting(lambda: sub_module.apply(v, x, *args, **kwargs), sub_act, act_steps)


def _rec_loss(y, target):
    return jnp.mean(jnp.square(y - target)) / jnp.maximum(jnp.mean(jnp.square(target)), 1e-12)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _optimise(sub_module, sub_act, call, settings: ReconSettings, tts_meta, unit_vars, tt_leaves,
              states, act_steps, x_fp, x_q, y_fp, key):
    """The whole optimisation of one unit: `settings.iterations` Adam steps in a fori_loop.

    x_fp / x_q: [n, ...] unit inputs in the FP / quantized network; y_fp: [n, ...] FP unit outputs.
    Returns (states, per-iteration reconstruction loss f32 [iterations]).
    """
    args, kwargs = call[0], dict(call[1])
    tts = dict(zip(tts_meta, tt_leaves))
    n = x_q.shape[0]
    lrs = {"v": settings.lr_codes, "base": 0.0, "log_pos": settings.lr_scales, "log_neg": settings.lr_scales}
    labels = {rel: {k: k for k in st} for rel, st in states.items()}
    opt = optax.multi_transform(
        {k: optax.adam(lr) if lr > 0 else optax.set_to_zero() for k, lr in lrs.items()}, labels
    )
    opt_state = opt.init(states)
    warm = int(settings.warmup * settings.iterations)

    def loss_fn(st, xb, yb, beta, lam):
        y = _unit_apply(sub_module, sub_act, args, kwargs, unit_vars, tts, st, xb, act_steps, ste=settings.ste)
        rec = _rec_loss(y, yb)
        reg = sum(_round_regulariser(s, beta) for s in st.values()) / len(st)
        return rec + lam * reg, rec

    def step(i, carry):
        st, os, losses = carry
        k = jax.random.fold_in(key, i)
        k_idx, k_drop = jax.random.split(k)
        idx = jax.random.randint(k_idx, (settings.batch_size,), 0, n)
        xq, yb = x_q[idx], y_fp[idx]
        if settings.qdrop > 0:
            keep_fp = jax.random.bernoulli(k_drop, settings.qdrop, xq.shape)
            xq = jnp.where(keep_fp, x_fp[idx], xq)
        t = jnp.clip((i - warm) / max(settings.iterations - warm, 1), 0.0, 1.0)
        beta = BETA_START + (BETA_END - BETA_START) * t
        lam = jnp.where(i < warm, 0.0, settings.reg)
        (_, rec), g = jax.value_and_grad(loss_fn, has_aux=True)(st, xq, yb, beta, lam)
        upd, os = opt.update(g, os, st)
        return optax.apply_updates(st, upd), os, losses.at[i].set(rec)

    losses = jnp.zeros((settings.iterations,), jnp.float32)
    states, _, losses = jax.lax.fori_loop(0, settings.iterations, step, (states, opt_state, losses))
    return states, losses


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _hard_loss(sub_module, sub_act, call, tts_meta, unit_vars, tt_leaves, states, act_steps, x_q, y_fp):
    args, kwargs = call[0], dict(call[1])
    tts = dict(zip(tts_meta, tt_leaves))
    y = _unit_apply(sub_module, sub_act, args, kwargs, unit_vars, tts, states, x_q, act_steps, hard=True)
    return _rec_loss(y, y_fp)


# --------------------------------------------------------------------------------------------------
# The repair


def reconstruct(
    module: nn.Module,
    ternary_params: Mapping[str, Any],
    variables_fp: Mapping[str, Any],
    images: np.ndarray,
    family: str,
    act_cfg: ActConfig | None = None,
    act_steps: Mapping[str, jax.Array] | None = None,
    settings: ReconSettings = ReconSettings(),
    seed: int = 0,
    variables_q: Mapping[str, Any] | None = None,
    log: list | None = None,
    dequantize: Callable = dequantize_tree,
) -> dict:
    """Reconstruct every unit in call order; returns new ternary params (exactly ternary codes).

    ternary_params: params tree whose quantized kernels are TernaryTensor leaves (other leaves, e.g.
      int8 first/last layers, are kept). variables_fp: the FP network's variables (the targets).
    images: uint8 [n, H, W, C] unlabeled images. act_cfg / act_steps: the activation quantization the
      quantized network runs with (None: FP activations).
    variables_q: the quantized network's variables apart from its params (its batch_stats); default
      variables_fp's. log: if a list, one dict per unit is appended: unit, layers, loss_before and
      loss_after (relative squared error with hard codes on the first <= 256 images, quantized
      inputs, no QDrop), kept (False: the result was worse than the input ternarization on those
      images and the input codes and scales were kept instead), seconds, and the per-iteration
      soft loss curve.
    Unit k sees the quantized network's inputs with units < k already reconstructed.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"reconstruct: images must be [n, H, W, C] with n >= 1, got {images.shape}")
    act_cfg = act_cfg or ActConfig()
    act_steps = dict(act_steps or {})
    base_vars = dict(variables_q if variables_q is not None else variables_fp)
    flat = jax.tree_util.tree_flatten_with_path(ternary_params, is_leaf=is_ternary)[0]
    ternary_layers = {path_to_str(p[:-1]): leaf for p, leaf in flat if is_ternary(leaf)}
    if not ternary_layers:
        raise ValueError("reconstruct: the params hold no TernaryTensor kernels")
    input_shape = images.shape[1:]
    if settings.unit == "layer":
        return _reconstruct_layers(module, ternary_params, variables_fp, images, family, act_cfg,
                                   act_steps, settings, base_vars, ternary_layers, log, dequantize)
    units = find_units(module, variables_fp, input_shape, ternary_layers)
    params = dict(ternary_params)
    key = jax.random.key(seed)
    for k, unit in enumerate(units):
        t0 = time.perf_counter()
        v_q = {**base_vars, "params": dequantize(params)}
        x_fp, y_fp = _capture(module, ActConfig(), unit.name, variables_fp, {}, images, family)
        x_q, _ = _capture(module, act_cfg, unit.name, v_q, act_steps, images, family)
        sub_module, args, kwargs = _unit_call(module, variables_fp, input_shape, unit.name)
        call = (tuple(args), tuple(sorted(kwargs.items())))
        sub_act = _sub_act_cfg(act_cfg, unit.name)
        sub_steps = {_rel(p, unit.name): s for p, s in act_steps.items()
                     if p == unit.name or p.startswith(unit.name + "/")}
        unit_vars = {c: get_at(v_q[c], unit.name) for c in v_q if unit.name in v_q[c]}
        rels = tuple(_rel(p, unit.name) for p in unit.layers)
        tts = [get_at(params, p)["kernel"] for p in unit.layers]
        states = {
            rel: init_relaxation(tt, get_at(variables_fp["params"], p)["kernel"])
            for rel, tt, p in zip(rels, tts, unit.layers)
        }
        n_eval = min(256, images.shape[0])
        before = _hard_loss(sub_module, sub_act, call, rels, unit_vars, tts, states, sub_steps,
                            x_q[:n_eval], y_fp[:n_eval])
        states, curve = _optimise(sub_module, sub_act, call, settings, rels, unit_vars, tts, states,
                                  sub_steps, x_fp, x_q, y_fp, jax.random.fold_in(key, k))
        after = _hard_loss(sub_module, sub_act, call, rels, unit_vars, tts, states, sub_steps,
                           x_q[:n_eval], y_fp[:n_eval])
        kept = bool(after <= before)  # never worse than the input ternarization on the sample
        for rel, tt, p in zip(rels, tts, unit.layers):
            layer = dict(get_at(params, p))
            layer["kernel"] = harden(tt, states[rel]) if kept else tt
            params = set_at(params, p, layer)
        if log is not None:
            log.append({"unit": unit.name, "layers": list(unit.layers), "loss_before": float(before),
                        "loss_after": float(after), "kept": kept, "seconds": time.perf_counter() - t0,
                        "curve": np.asarray(curve)})
    return params


# --------------------------------------------------------------------------------------------------
# Layer-wise variant: the exact quadratic form of a layer's output error


def _quad_loss(w2d, c_qq, b, norm):
    """|| P_q W - P_fp W_fp ||^2 / norm up to a constant: tr(W^T C_qq W) - 2 tr(W^T B), B = C_qf W_fp."""
    hi = jax.lax.Precision.HIGHEST
    return (jnp.sum(w2d * jnp.matmul(c_qq, w2d, precision=hi)) - 2.0 * jnp.sum(w2d * b)) / norm


@functools.partial(jax.jit, static_argnums=(0,))
def _optimise_layer(settings: ReconSettings, tt, state, c_qq, c_qf, kernel_fp):
    """Full-batch Adam on one layer's quadratic output error. c_qq, c_qf: f32 [L, L].
    Returns (state, loss curve f32 [iterations], hard loss before, hard loss after) (losses relative
    to ||P_q W_fp||^2, constant dropped: compare them with each other only)."""
    L = c_qq.shape[0]
    w_fp = kernel_fp.reshape(L, -1).astype(jnp.float32)
    b = jnp.matmul(c_qf, w_fp, precision=jax.lax.Precision.HIGHEST)
    norm = jnp.maximum(jnp.sum(w_fp * jnp.matmul(c_qq, w_fp)), 1e-12)
    lrs = {"v": settings.lr_codes, "base": 0.0, "log_pos": settings.lr_scales, "log_neg": settings.lr_scales}
    opt = optax.multi_transform(
        {k: optax.adam(lr) if lr > 0 else optax.set_to_zero() for k, lr in lrs.items()},
        {k: k for k in state},
    )
    warm = int(settings.warmup * settings.iterations)

    def loss_fn(st, beta, lam, hard=False):
        rec = _quad_loss(_soft_kernel(tt, st, hard, settings.ste).reshape(L, -1), c_qq, b, norm)
        return rec + lam * _round_regulariser(st, beta), rec

    def step(i, carry):
        st, os, losses = carry
        t = jnp.clip((i - warm) / max(settings.iterations - warm, 1), 0.0, 1.0)
        beta = BETA_START + (BETA_END - BETA_START) * t
        lam = jnp.where(i < warm, 0.0, settings.reg)
        (_, rec), g = jax.value_and_grad(loss_fn, has_aux=True)(st, beta, lam)
        upd, os = opt.update(g, os, st)
        return optax.apply_updates(st, upd), os, losses.at[i].set(rec)

    before = loss_fn(state, 2.0, 0.0, hard=True)[1]
    losses = jnp.zeros((settings.iterations,), jnp.float32)
    state, _, losses = jax.lax.fori_loop(0, settings.iterations, step, (state, opt.init(state), losses))
    return state, losses, before, loss_fn(state, 2.0, 0.0, hard=True)[1]


def _reconstruct_layers(module, ternary_params, variables_fp, images, family, act_cfg, act_steps,
                        settings, base_vars, ternary_layers, log, dequantize):
    """`reconstruct` with settings.unit == "layer": each ternary layer in call order, its input
    moments measured with the layers before it already reconstructed (as `repairs.fit_scales`)."""
    order = [p for p in linear_layer_paths(module, variables_fp, images.shape[1:]) if p in ternary_layers]
    params = dict(ternary_params)
    xs = list(normalized_batches(images, family, 250))
    for path in order:
        t0 = time.perf_counter()
        v_q = {**base_vars, "params": dequantize(params)}
        c_qq, c_qf = layer_moments(module, act_cfg, path, v_q, variables_fp, act_steps, xs)
        layer = dict(get_at(params, path))
        tt = layer["kernel"]
        kernel_fp = get_at(variables_fp["params"], path)["kernel"]
        state = init_relaxation(tt, kernel_fp)
        state, curve, before, after = _optimise_layer(settings, tt, state, c_qq, c_qf, kernel_fp)
        kept = bool(after <= before)
        layer["kernel"] = harden(tt, state) if kept else tt
        params = set_at(params, path, layer)
        if log is not None:
            log.append({"unit": path, "layers": [path], "loss_before": float(before),
                        "loss_after": float(after), "kept": kept, "seconds": time.perf_counter() - t0,
                        "curve": np.asarray(curve)})
    return params
