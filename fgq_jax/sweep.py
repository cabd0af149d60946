"""The experiment module: sweep N x activation bits x method (x first/last policy x repairs).

One `SweepConfig` describes an experiment; `run_sweep` evaluates every point on the full test split
and appends one row per point to results/<dataset>/<model>/<experiment>.csv (+ a JSON twin with the
run's metadata) and draws the accuracy-versus-multiplications plots. The evaluation forward is
compiled once per activation setting (`Evaluator`) and reused for every N and method.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fgq_jax import accounting, results, transforms
from fgq_jax.evaluate import Calibration, Evaluator
from fgq_jax.ptq import PTQConfig, quantize_model, weight_rules

METHODS = {  # sweep spelling -> (ternary method, asymmetric)
    "exact": ("exact", False),
    "exact+asym": ("exact", True),
    "twn": ("twn", False),
    "twn+asym": ("twn", True),
    "absmean": ("absmean", False),
    "binary": ("binary", False),
}
REPAIRS = ("bn_reestimate", "bias_correct", "scale_fit")
KEY_COLUMNS = (
    "model", "method", "group_size", "act_bits", "first_last", "bn_reestimate", "bias_correct",
    "scale_fit",
)
COLUMNS = (
    *KEY_COLUMNS, "top1", "top5", "mult_eliminated_pct", "bits_per_weight", "potential_speedup",
    "quantized_mult_eliminated_pct", "model_bits_per_weight", "dataset", "experiment",
    "num_test", "num_calib", "num_repair", "num_fit", "calibration", "seed", "eval_images_per_s",
    "quant_seconds", "point_seconds", "top1_rounded_multipliers", "git_revision", "date",
)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """An experiment. Every field ends up in the JSON metadata; the grid fields in each row.

    checkpoint: a PyTorch checkpoint (.th/.pth, converted on the fly) or an orbax directory written
      by `python -m fgq_jax.convert`. "{shared}" expands to the shared data root.
    group_sizes: ints, "channel" (per output channel) or "tensor" (one scale per tensor).
    act_bits: None (full precision) or ints.
    methods: keys of METHODS.
    repairs: tuples of names from REPAIRS; () is plain post-training ternarization.
    """

    name: str
    model: str
    checkpoint: str
    dataset: str = "cifar10_jpeg"
    group_sizes: tuple = (1, 2, 4, 8, 16, 32, 64, 128, "channel", "tensor")
    act_bits: tuple = (None, 8, 4)
    methods: tuple = ("exact",)
    first_last: tuple = ("fp",)
    repairs: tuple = ((),)
    include_fp: bool = True
    num_calib: int = 256
    num_repair: int = 2048
    num_fit: int = 512
    augment_repair_images: bool = True  # see PTQConfig.augment_repair_images
    # Also evaluate each ternary point with its group scales rounded to the integer path's int8
    # multipliers (alpha_g ~ m_g * s_k, fgq_jax.integer): column top1_rounded_multipliers.
    integer_rounding: bool = False
    calibration: Calibration = Calibration()
    test_split: str = "test"
    test_limit: int | None = None  # smoke tests only: evaluate the first n test images
    calib_split: str = "train"
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self):
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown sweep method {m!r}; known: {sorted(METHODS)}")
        for r in self.repairs:
            bad = set(r) - set(REPAIRS)
            if bad:
                raise ValueError(f"unknown repair(s) {sorted(bad)}; known: {REPAIRS}")
        for n in self.group_sizes:
            if n not in ("channel", "tensor") and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"group size must be an int >= 1, 'channel' or 'tensor', got {n!r}")


def group_size_value(n):
    """Sweep spelling -> the ternary API's group_size."""
    return None if n == "tensor" else n


