"""Side by side with qwix: fgq-jax's FGQ against qwix (Google's JAX quantization library) PTQ.

Same model (ResNet-20, the shared akamaster checkpoint), same CIFAR-10-JPEG test split, same
Evaluator (jit-compiled forward + top-1/top-5), same process and run:

* FP reference: FP32 weights and activations; FP32 weights with fgq-jax's 8-bit activations.
* fgq-jax: exact FGQ ternary weights at N in {4, 16, 64} with 8-bit activations (static per-tensor
  steps, MSE-calibrated on 256 unlabeled training images), without repairs and with all repairs
  (bn_reestimate + bias_correct + scale_fit); also without activation quantization (weight-only),
  the like-for-like partner of qwix's weight-only rows.
* qwix 0.1.8 (`qwix.quantize_model(linen_module, provider)` + `qwix.quantize_params`):
    - PTQ (`qwix.PtqProvider`) int8 weights x int8 activations, dynamic (qwix's XLA default: one
      absmax scale per image, computed at run time) and static (SRQ: `qwix.QtProvider` with
      `act_static_scale=True` collects `quant_stats` on the same 256 calibration images, then
      `qwix.quantize_params(params, abstract_ptq_params, quant_stats)` freezes one scale per layer);
    - int4 / int2 weights with int8 activations through PtqProvider and through QtProvider (qwix's
      only other conv path); int4 x int4 and int2 x int2 PTQ (the same-type pairing qwix's conv PTQ
      requires); a sub-channel (tile_size) int4 attempt. On this CPU these fail, and the table
      records why (see the notes written with the table);
    - int4 / int2 weight-only (QtProvider, activations FP32): what qwix's finest conv weight
      quantizer (per output channel, absmax) does to accuracy when it runs.
  First conv (`conv_init`) and last dense (`fc`) stay FP32 in every row, as in fgq-jax's default
  policy (qwix: a leading rule with no qtype for those module paths).

Accuracy over the whole test split; bits per weight over the quantized layers (codes + scales as
each library stores them: fgq-jax fp16 group scales, qwix fp32 per-channel scales) and over every
conv/dense kernel; eval throughput in images/s on the first `throughput_images` test images at the
accuracy pass's batch size, compile excluded (the accuracy pass compiles), median over `repeats`
rounds that interleave all rows (so load changes on a shared machine hit every row alike).

    .venv/bin/python -m benchmarks.compare_qwix                 # full run (~20 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.compare_qwix --test-subset 500 --repeats 1 --out-dir /tmp/q

Writes <out-dir>/qwix_comparison.csv and .md (default results/cifar10_jpeg/resnet20/), each
atomically, once, at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax import fileio, results
from fgq_jax.activations import ActConfig
from fgq_jax.data import load_arrays, normalize
from fgq_jax.evaluate import Evaluator
from fgq_jax.loading import load_model, sample_images
from fgq_jax.ptq import quantize_model
from fgq_jax.recipe import QuantRecipe
from fgq_jax.sweep import accounting_columns

DEFAULT_CHECKPOINT = "{shared}/models/cifar-resnet/resnet20-12fca82f.th"

# qwix modes: name -> (provider, weight qtype, act qtype, static act scale, tile_size)
QWIX_MODES: dict[str, tuple[str, Any, Any, bool, Any]] = {
    "w8a8-dynamic": ("ptq", "int8", "int8", False, None),
    "w8a8-static": ("ptq", "int8", "int8", True, None),
    "w4a8-dynamic": ("ptq", "int4", "int8", False, None),
    "w2a8-dynamic": ("ptq", "int2", "int8", False, None),
    "w4a8-qt": ("qt", "int4", "int8", False, None),
    "w2a8-qt": ("qt", "int2", "int8", False, None),
    "w4a4-dynamic": ("ptq", "int4", "int4", False, None),
    "w2a2-dynamic": ("ptq", "int2", "int2", False, None),
    "w4-tile16-weight-only": ("qt", "int4", None, False, 16),
    "w4-weight-only": ("qt", "int4", None, False, None),
    "w2-weight-only": ("qt", "int2", None, False, None),
}
QTYPE_BITS = {"int8": 8, "int4": 4, "int2": 2}
FP_ROWS = ("fp32", "fp32-a8", "fp32-bn")
FGQ_ROWS = ("a8", "a8+repairs", "weight-only")

COLUMNS = (
    "row", "library", "config", "api", "weights", "granularity", "activations", "repairs",
    "status", "top1", "top5", "top1_drop", "bits_per_weight", "model_bits_per_weight",
    "scale_dtype", "eval_images_per_s", "throughput_vs_fp32", "throughput_min", "throughput_max",
    "first_pass_s", "quant_seconds", "num_test", "num_throughput", "repeats", "num_calib",
    "num_repair", "note",
)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    model: str = "resnet20"
    checkpoint: str = DEFAULT_CHECKPOINT
    dataset: str = "cifar10_jpeg"
    group_sizes: tuple = (4, 16, 64)
    # "fp32": FP reference; "fp32-a8": FP weights with fgq-jax's 8-bit activations; "fp32-bn": FP
    # model with BN statistics re-estimated on the repair images (control: how much of the repairs'
    # gain is adaptation to the JPEG-shifted data rather than repair of quantization error)
    fp_rows: tuple = FP_ROWS
    # per N: "a8" (8-bit activations, no repairs), "a8+repairs" (all three repairs), "weight-only"
    # (FP activations: the like-for-like partner of qwix's weight-only rows)
    fgq_rows: tuple = ("a8", "a8+repairs", "weight-only")
    qwix_modes: tuple = tuple(QWIX_MODES)
    recipe: QuantRecipe = QuantRecipe()  # what every FGQ row shares (image budgets, calibration, seed)
    test_subset: int | None = None  # smoke runs: n evenly spaced test images (all classes)
    batch_size: int = 500
    throughput_images: int = 2000
    repeats: int = 5

    def __post_init__(self):
        if set(self.fp_rows) - set(FP_ROWS) or set(self.fgq_rows) - set(FGQ_ROWS):
            raise ValueError(f"fp_rows must be from {FP_ROWS}, fgq_rows from {FGQ_ROWS}")
        if "fp32" not in self.fp_rows:
            raise ValueError("the fp32 row is the reference of top1_drop and throughput_vs_fp32")
        bad = set(self.qwix_modes) - set(QWIX_MODES)
        if bad:
            raise ValueError(f"unknown qwix mode(s) {sorted(bad)}; known: {list(QWIX_MODES)}")


@dataclasses.dataclass
class Entry:
    """One table row: how to build it, and (after the run) its numbers."""

    row: dict[str, Any]
    build: Callable[[], tuple[Evaluator, dict, dict]]  # -> (evaluator, variables, act_steps)
    ev: Evaluator | None = None
    variables: Any = None
    steps: Any = None
    speeds: list = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# qwix


def _qtype(name):
    """qwix qtype: jnp dtypes for int8/int4, qwix's synthetic string for int2 (stored in int4)."""
    return {"int8": jnp.int8, "int4": jnp.int4}.get(name, name)


