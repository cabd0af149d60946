"""Benchmark: quantized vs full-precision fine-tuning step time, in the same run.

ResNet-20 at batch 128 (CIFAR 32x32 uint8 images, random labels), the training step of
``fgq_jax.train.make_train_step`` (on-device random crop + flip, normalisation, forward, cross-entropy,
backward, SGD-momentum update with weight decay, BN in train mode):

* ``fp``: float weights, float activations (``make_apply_fn(module)``);
* ``ternary N=64 + a8``: exact FGQ ternary weights with a straight-through gradient to the latent
  weights (``quantize_params(..., mode="fake", ste=True)`` via ``train.weight_quantizer``), first
  conv / last dense FP, 8-bit activations at the ternary layers' inputs (clipped STE,
  ``evaluate.quantized_apply``) — what ``experiments.finetune`` trains.

Timed with ``fgq_jax.train.time_train_steps`` (the same helper ``fit`` uses): the steps run
round-robin on fresh copies of one state, compile excluded from the median (the first call, compile
included, is reported apart). Random weights: the step time does not depend on the values.

    python -m benchmarks.bench_train_step                  # batch 128, 10 repeats, N=64
    python -m benchmarks.bench_train_step --sizes 4,64 --repeats 20
    python -m benchmarks.bench_train_step --quick

Target (issue 6): quantized step <= 1.3x the FP step.
"""
from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from benchmarks import common

TARGET = 1.3


def bench(model: str, batch_size: int, sizes, repeats: int, act_bits: int = 8, seed: int = 0,
          log=print) -> tuple[list[dict], dict]:
    from fgq_jax import ptq
    from fgq_jax import train as T
    from fgq_jax.data import normalize
    from fgq_jax.recipe import QuantRecipe
    spec = common.get_spec(model)
    model = common.spec_label(spec)
    module, family = spec.module, spec.dataset_family
    variables = common.random_variables(spec, seed)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.integers(0, 256, (batch_size, *spec.input_shape), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, spec.num_classes, (batch_size,)), jnp.int32)
    tx = T.make_optimizer("sgd", 0.01, "cosine", total_steps=1000, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)

    def preprocess(x):
        return normalize(x, family)

    steps = {"fp": T.make_train_step(T.make_apply_fn(module), tx, preprocess=preprocess)}
    act_steps = {}
    labels_of = {"fp": ("fp", None)}
    t0 = time.perf_counter()
    for n in sizes:
        recipe = QuantRecipe.make(method="exact", group_size=n, act_bits=act_bits)
        _, layers = ptq.quantized_layers(spec, variables, recipe)  # inputs quantized: the ternary layers' but the first
        wq_eval = T.weight_quantizer(recipe, spec, ste=False)
        # eager: one cached jit per kernel shape inside fgq_jax.ternary (a jit of the whole tree
        # compiles far longer on a loaded 2-core machine)
        fake = {**variables, "params": wq_eval(variables["params"])}
        act_cfg, st = common.quick_act_steps(module, fake, preprocess(images[:32]), layers, act_bits)
        act_steps.update(st)  # same layers and (nearly) the same steps for every N: one state
        name = f"ternary-n{n}-a{act_bits}"
        steps[name] = T.make_train_step(T.make_apply_fn(module, act_cfg), tx, preprocess=preprocess,
                                        weight_quant=T.weight_quantizer(recipe, spec, ste=True))
        labels_of[name] = ("ternary STE", n)
    log(f"[bench_train_step] {model}: act steps for {len(act_steps)} layers in {time.perf_counter() - t0:.1f} s")
    state = T.create_train_state(variables, tx, seed, act_steps)
    # quantized first, FP last, then round-robin: as fit() does
    order = {k: steps[k] for k in [*[k for k in steps if k != "fp"], "fp"]}
    timing = T.time_train_steps(order, state, (images, labels), repeats=repeats, warmup=2)
    fp_med = timing["fp"]["median_s"]
    rows = []
    for name in steps:
        t = timing[name]
        kind, n = labels_of[name]
        ratio = t["median_s"] / fp_med
        is_q = name != "fp"
        rows.append({
            "model": model, "step": kind, "N": n, "acts": f"{act_bits}-bit" if is_q else "fp32",
            "batch": batch_size, "step_ms": 1e3 * t["median_s"], "step_ms_min": 1e3 * t["min_s"],
            "images_per_s": batch_size / t["median_s"], "first_call_s": t["first_call_s"],
            "repeats": t["repeats"], "vs_fp": ratio,
            "target": f"<= {TARGET}x" if is_q else None, "met": (ratio <= TARGET) if is_q else None,
        })
    return rows, {}


COLUMNS = ["model", "step", "N", "acts", "batch", "step_ms", "step_ms_min", "images_per_s",
           "first_call_s", "vs_fp", "target", "met"]
HEADERS = {"step_ms": "ms/step (median)", "step_ms_min": "ms/step (min)", "images_per_s": "images/s",
           "first_call_s": "first call s (compile incl.)", "vs_fp": "x FP step"}


def run(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    bs, rep = args.batch_size, args.repeats
    if args.quick:
        bs = bs if bs != 128 else 16
        rep = rep if rep != 10 else 2
    info = common.machine_info()
    rows, _ = bench(args.model, bs, sizes, rep, args.act_bits, args.seed)
    notes = [
        f"machine: {common.machine_line(info)}",
        "fgq_jax.train.make_train_step (augment + normalise + forward/backward + SGD-momentum, BN train "
        "mode); timed with train.time_train_steps: round-robin, fresh state copies, median of "
        f"{rep} repeats, compile excluded (first call reported apart)",
        "ternary STE: exact FGQ of every conv/dense kernel but the first and last on every step "
        "(straight-through gradient), 8-bit activations (clipped STE) at the ternary layers' inputs",
        "random weights and images (step time does not depend on values)",
        f"target (issue 6): quantized step <= {TARGET}x the FP step",
    ]
    return {"name": "train_step", "title": "Fine-tuning step time, quantized vs FP", "columns": COLUMNS,
            "headers": HEADERS, "rows": rows, "notes": notes, "meta": {"machine": info}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--model", default="resnet20", help="fgq_jax model name or package.module:spec")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sizes", default="64", help="group sizes of the quantized steps")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> dict:
    return common.cli_main(build_parser, run, argv)


if __name__ == "__main__":
    main()