def sweep_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every point of the grid as the key columns of its row, FP references first.

    Points are ordered by activation setting so each compiled forward is reused back to back.
    """
    points = []
    bn_variants = sorted({("bn_reestimate",) if "bn_reestimate" in r else () for r in cfg.repairs})
    for act in cfg.act_bits:
        if cfg.include_fp:  # FP weights; with BN re-estimation too when a repair set uses it
            points += [_point(cfg, "fp", "fp", act, "fp", rep) for rep in bn_variants]
        for first_last, method, n, rep in itertools.product(
            cfg.first_last, cfg.methods, cfg.group_sizes, cfg.repairs
        ):
            points.append(_point(cfg, method, n, act, first_last, rep))
    return points


def _point(cfg, method, n, act, first_last, rep) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "method": method,
        "group_size": n,
        "act_bits": "fp" if act is None else act,
        "first_last": first_last,
        "bn_reestimate": "bn_reestimate" in rep,
        "bias_correct": "bias_correct" in rep,
        "scale_fit": "scale_fit" in rep,
    }


def point_key(row) -> tuple[str, ...]:
    return tuple(results.format_value(row[c]) if not isinstance(row[c], str) else row[c]
                 for c in KEY_COLUMNS)


def ptq_config(point, cfg: SweepConfig) -> PTQConfig:
    act = None if point["act_bits"] == "fp" else int(point["act_bits"])
    if point["method"] == "fp":
        return PTQConfig(method="fp", group_size=None, act_bits=act, calibration=cfg.calibration,
                         bn_reestimate=point["bn_reestimate"], seed=cfg.seed,
                         augment_repair_images=cfg.augment_repair_images)
    method, asym = METHODS[point["method"]]
    return PTQConfig(
        method=method,
        group_size=group_size_value(point["group_size"]),
        asymmetric=asym,
        act_bits=act,
        first_last=point["first_last"],
        bn_reestimate=point["bn_reestimate"],
        bias_correct=point["bias_correct"],
        scale_fit=point["scale_fit"],
        calibration=cfg.calibration,
        num_fit=cfg.num_fit,
        augment_repair_images=cfg.augment_repair_images,
        seed=cfg.seed,
    )


def accounting_columns(spec, variables, ptq: PTQConfig) -> dict[str, float]:
    """Multiplications eliminated, bits per weight and the paper's speedup model for one point.

    mult_eliminated_pct and potential_speedup are for the whole network (full-precision first/last
    layers included); quantized_mult_eliminated_pct is over the ternary layers alone (the paper's
    1 - 1/N); bits_per_weight is over the ternary layers (codes + fp16 scales), model_bits_per_weight
    over every conv/dense kernel.
    """
    layers = accounting.layer_shapes(spec.module, variables, spec.input_shape)
    quant = {}
    if ptq.method != "fp":
        quant = transforms.quantized_paths(variables["params"], weight_rules(spec, ptq))
    report = accounting.count_ops(layers, quant, scale_bits=16)
    ternary = [r for r in report.rows if r.quant.startswith("ternary")]
    t_macs = sum(r.macs for r in ternary)
    t_mults = sum(r.mults for r in ternary)
    return {
        "mult_eliminated_pct": 100.0 * report.eliminated,
        "quantized_mult_eliminated_pct": 100.0 * (1 - t_mults / t_macs) if t_macs else 0.0,
        "bits_per_weight": report.ternary_bits_per_weight if ternary else 32.0,
        "model_bits_per_weight": report.bits_per_weight,
        "potential_speedup": report.potential_speedup,
    }


def load_model(cfg: SweepConfig):
    """(ModelSpec, FP variables) from the config's checkpoint."""
    from fgq_jax.models import get_model

    spec = get_model(cfg.model)
    path = Path(cfg.checkpoint.format(shared=_shared_dir()))
    if not path.is_absolute():
        path = results.REPO_ROOT / path
    if path.is_dir():
        from fgq_jax.checkpoint import load_variables

        variables, _ = load_variables(path)
    else:
        from fgq_jax.convert import convert_torch_checkpoint

        params, batch_stats = convert_torch_checkpoint(path, cfg.model)
        variables = {"params": params, "batch_stats": batch_stats}
    return spec, variables


def _shared_dir() -> str:
    from fgq_jax.data import default_shared_dir

    return str(default_shared_dir())


def sample_images(cfg: SweepConfig):
    """Unlabeled training images for calibration (first num_calib) and repairs (num_repair)."""
    from fgq_jax.data import load_arrays

    images, _ = load_arrays(cfg.dataset, cfg.calib_split)
    n = max(cfg.num_calib, cfg.num_repair)
    if n > images.shape[0]:
        raise ValueError(f"{cfg.calib_split} split has {images.shape[0]} images; {n} requested")
    # A uniformly random subset in random order: the split is stored sorted by class, so any
    # prefix of a sorted index set would be a class-biased sample (BN statistics then suffer).
    idx = np.random.default_rng(cfg.seed).permutation(images.shape[0])[:n]
    sample = images[idx]
    return sample[: cfg.num_calib], sample[: cfg.num_repair]


def _previous_runs(json_path: Path) -> list[dict]:
    """Metadata of the runs recorded in an existing results JSON (a file from before the "runs"
    list holds only its last run's "metadata"); [] when there is none or it is unreadable."""
    try:
        old = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []
    runs = old.get("runs")
    if isinstance(runs, list):
        return runs
    return [old["metadata"]] if isinstance(old.get("metadata"), dict) else []


def results_paths(cfg: SweepConfig, out_root=None) -> tuple[Path, Path]:
    root = Path(out_root) if out_root else results.REPO_ROOT / "results"
    base = root / cfg.dataset / cfg.model / cfg.name
    return base.with_suffix(".csv"), base.with_suffix(".json")