def qwix_rules(rule_cls, spec, weight, act, static, tile_size=None):
    """First conv and last dense FP (a leading rule without qtypes), every other layer quantized."""
    keep_fp = f"{re.escape(spec.first_layer)}|{re.escape(spec.last_layer)}"
    kw = dict(weight_qtype=_qtype(weight), act_qtype=_qtype(act) if act else None)
    if act:
        kw["act_static_scale"] = static
    if tile_size:
        kw["tile_size"] = tile_size
    return [rule_cls(module_path=keep_fp), rule_cls(module_path=".*", **kw)]


def qwix_calibrate_static(spec, variables_fp, rules, calib_images, batch_size=128):
    """SRQ calibration: run qwix's QtProvider model with `quant_stats` mutable over the calibration
    images and return the accumulated `quant_stats` (qwix averages per-image absmax over batches).

    Runs eagerly: under jax.jit, qwix 0.1.8's conv quant-stat update happens inside conv_general_qt's
    custom_vjp trace and leaks a tracer (UnexpectedTracerError); 256 images eagerly take seconds.
    """
    import qwix

    qt_model = qwix.quantize_model(spec.module, qwix.QtProvider(rules))
    v = dict(variables_fp)
    x = normalize(jnp.asarray(calib_images), spec.dataset_family)
    for i in range(0, x.shape[0], batch_size):
        _, updates = qt_model.apply(v, x[i : i + batch_size], train=False, mutable=["quant_stats"])
        v = {**v, **updates}
    return v["quant_stats"]


