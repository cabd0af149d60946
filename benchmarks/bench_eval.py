"""Benchmark: evaluation throughput (images/s) of the inference paths, side by side in one run.

For each model (ResNet-20 on 32x32 CIFAR inputs, ResNet-50 on 224x224 ImageNet-shaped inputs) at
batch 128, the same jitted eval step (uint8 images -> normalise -> forward -> top-1 class, what
``fgq_jax.evaluate.Evaluator`` runs per batch) through each path:

* ``fp32``: plain ``module.apply`` with the float weights;
* ``fake-nN``: fake-quant ternary weights (exact FGQ, groups of N, first conv and last dense in FP,
  the default policy), 8-bit activations at the inputs of the ternary layers via
  ``fgq_jax.intercept.quantized_apply``; weights are quantized once outside the step, as the
  Evaluator does, so N does not change the arithmetic (N=4 and N=64 should time alike);
* ``integer-nN``: ``fgq_jax.integer.integer_apply(mode="integer", impl="auto")`` — every ternary
  layer folded into int8 weights, 8-bit activation codes, the int32 accumulator computed per layer
  as ``fgq_jax.integer.resolve_impl``'s rule picks (int8 conv, with columns packed into channels
  for narrow layers, or int8 GEMM); the "impl" column counts the choices and the notes list them
  layer by layer;
* optional ``intgemm-nN`` / ``intconv-nN`` / ``intfconv-nN``: the integer path with one execution
  for every conv: ``impl="gemm"`` (int8 GEMM per kernel row; the default before the per-layer rule),
  ``"conv"`` (int8 ``lax.conv_general_dilated``) or ``"fconv"`` (exact float32 convs of the codes);
* ``literal-nN``: ``integer_apply(mode="literal")`` — the paper's literal per-group form (int32
  partial sums per group, one float multiply per group);

Weights are random (He-normal, ``benchmarks.common.random_variables``) and images random uint8: throughput does not depend on the
values. Activation steps come from one unquantized forward (``max|x| / qmax``; see
``benchmarks.common.quick_act_steps``). Compile time (``jit(...).lower().compile()``) is reported
apart from the steady state; each repeat evaluates ``--batches`` batches, the variants are timed
round-robin and the median over repeats is reported.

    python -m benchmarks.bench_eval                                   # both models
    python -m benchmarks.bench_eval --model resnet20 --repeats 5 --batches 4
    python -m benchmarks.bench_eval --model resnet50 --batches 1 --repeats 3
    python -m benchmarks.bench_eval --quick                           # smoke run (tiny)

Targets (issue 6, on the 2-core CPU): fake-quant >= 0.9x FP32 images/s; integer path >= 1.2x FP32.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

TARGETS = {"fake": 0.9, "integer": 1.2}
ALL_VARIANTS = ("fp32", "fake-n4", "fake-n64", "integer-n4", "integer-n64", "literal-n4",
                "literal-n64", "intgemm-n64", "intconv-n64", "intfconv-n64")
# integer-path kinds -> the impl given to integer_apply
INT_IMPLS = {"integer": "auto", "intgemm": "gemm", "intconv": "conv", "intfconv": "fconv"}
DEFAULT_VARIANTS = {
    "resnet20": ("fp32", "fake-n4", "fake-n64", "integer-n4", "integer-n64", "literal-n4", "literal-n64"),
    # literal-n4 on ResNet-50 at batch 128 needs int32 per-group partial sums of ~15 GB in the
    # 56x56 stage (M x G x cout = 401k x 144 x 64): left out by default (ask for it by name).
    "resnet50": ("fp32", "fake-n4", "fake-n64", "integer-n64", "literal-n64"),
}
DEFAULT_SIZES = {  # (batches per repeat, repeats)
    "resnet20": (4, 5),
    "resnet50": (1, 3),
}


def _parse_variant(v: str) -> tuple[str, int | None]:
    if v == "fp32":
        return "fp32", None
    kind, _, n = v.partition("-n")
    if kind not in ("fake", "literal", *INT_IMPLS) or not n.isdigit():
        raise ValueError(f"unknown variant {v!r}; known: {', '.join(ALL_VARIANTS)} (any N after -n)")
    return kind, int(n)


@jax.jit
def _dequantize_and_fold(tern):
    from fgq_jax import integer, ptq

    return ptq.dequantize_tree(tern), integer.fold_params(tern)


def _build(spec, variables, group_sizes, calib_x, act_bits):
    """Per group size: (fake variables, folded weights); plus the shared ActConfig and steps."""
    from fgq_jax import transforms
    from fgq_jax.intercept import linear_layer_paths

    params = variables["params"]
    order = linear_layer_paths(spec.module, variables, spec.input_shape)
    per_n = {}
    for n in group_sizes:
        rules = transforms.default_rules(transforms.WeightQuant("exact", n), spec.first_layer,
                                         spec.last_layer, first_last="fp")

        # ternarize: one cached jit per kernel shape inside fgq_jax.ternary; then dequantize and
        # fold in one compiled program (eagerly they are hundreds of small ops, each compiled)
        tern = transforms.quantize_params(params, rules, mode="ternary")
        fake_params, folded = _dequantize_and_fold(tern)
        per_n[n] = ({**variables, "params": fake_params}, folded)
    # act layers: the ternary layers (all but first/last); their inputs get 8-bit codes
    any_folded = next(iter(per_n.values()))[1]
    layers = [p for p in order if p in any_folded and p != spec.first_layer]
    fake0 = next(iter(per_n.values()))[0]
    act_cfg, steps = common.quick_act_steps(spec.module, fake0, calib_x, layers, act_bits)
    return per_n, act_cfg, steps


def _step_fn(kind, module, family, act_cfg):
    from fgq_jax import integer
    from fgq_jax.data import normalize
    from fgq_jax.intercept import quantized_apply

    if kind == "fp32":
        def f(variables, folded, steps, images):
            return jnp.argmax(module.apply(variables, normalize(images, family), train=False), -1)
    elif kind == "fake":
        def f(variables, folded, steps, images):
            logits = quantized_apply(module, variables, normalize(images, family), act_cfg, steps)
            return jnp.argmax(logits, -1)
    else:
        mode = "integer" if kind in INT_IMPLS else "literal"
        impl = INT_IMPLS.get(kind, "gemm")

        def f(variables, folded, steps, images):
            logits = integer.integer_apply(module, variables, folded, steps, normalize(images, family),
                                           mode, act_cfg=act_cfg, impl=impl)
            return jnp.argmax(logits, -1)
    return jax.jit(f)


def bench_model(name: str, variants, batch_size: int, batches: int, repeats: int, act_bits: int = 8,
                seed: int = 0, log=print) -> tuple[list[dict], dict]:
    spec = common.get_spec(name)
    name = common.spec_label(spec)
    module, family = spec.module, spec.dataset_family
    parsed = [(v, *_parse_variant(v)) for v in variants]
    group_sizes = sorted({n for _, k, n in parsed if n is not None})
    t0 = time.perf_counter()
    variables = common.random_variables(spec, seed)
    rng = np.random.default_rng(seed)
    imgs = [jnp.asarray(rng.integers(0, 256, (batch_size, *spec.input_shape), dtype=np.uint8))
            for _ in range(batches)]
    from fgq_jax.data import normalize

    calib_x = normalize(imgs[0][: min(batch_size, 16)], family)
    per_n, act_cfg, steps = _build(spec, variables, group_sizes, calib_x, act_bits) if group_sizes else ({}, None, {})
    setup_s = time.perf_counter() - t0
    log(f"[bench_eval] {name}: weights ternarized/folded for N in {group_sizes} + act steps "
        f"({len(steps)} layers) in {setup_s:.1f} s")

    runners, compile_s, cache, plans = {}, {}, {}, {}
    for v, kind, n in parsed:
        if kind in INT_IMPLS:  # the execution of each folded layer, visible in the table
            from fgq_jax import integer

            plans[v] = integer.integer_plan(module, per_n[n][0], per_n[n][1], steps,
                                            normalize(imgs[0], family), impl=INT_IMPLS[kind],
                                            act_cfg=act_cfg)
        if kind == "fp32":
            args = (variables, {}, {})
        elif kind == "fake":
            args = (per_n[n][0], {}, steps)
        else:
            args = (per_n[n][0], per_n[n][1], steps)
        # fake-quant at N=4 and N=64 is the same program on same-shaped arrays: compile it once
        key = (kind, jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
        if key in cache:
            compiled, cs = cache[key][0], None
            log(f"[bench_eval] {name} {v}: same program as {cache[key][1]} (compiled once)")
        else:
            fn = _step_fn(kind, module, family, act_cfg)
            compiled, cs = common.compile_timed(fn, *args, imgs[0])
            cache[key] = (compiled, v)
            log(f"[bench_eval] {name} {v}: compiled in {cs:.1f} s")
        compile_s[v] = cs

        def run(compiled=compiled, args=args):
            return common.block([compiled(*args, im) for im in imgs])

        runners[v] = run
    timing = common.interleaved_medians(runners, repeats, warmup=1)

    rows = []
    fp_ips = None
    n_img = batch_size * batches
    for v, kind, n in parsed:
        t = timing[v]
        ips = n_img / t["median_s"]
        if kind == "fp32":
            fp_ips = ips
        rows.append({
            "model": name, "variant": v, "path": _path_label(kind), "N": n,
            "weights": "fp32" if kind == "fp32" else ("ternary (fake-quant fp32)" if kind == "fake" else "int8 = m_g*t"),
            "acts": "fp32" if kind == "fp32" else f"{act_bits}-bit",
            "batch": batch_size, "images_per_s": ips, "batch_ms": 1e3 * t["median_s"] / batches,
            "batch_ms_min": 1e3 * t["min_s"] / batches, "compile_s": compile_s[v],
            "repeats": t["repeats"], "batches": batches, "impl": _plan_summary(plans.get(v)),
        })
    for r in rows:
        r["vs_fp32"] = r["images_per_s"] / fp_ips if fp_ips else None
        kind = _parse_variant(r["variant"])[0]
        target = TARGETS.get("integer" if kind in INT_IMPLS else kind)
        r["target"] = f">= {target}x" if target else None
        r["met"] = (r["vs_fp32"] >= target) if (target and r["vs_fp32"] is not None) else None
    return rows, {"setup_s": setup_s, "plans": plans}


def _plan_summary(plan) -> str | None:
    """'conv4 x6, conv2 x6, ...': how many folded layers run each execution (most first)."""
    if not plan:
        return None
    counts: dict[str, int] = {}
    for impl in plan.values():
        counts[impl] = counts.get(impl, 0) + 1
    return ", ".join(f"{k} x{c}" for k, c in sorted(counts.items(), key=lambda kc: (-kc[1], kc[0])))


def _plan_notes(name: str, plans: dict) -> list[str]:
    """One note per distinct per-layer plan: 'layer impl, layer impl, ...' in model order."""
    out, seen = [], {}
    for v, plan in plans.items():
        key = tuple(plan.items())
        if key in seen:
            out.append(f"{name} {v}: same per-layer execution as {seen[key]}")
            continue
        seen[key] = v
        out.append(f"{name} {v} per layer: " + ", ".join(f"{p} {i}" for p, i in plan.items()))
    return out


def _path_label(kind: str) -> str:
    return {"fp32": "FP32", "fake": "fake-quant", "integer": "integer (auto)",
            "literal": "literal per-group", "intgemm": "integer (int8 GEMM)",
            "intconv": "integer (int8 conv)", "intfconv": "integer (f32 conv of codes)"}[kind]


COLUMNS = ["model", "path", "N", "acts", "batch", "images_per_s", "batch_ms", "compile_s", "vs_fp32",
           "target", "met", "impl"]
HEADERS = {"images_per_s": "images/s (median)", "batch_ms": "ms/batch", "compile_s": "compile s",
           "vs_fp32": "x FP32", "impl": "integer execution (layers)"}


def run(args) -> dict:
    models = ["resnet20", "resnet50"] if args.model == "both" else [args.model]
    if args.quick:
        models = ["resnet20"] if args.model == "both" else models
    info = common.machine_info()
    rows, meta, plan_notes = [], {}, []
    for m in models:
        variants = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS.get(m, DEFAULT_VARIANTS["resnet50"]))
        nb, rep = DEFAULT_SIZES.get(m, (1, 3))
        bs = args.batch_size
        if args.quick:
            nb, rep = 1, 1
            bs = args.batch_size if args.batch_size != 128 else 8
            if not args.variants:
                variants = ["fp32", "fake-n64", "integer-n64", "literal-n64"]
        nb = args.batches or nb
        rep = args.repeats or rep
        r, mmeta = bench_model(m, variants, bs, nb, rep, act_bits=args.act_bits, seed=args.seed)
        rows += r
        meta[m] = mmeta
    for m in models:
        plan_notes += _plan_notes(common.spec_label(common.get_spec(m)), meta[m].pop("plans", {}))
    notes = [
        f"machine: {common.machine_line(info)}",
        "random weights (He-normal) and random uint8 images: throughput does not depend on values",
        "images/s = images per repeat / median repeat time (variants timed round-robin); compile time "
        "(lower+compile) reported apart ('-': same program as a row above, compiled once); "
        "ms/batch = median time per batch",
        "fake-quant: ternary weights quantized once outside the step (as Evaluator does), 8-bit "
        "activations at the ternary layers' inputs; first conv and last dense stay FP32 in all paths",
        "integer: int8 weights and 8-bit codes, int32 accumulator per ternary layer (integer_apply; "
        "impl=auto: resolve_impl's per-layer rule, 'impl' column = executions chosen, all bit-exact "
        "with the float emulation); literal: per-group int32 partial sums x alpha_g "
        "(integer_apply mode='literal')",
        *plan_notes,
        f"targets (issue 6, 2-core CPU): fake-quant >= {TARGETS['fake']}x FP32, integer >= "
        f"{TARGETS['integer']}x FP32",
    ]
    return {"name": "eval_throughput", "title": "Eval throughput (images/s)", "columns": COLUMNS,
            "headers": HEADERS, "rows": rows, "notes": notes, "meta": {"machine": info, **meta}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval", description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--model", default="both",
                    help="resnet20 | resnet50 | both | any fgq_jax model name | package.module:spec")
    ap.add_argument("--variants", default=None, help=f"comma list from {','.join(ALL_VARIANTS)} (any N)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=None, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> dict:
    return common.cli_main(build_parser, run, argv)


if __name__ == "__main__":
    main()