def run_sweep(
    cfg: SweepConfig,
    *,
    out_root=None,
    worker: int = 0,
    num_workers: int = 1,
    config_file: str | None = None,
    plots: bool = True,
    progress: bool = True,
    evaluators: dict | None = None,
) -> Path:
    """Evaluate every unfinished point of `cfg` (this worker's share); returns the CSV path.

    evaluators: optional dict that receives the compiled `Evaluator` of each activation setting
    (keyed by its ActConfig), e.g. to check how often the forward was compiled.
    """
    from tqdm.auto import tqdm

    from fgq_jax.data import load_arrays
    from fgq_jax.distributed import append_rows_locked, partition_points

    if not 0 <= worker < num_workers:
        raise ValueError(f"worker index {worker} out of range for {num_workers} workers")
    csv_path, json_path = results_paths(cfg, out_root)
    done = {point_key(r) for r in results.read_csv(csv_path)}
    points = partition_points(sweep_points(cfg), worker, num_workers)
    todo = [p for p in points if point_key(p) not in done]
    meta = results.run_metadata(
        seed=cfg.seed, experiment=dataclasses.asdict(cfg), config_file=config_file
    )
    runs = None  # metadata of every run that wrote rows to this CSV, this one last
    if todo:
        spec, variables_fp = load_model(cfg)
        test_x, test_y = load_arrays(cfg.dataset, cfg.test_split, limit=cfg.test_limit)
        calib, repair = sample_images(cfg)
        evaluators = {} if evaluators is None else evaluators
        bar = tqdm(todo, desc=cfg.name, unit="point", disable=not progress)
        for point in bar:
            t0 = time.perf_counter()
            bar.set_postfix_str(_describe(point))
            ptq = ptq_config(point, cfg)
            q = quantize_model(spec, variables_fp, ptq, calib, repair)
            quant_seconds = time.perf_counter() - t0
            ev = evaluators.get(q.act_cfg)
            if ev is None:
                ev = evaluators[q.act_cfg] = Evaluator(spec.module, spec.dataset_family, q.act_cfg)
            r = ev(q.variables, test_x, test_y, q.act_steps, batch_size=cfg.batch_size,
                   progress=_describe(point) if progress else False)
            if cfg.integer_rounding and q.ternary_params is not None:
                r_int = ev(rounded_variables(q), test_x, test_y, q.act_steps,
                           batch_size=cfg.batch_size, progress=False)
                point = {**point, "top1_rounded_multipliers": r_int.top1}
            row = {
                **point,
                "top1": r.top1,
                "top5": r.top5,
                **accounting_columns(spec, variables_fp, ptq),
                "dataset": cfg.dataset,
                "experiment": cfg.name,
                "num_test": r.num_images,
                "num_calib": cfg.num_calib if ptq.act_bits else 0,
                "num_repair": cfg.num_repair if (ptq.bn_reestimate or ptq.bias_correct or ptq.scale_fit) else 0,
                "num_fit": cfg.num_fit if ptq.scale_fit else 0,
                "calibration": f"{cfg.calibration.method}" + ("+pow2" if cfg.calibration.pow2 else ""),
                "seed": cfg.seed,
                "eval_images_per_s": r.images_per_s,
                "quant_seconds": quant_seconds,
                "point_seconds": time.perf_counter() - t0,
                # which run made this row: a resumed or extended sweep mixes runs (see "runs")
                "git_revision": meta["git_revision"],
                "date": meta["date"],
            }
            rows = append_rows_locked(csv_path, [row], KEY_COLUMNS, COLUMNS)
            if runs is None:
                runs = _previous_runs(json_path) + [meta]
            results.write_json(json_path, {"metadata": meta, "runs": runs, "rows": rows})
    rows = results.read_csv(csv_path)
    if rows and not json_path.exists():
        results.write_json(json_path, {"metadata": meta, "runs": [meta], "rows": rows})
    if plots and rows:
        from fgq_jax import plots as plots_lib

        plots_lib.plot_sweep(rows, csv_path.with_suffix(""), title=f"{cfg.model} on {cfg.dataset}")
    return csv_path


def rounded_variables(q) -> dict:
    """q's variables with every ternary kernel's scales rounded to int8 multipliers (repairs kept)."""
    import jax

    from fgq_jax.integer import rounded_fake_quant
    from fgq_jax.ternary import TernaryTensor

    is_tt = lambda x: isinstance(x, TernaryTensor)  # noqa: E731
    params = jax.tree.map(
        lambda t, v: rounded_fake_quant(t) if is_tt(t) else v,
        q.ternary_params, q.variables["params"], is_leaf=is_tt,
    )
    return {**q.variables, "params": params}


def _describe(point) -> str:
    rep = "+".join(k for k in REPAIRS if point[k]) or "no-repair"
    return f"{point['method']} N={point['group_size']} a{point['act_bits']} fl={point['first_last']} {rep}"