def build_qwix(spec, variables_fp, mode, calib_images):
    """(quantized Linen module, variables) for one qwix mode; raises what qwix raises."""
    import qwix

    provider, weight, act, static, tile = QWIX_MODES[mode]
    if provider == "qt":  # QtProvider keeps FP weights and quantizes them inside the forward
        rules = qwix_rules(qwix.QtRule, spec, weight, act, static, tile)
        return qwix.quantize_model(spec.module, qwix.QtProvider(rules)), dict(variables_fp)
    rules = qwix_rules(qwix.QuantizationRule, spec, weight, act, static, tile)
    ptq_model = qwix.quantize_model(spec.module, qwix.PtqProvider(rules))
    x0 = jnp.zeros((1, *spec.input_shape), jnp.float32)
    abstract = jax.eval_shape(lambda: ptq_model.init(jax.random.key(0), x0, train=False))
    quant_stats = {}
    if static:
        quant_stats = qwix_calibrate_static(spec, variables_fp, rules, calib_images)
    params = qwix.quantize_params(variables_fp["params"], abstract["params"], quant_stats)
    return ptq_model, {**variables_fp, "params": params}


def qwix_quantized_kernels(params) -> dict[str, Any]:
    """{layer path: QArray} of the quantized kernels in a qwix PTQ params tree."""
    from qwix._src.providers.ptq import WithAux

    out = {}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, WithAux))[0]
    for path, leaf in flat:
        keys = [getattr(k, "key", str(k)) for k in path]
        if isinstance(leaf, WithAux) and keys[-1] == "kernel":
            out["/".join(keys[:-1])] = leaf.array
    return out


def qwix_bits(layers, spec, weight_bits, scale_bits=32) -> dict[str, float]:
    """Bits per weight of qwix's per-output-channel layout: codes + one fp32 scale per out channel."""
    fp = (spec.first_layer, spec.last_layer)
    q = [ly for ly in layers if ly.path not in fp]
    q_bits = sum(ly.num_weights * weight_bits + ly.cout * scale_bits for ly in q)
    q_n = sum(ly.num_weights for ly in q)
    all_bits = q_bits + sum(32 * ly.num_weights for ly in layers if ly.path in fp)
    return {
        "bits_per_weight": q_bits / q_n,
        "model_bits_per_weight": all_bits / sum(ly.num_weights for ly in layers),
    }


QWIX_ACT = {
    (None, False): "fp32",
    ("int8", False): "int8 dynamic: per-image absmax scale at run time (symmetric)",
    ("int8", True): "int8 static: per-tensor absmax scale from calib images (symmetric, SRQ)",
    ("int4", False): "int4 dynamic per-image absmax (symmetric)",
    ("int2", False): "int2 dynamic per-image absmax (symmetric)",
}


