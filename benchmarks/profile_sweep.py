"""Profile a sweep: where each point's time goes (issue 15).

Runs `fgq_jax.sweep.run_sweep` on a sub-grid of a sweep config into a fresh results root and times,
per point, the stages `quantize_model` and the sweep loop go through:

* ``ternarize``: `transforms.quantize_params` (+ dequantize);
* ``calibrate``: every `ptq.calibrate_steps` call (twice for a repaired point: before and after);
* ``bias_correct``, ``bn_reestimate``, ``scale_fit``: the repairs;
* ``evaluate``: the `Evaluator` call on the test split;
* ``other``: the rest of the point (accounting columns, CSV/JSON writes);

and, inside each stage, the seconds XLA spent compiling (``jax.monitoring`` backend-compile events)
and tracing/lowering. Nothing in the library is changed: the stage functions are wrapped for the
run. Outputs wait for their arrays (`block_until_ready`) so asynchronous dispatch does not move time
between stages. Cold: the persistent compilation cache points at an empty folder.

    python -m benchmarks.profile_sweep --group-sizes 4,64,tensor --act-bits 8 [--out DIR]
    python -m benchmarks.profile_sweep --calibration --group-sizes 4,tensor --act-bits 8,4
    python -m benchmarks.profile_sweep --group-sizes 4,64,tensor --act-bits fp,8,4 --cpu-devices 1

The CPU is split into JAX devices as `make sweep` splits it (`experiments.cli`, one per core by
default); ``--cpu-devices 1`` gives the single-device evaluation of before issue 15's last change.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import tempfile
import time
from pathlib import Path

import jax

STAGES = ("ternarize", "calibrate", "scale_fit", "bias_correct", "bn_reestimate", "evaluate")
_COMPILE_EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "trace",
}


class Profile:
    """Per-point stage timings: ``points`` is a list of {stage: seconds, stage/compile: seconds}."""

    def __init__(self):
        self.points: list[dict] = []
        self._cur: collections.Counter = collections.Counter()
        self._stack: list[str] = []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        kind = _COMPILE_EVENTS.get(event)
        if kind is not None:
            self._cur[f"{self._stack[-1] if self._stack else 'other'}/{kind}"] += duration

    @contextlib.contextmanager
    def stage(self, name: str):
        self._stack.append(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._cur[name] += time.perf_counter() - t0
            self._stack.pop()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            with self.stage(name):
                return jax.block_until_ready(fn(*a, **kw))
        return timed

    def end_point(self, label: str, total: float) -> None:
        row = {"point": label, "total": total, **self._cur}
        row["other"] = total - sum(self._cur[s] for s in STAGES)
        self.points.append(row)
        self._cur = collections.Counter()


@contextlib.contextmanager
def instrumented(prof: Profile):
    """Wrap the stage functions of the sweep (restored on exit)."""
    from fgq_jax import evaluate, ptq, repairs, sweep, transforms

    patches = [
        (transforms, "quantize_params", "ternarize"),
        (ptq, "calibrate_steps", "calibrate"),
        (repairs, "fit_scales", "scale_fit"),
        (repairs, "bias_correction", "bias_correct"),
        (repairs, "reestimate_bn", "bn_reestimate"),
        (evaluate.Evaluator, "__call__", "evaluate"),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    orig_point_row = sweep.point_row

    def point_row(cfg, recipe, *a, **kw):
        prof.end_point(recipe.describe(), kw.get("point_seconds", 0.0))
        return orig_point_row(cfg, recipe, *a, **kw)

    try:
        for obj, name, stage in patches:
            setattr(obj, name, prof.wrap(stage, getattr(obj, name)))
        sweep.point_row = point_row
        yield prof
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        sweep.point_row = orig_point_row


def summarize(points: list[dict]) -> list[str]:
    """Markdown table: one row per point, seconds per stage (compile seconds in parentheses)."""
    cols = ("ternarize", "calibrate", "scale_fit", "bias_correct", "bn_reestimate", "evaluate", "other")
    used = [c for c in cols if any(p.get(c, 0) for p in points)]
    lines = ["| point | total s | " + " | ".join(used) + " |", "|---|---|" + "---|" * len(used)]
    for p in points + [_sum_row(points)]:
        cells = []
        for c in used:
            comp = p.get(f"{c}/compile", 0.0) + p.get(f"{c}/trace", 0.0)
            cells.append(f"{p.get(c, 0.0):.2f}" + (f" ({comp:.2f})" if comp >= 0.005 else ""))
        lines.append(f"| {p['point']} | {p['total']:.2f} | " + " | ".join(cells) + " |")
    return lines


def _sum_row(points: list[dict]) -> dict:
    tot = collections.Counter()
    for p in points:
        tot.update({k: v for k, v in p.items() if k != "point"})
    return {"point": f"**sum of {len(points)} points**", **tot}


def compare_calibration(cfg, names: list[str], repeats: int = 3) -> list[str]:
    """Side by side, round-robin in this process: `calibrate_steps`' one-forward calibration
    against the layer-by-layer loop it replaced, on the sweep's model and calibration images, for
    the points ``names`` (recipe.describe()). Checks the steps are identical. Markdown lines."""
    import statistics

    import jax.numpy as jnp

    from fgq_jax import ptq, transforms
    from fgq_jax.data import normalize
    from fgq_jax.loading import load_model, sample_images
    from fgq_jax.ternary import dequantize_tree

    spec, v_fp = load_model(cfg.model, cfg.checkpoint)
    calib, _ = sample_images(cfg.dataset, cfg.calib_split, cfg.recipe)
    x = normalize(jnp.asarray(calib), spec.dataset_family)
    points = {p.describe(): p for p in cfg.points()}
    lines = ["| point | layers | layer by layer s (first) | one forward s (first) | ratio | same steps |",
             "|---|---|---|---|---|---|"]
    for name in names:
        recipe = points[name]
        _, layers = ptq.quantized_layers(spec, v_fp, recipe)
        v = dict(v_fp)
        if recipe.weights.quantized:
            rules = recipe.rules(spec.first_layer, spec.last_layer)
            v["params"] = dequantize_tree(transforms.quantize_params(v_fp["params"], rules, mode="ternary"))
        act_cfg, _ = ptq.calibrate_steps(spec.module, v, calib, recipe.activations.bits, layers,
                                         spec.dataset_family, recipe.activations.calibration)
        cal = recipe.activations.calibration
        runs = {"loop": lambda: ptq._steps_layer_by_layer(spec.module, act_cfg, cal, v, [x]),
                "one": lambda: ptq._steps_one_pass(spec.module, act_cfg, cal, v, x)}
        times, out = {"loop": [], "one": []}, {}
        for i in range(repeats + 1):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                out[k] = jax.block_until_ready(fn())
                times[k].append(time.perf_counter() - t0)
        same = all(float(out["loop"][p]) == float(out["one"][p]) for p in act_cfg.paths)
        lo, one = (statistics.median(times[k][1:]) for k in ("loop", "one"))
        lines.append(f"| {name} | {len(act_cfg.paths)} | {lo:.2f} ({times['loop'][0]:.2f}) | "
                     f"{one:.2f} ({times['one'][0]:.2f}) | {lo / one:.1f}x | {same} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="experiments/configs/sweep_resnet20.py")
    ap.add_argument("--group-sizes", default="4,64,tensor", help="sub-grid of N (comma-separated)")
    ap.add_argument("--act-bits", default="8", help="sub-grid of activation bits (fp, 8, 4)")
    ap.add_argument("--out", default=None, help="results root (default: a fresh temporary folder)")
    ap.add_argument("--json", default=None, help="also write the per-point timings here")
    ap.add_argument("--calibration", action="store_true",
                    help="instead: time the one-forward calibration against the layer-by-layer loop")
    ap.add_argument("--repeats", type=int, default=3, help="--calibration: timed repeats")
    ap.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                    help="JAX devices on the CPU, as `make sweep` sets them (experiments.cli; "
                         "default one per core)")
    args = ap.parse_args(argv)

    from experiments.cli import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)

    import dataclasses

    from fgq_jax.configfile import load_config
    from fgq_jax.sweep import SweepConfig, run_sweep

    cfg = load_config(args.config, [], SweepConfig)
    sizes = tuple(s if s in ("channel", "tensor") else int(s) for s in args.group_sizes.split(","))
    bits = tuple(None if b == "fp" else int(b) for b in args.act_bits.split(","))
    cfg = dataclasses.replace(cfg, group_sizes=sizes, act_bits=bits)
    if args.calibration:
        names = [p.describe() for p in cfg.points() if p.activations.bits and not p.repairs.any]
        print("\n".join(compare_calibration(cfg, names, args.repeats)), flush=True)
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="fgq_profile_"))
    jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))  # cold, as a fresh clone
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    prof = Profile()
    t0 = time.perf_counter()
    with instrumented(prof):
        csv_path = run_sweep(cfg, out_root=out, plots=False, progress=False)
    wall = time.perf_counter() - t0
    print(f"{len(prof.points)} points in {wall:.1f} s (incl. model/data loading); results {csv_path}")
    print("\n".join(summarize(prof.points)))
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "points": prof.points}, indent=1))


if __name__ == "__main__":
    main()