def qwix_entries(cfg, spec, variables_fp, layers, calib) -> list[Entry]:
    entries = []
    for mode in cfg.qwix_modes:
        provider, weight, act, static, tile = QWIX_MODES[mode]
        api = ("qwix.PtqProvider + quantize_params" if provider == "ptq" else
               "qwix.QtProvider (fake-quant forward, no training)")
        if static:
            api += " (stats: QtProvider quant_stats)"
        gran = "per output channel, absmax"
        if tile:
            gran = f"sub-channel tile_size={tile} (requested)"
        note = {
            "int2": "qwix int2 = levels {-2..1} at absmax/1.5 (practically ternary), stored in int4",
        }.get(weight, "")
        if provider == "qt":
            note = "; ".join(x for x in (note, "FP weights quantized inside each forward") if x)
        row = {
            "library": "qwix", "config": f"qwix {mode}", "api": api,
            "weights": weight, "granularity": gran, "activations": QWIX_ACT[(act, static)],
            "repairs": "none", "scale_dtype": "float32",
            **qwix_bits(layers, spec, QTYPE_BITS[weight]), "note": note,
            "num_calib": cfg.recipe.activations.num_calib if static else 0, "num_repair": 0,
        }

        def build(mode=mode):
            qmodel, v = build_qwix(spec, variables_fp, mode, calib)
            if QWIX_MODES[mode][0] == "ptq":  # check the stored layout the bits column assumes
                kernels = qwix_quantized_kernels(v["params"])
                if len(kernels) != len(layers) - 2:
                    raise AssertionError(f"qwix quantized {len(kernels)} kernels, expected {len(layers) - 2}")
                for path, qa in kernels.items():
                    if qa.scale.shape != (1,) * (qa.qvalue.ndim - 1) + (qa.qvalue.shape[-1],):
                        raise AssertionError(f"{path}: qwix scale shape {qa.scale.shape} is not per-channel")
            return Evaluator(qmodel, spec.dataset_family), v, {}

        entries.append(Entry(row, build))
    return entries


# --------------------------------------------------------------------------------------------------
# fgq-jax


def act_description(act_cfg: ActConfig, calibration) -> str:
    if not act_cfg.layers:
        return "fp32"
    bits = {b for _, b, _ in act_cfg.layers}
    signed = sum(s for _, _, s in act_cfg.layers)
    kinds = [f"{len(act_cfg.layers) - signed} unsigned", f"{signed} signed"] if signed else ["unsigned"]
    return (f"{'/'.join(map(str, sorted(bits)))}-bit static: per-tensor step, {calibration.method}-"
            f"calibrated from calib images ({', '.join(kinds)})")


def fgq_entries(cfg, spec, variables_fp, calib, repair, evaluators) -> list[Entry]:
    points = []
    fp = cfg.recipe.replace(method="fp", act_bits=None)
    if "fp32" in cfg.fp_rows:
        points.append(("fp32", fp))
    if "fp32-a8" in cfg.fp_rows:
        points.append(("fp32 weights, 8-bit act", fp.replace(act_bits=8)))
    if "fp32-bn" in cfg.fp_rows:
        points.append(("fp32 +bn_reestimate (control)", fp.replace(bn_reestimate=True)))
    kinds = {
        "a8": ("", dict(act_bits=8)),
        # the three repairs of the committed comparison, named: repairs added later stay out
        "a8+repairs": (" +repairs", dict(act_bits=8, bn_reestimate=True, bias_correct=True, scale_fit=True)),
        "weight-only": (" weight-only", dict(act_bits=None)),
    }
    for kind in FGQ_ROWS:
        if kind in cfg.fgq_rows:
            suffix, kw = kinds[kind]
            for n in cfg.group_sizes:
                points.append((f"FGQ N={n}{suffix}",
                               cfg.recipe.replace(method="exact", group_size=n, **kw)))
    entries = []
    for name, recipe in points:
        fp = not recipe.weights.quantized
        reps = recipe.repairs.names
        acc = accounting_columns(spec, variables_fp, recipe)
        row = {
            "library": "fp reference" if fp else "fgq-jax", "config": name,
            "api": "fgq_jax.ptq.quantize_model",
            "weights": "fp32" if fp else "ternary (exact FGQ)",
            "granularity": "-" if fp else f"groups of N={recipe.weights.group_size} along each output's reduction vector",
            "repairs": "+".join(reps) or "none",
            "scale_dtype": "-" if fp else "float16",
            "bits_per_weight": acc["bits_per_weight"],
            "model_bits_per_weight": acc["model_bits_per_weight"],
            "num_calib": recipe.activations.num_calib if recipe.activations.bits else 0,
            "num_repair": recipe.repairs.num_repair if reps else 0,
            "note": "",
        }

        def build(recipe=recipe, row=row):
            t0 = time.perf_counter()
            q = quantize_model(spec, variables_fp, recipe, calib, repair)
            row["quant_seconds"] = time.perf_counter() - t0
            row["activations"] = act_description(q.act_cfg, recipe.activations.calibration)
            ev = evaluators.get(q.act_cfg)
            if ev is None:
                ev = evaluators[q.act_cfg] = Evaluator(spec.module, spec.dataset_family, q.act_cfg)
            return ev, q.variables, q.act_steps

        entries.append(Entry(row, build))
    return entries


# --------------------------------------------------------------------------------------------------
# run


def _subset(n_total: int, n: int | None) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


def _failure(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    msg = msg.split(" JAX transformations require")[0]  # drop JAX's boilerplate after the cause
    return f"{type(e).__name__}: {msg[:300]}"


def run_comparison(cfg: CompareConfig, *, log=print) -> list[dict[str, Any]]:
    """Build, evaluate and time every row; returns the table rows (failures included)."""
    spec, variables_fp = load_model(cfg.model, cfg.checkpoint)
    test_x, test_y = load_arrays(cfg.dataset, "test")
    idx = _subset(test_x.shape[0], cfg.test_subset)
    test_x, test_y = test_x[idx], test_y[idx]
    calib, repair = sample_images(cfg.dataset, "train", cfg.recipe)
    from fgq_jax.accounting import layer_shapes

    layers = layer_shapes(spec.module, variables_fp, spec.input_shape, train=False)
    evaluators: dict = {}
    entries = (fgq_entries(cfg, spec, variables_fp, calib, repair, evaluators)
               + qwix_entries(cfg, spec, variables_fp, layers, calib))
    n_tp = min(cfg.throughput_images, test_x.shape[0])
    tp_x, tp_y = test_x[:n_tp], test_y[:n_tp]

    for i, e in enumerate(entries):
        r = e.row
        r.update(row=i + 1, num_test=int(test_x.shape[0]), num_throughput=n_tp, repeats=cfg.repeats)
        r.setdefault("activations", "")
        t0 = time.perf_counter()
        try:
            ev, v, steps = e.build()
            t1 = time.perf_counter()
            r.setdefault("quant_seconds", t1 - t0)
            res = ev(v, test_x, test_y, steps, batch_size=cfg.batch_size, progress=False)
            r.update(status="ok", top1=res.top1, top5=res.top5,
                     first_pass_s=time.perf_counter() - t1)
            e.ev, e.variables, e.steps = ev, v, steps
        except Exception as exc:  # a qwix mode that does not run here: record why, keep going
            r.update(status="failed", note="; ".join(x for x in (r["note"], _failure(exc)) if x))
            log(traceback.format_exc(limit=1).strip().splitlines()[-1][:300])
        log(f"[{i + 1}/{len(entries)}] {r['config']}: {r['status']} top1={r.get('top1', '-')} "
            f"({time.perf_counter() - t0:.1f}s)")

    ok = [e for e in entries if e.ev is not None]
    compiles = {id(e.ev): e.ev.compilations for e in ok}
    for rep in range(cfg.repeats):  # rounds over all rows: shared-CPU load drifts hit every row alike
        for e in ok:
            res = e.ev(e.variables, tp_x, tp_y, e.steps, batch_size=cfg.batch_size, progress=False)
            e.speeds.append(res.images_per_s)
        log(f"throughput round {rep + 1}/{cfg.repeats} done")
    recompiled = [e.row["config"] for e in ok if e.ev.compilations != compiles[id(e.ev)]]
    if recompiled:
        raise RuntimeError(f"throughput passes recompiled for {recompiled}: timings include compiles")

    fp = next((e for e in entries if e.row["config"] == "fp32" and e.ev is not None), None)
    for e in entries:
        r = e.row
        if e.speeds:
            r["eval_images_per_s"] = statistics.median(e.speeds)
            r["throughput_min"], r["throughput_max"] = min(e.speeds), max(e.speeds)
        if fp is not None and r.get("top1") is not None:
            r["top1_drop"] = fp.row["top1"] - r["top1"]
        if fp is not None and e.speeds:
            r["throughput_vs_fp32"] = r["eval_images_per_s"] / fp.row["eval_images_per_s"]
    return [e.row for e in entries]


# --------------------------------------------------------------------------------------------------
# output

NOTES = """\
Notes
- Same process, same ResNet-20 weights, same test images, same `fgq_jax.evaluate.Evaluator`
  (jit-compiled forward + top-k on uint8 batches normalised inside the step) for every row.
- qwix API used (0.1.8): `qwix.quantize_model(linen_module, provider)` with `qwix.PtqProvider(rules)`
  or `qwix.QtProvider(rules)`; rules `qwix.QuantizationRule` / `qwix.QtRule(module_path=regex,
  weight_qtype=, act_qtype=, act_static_scale=, tile_size=)`, first match wins, a leading rule
  `module_path="conv_init|fc"` without qtypes keeps those layers FP32; PTQ weights from
  `qwix.quantize_params(fp_params, jax.eval_shape(ptq_model.init ...)["params"], quant_stats)`.
- qwix conv granularity: weights get one absmax scale per output channel (`conv_general.get_how_to_quantize`:
  channelwise on the kernel's output-feature axis); conv has no sub-channel (tile_size) support:
  QtProvider raises, PtqProvider silently ignores tile_size for conv. Activations: dynamic = one scale
  per image computed at run time (XLA default), static = one scale per tensor from calibration stats.
  qwix activation quantization is symmetric by default (absmax), so post-ReLU inputs use 7 of the 8 bits;
  fgq-jax picks unsigned quantizers for non-negative inputs.
- qwix's PtqProvider requires act_qtype == weight_qtype for conv (int4 weights need int4 activations),
  and XLA's CPU backend cannot compile the resulting int4 x int4 (or int2-in-int4) convolution; the
  QtProvider path hands int8 activations and int4 weights to `lax.conv_general_dilated`, which requires
  equal dtypes. Weight-only int4/int2 (activations FP32) runs via QtProvider's dequantizing fallback;
  compare it with the FGQ weight-only rows.
- No qwix row has a data-driven repair: qwix.contrib's GPTQ / AWQ / QEP / SmoothQuant calibration
  providers intercept only `jax.lax.dot_general` / `jnp.einsum`, not convolutions, so they do not
  apply to ResNet-20's conv layers (its only dense layer, fc, is kept FP32). Row "fp32
  +bn_reestimate" is a control: BN statistics re-estimated on the same 2048 unlabeled (augmented)
  JPEG training images without any quantization, i.e. the repairs' share of plain adaptation to the
  data: compare repaired FGQ rows with it as well as with the published FP32 row.
- bits_per_weight: over the quantized layers (18 convs), codes + scales as stored (qwix: fp32
  per-channel scales; fgq-jax: 2-bit codes + fp16 group scales); model_bits_per_weight: over every
  conv/dense kernel incl. the FP32 first conv and fc. qwix int2 is stored in int4 containers (4 bits
  of memory per weight); the column counts the logical 2 bits. Failed rows show the bits their
  configuration would store.
- eval_images_per_s: median over the throughput rounds on the first num_throughput test images at the
  evaluation batch size; compile excluded (the accuracy pass compiles; no recompiles during timing);
  first_pass_s includes compilation. fgq-jax rows are fake-quant (float conv on dequantized weights
  + quantize/dequantize of activations); qwix w8a8 runs int8 x int8 -> int32 convolutions.
  The machine is shared (2 CPU cores): throughput is indicative, but all rows are measured in the
  same run, interleaved.
"""

MD_COLUMNS = (
    ("#", "row"), ("config", "config"), ("weights", "weights"), ("granularity", "granularity"),
    ("activations", "activations"), ("repairs", "repairs"), ("status", "status"),
    ("top-1 %", "top1"), ("top-5 %", "top5"), ("Δ top-1", "top1_drop"),
    ("bits/w (quant. layers)", "bits_per_weight"), ("bits/w (model)", "model_bits_per_weight"),
    ("img/s", "eval_images_per_s"), ("× FP32", "throughput_vs_fp32"), ("note", "note"),
)


def _md_cell(v, col) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if col in ("eval_images_per_s",):
            return f"{v:.0f}"
        if col in ("throughput_vs_fp32",):
            return f"{v:.2f}"
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def markdown(rows, command: str, meta: dict, cfg: CompareConfig) -> str:
    lines = [
        f"# {cfg.model} on {cfg.dataset}: fgq-jax FGQ vs qwix post-training quantization",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Test images: {rows[0]['num_test'] if rows else '-'} (test split); calibration: "
        f"{cfg.recipe.activations.num_calib} unlabeled training images; repairs: "
        f"{cfg.recipe.repairs.num_repair} (scale fit: {cfg.recipe.repairs.num_fit}); "
        f"throughput: median of {cfg.repeats} rounds over {min(cfg.throughput_images, rows[0]['num_test']) if rows else '-'} "
        f"images, batch {cfg.batch_size}. Machine: {meta['machine']['platform']}, "
        f"{meta['machine']['cpu_count']} CPUs, JAX backend {meta['machine']['jax_backend']}; "
        f"git {meta['git_revision']}; {meta['date']}.",
        "",
        "| " + " | ".join(h for h, _ in MD_COLUMNS) + " |",
        "|" + "|".join("---" for _ in MD_COLUMNS) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_md_cell(r.get(c), c) for _, c in MD_COLUMNS) + " |")
    lines += ["", NOTES, "Metadata (`fgq_jax.results.run_metadata`):", "", "```json",
              json.dumps(meta, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def default_out_dir(cfg: CompareConfig) -> Path:
    return fileio.REPO_ROOT / "results" / cfg.dataset / cfg.model


def write_outputs(rows, cfg: CompareConfig, out_dir, command: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    meta = results.run_metadata(seed=cfg.recipe.seed, experiment=dataclasses.asdict(cfg), command=command)
    csv_path, md_path = out_dir / "qwix_comparison.csv", out_dir / "qwix_comparison.md"
    fileio.write_csv(csv_path, rows, COLUMNS)
    fileio.atomic_write_text(md_path, markdown(rows, command, meta, cfg))
    return csv_path, md_path


def main(argv=None) -> int:
    from experiments import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_args(p, config_required=False)
    p.add_argument("--out-dir", default=None, help="default: results/<dataset>/<model>/")
    a = p.parse_args(argv)
    cfg, mesh = cli.setup("compare_qwix", a, CompareConfig)
    if mesh is not None:
        raise SystemExit("compare_qwix: --mesh is not supported (throughput is measured on one device)")
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.compare_qwix",
                          *(sys.argv[1:] if argv is None else argv)])
    rows = run_comparison(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    csv_path, md_path = write_outputs(rows, cfg, a.out_dir or default_out_dir(cfg), command)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
