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
from typing import Mapping

import jax
from tqdm.auto import tqdm

from fgq_jax import accounting, fileio, results, transforms
from fgq_jax.distributed import partition_points
from fgq_jax.evaluate import Evaluator
from fgq_jax.integer import rounded_fake_quant
from fgq_jax.loading import load_labeled, load_model, sample_images
from fgq_jax.ptq import quantize_model
from fgq_jax.recipe import KEY_COLUMNS as RECIPE_KEY
from fgq_jax.recipe import REPAIRS, QuantRecipe
from fgq_jax.ternary import is_ternary

METHODS = {  # sweep spelling -> (ternary method, asymmetric); the recipe's WeightSpec.label
    "exact": ("exact", False),
    "exact+asym": ("exact", True),
    "twn": ("twn", False),
    "twn+asym": ("twn", True),
    "absmean": ("absmean", False),
    "binary": ("binary", False),
}
KEY_COLUMNS = ("model", *RECIPE_KEY)
COLUMNS = (
    *KEY_COLUMNS, "top1", "top5", "mult_eliminated_pct", "bits_per_weight", "potential_speedup",
    "quantized_mult_eliminated_pct", "model_bits_per_weight", "dataset", "experiment",
    "num_test", "num_calib", "num_repair", "num_fit", "calibration", "seed", "eval_images_per_s",
    "quant_seconds", "point_seconds", "top1_rounded_multipliers", "git_revision", "date",
    "num_recon", "recon_iters", "recon_batch", "recon_qdrop", "recon_unit", "recon_seconds", "point_cpu_seconds",
)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """An experiment: a model, its data, and a grid of quantization recipes.

    checkpoint: a PyTorch checkpoint (.th/.pth, converted on the fly) or an orbax directory written
      by `python -m fgq_jax.convert`. "{shared}" expands to the shared data root.
    recipe: the settings every point shares (calibration, image budgets, repair options, seed); the
      grid fields below vary the rest:
    group_sizes: ints, "channel" (per output channel) or "tensor" (one scale per tensor).
    act_bits: None (full precision) or ints.
    methods: keys of METHODS.
    repairs: tuples of names from fgq_jax.recipe.REPAIRS; () is plain post-training ternarization.
    include_fp: also the FP-weight reference at each activation setting (with BN re-estimation
      where a repair set uses it).
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
    recipe: QuantRecipe = QuantRecipe()
    # Also evaluate each ternary point with its group scales rounded to the integer path's int8
    # multipliers (alpha_g ~ m_g * s_k, fgq_jax.integer): column top1_rounded_multipliers.
    integer_rounding: bool = False
    test_split: str = "test"
    test_limit: int | None = None  # smoke tests only: n test images (loading.balanced_subset)
    calib_split: str = "train"
    batch_size: int = 500

    def __post_init__(self):
        if isinstance(self.recipe, Mapping):
            object.__setattr__(self, "recipe", QuantRecipe.make(**self.recipe))
        if not isinstance(self.recipe, QuantRecipe):
            raise ValueError(f"SweepConfig.recipe must be a QuantRecipe, got {self.recipe!r}")
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
        if self.batch_size < 1 or (self.test_limit is not None and self.test_limit < 1):
            raise ValueError(f"batch_size and test_limit must be >= 1, got {self.batch_size}, {self.test_limit}")
        # every point's recipe is built (and so validated) now, before any model or data is loaded
        object.__setattr__(self, "_points", tuple(self._grid()))

    def _grid(self):
        bn_variants = sorted({("bn_reestimate",) if "bn_reestimate" in r else () for r in self.repairs})
        for act in self.act_bits:
            if self.include_fp:  # FP weights; with BN re-estimation too when a repair set uses it
                for rep in bn_variants:
                    yield self._recipe("fp", None, act, "fp", rep)
            for first_last, method, n, rep in itertools.product(
                self.first_last, self.methods, self.group_sizes, self.repairs
            ):
                yield self._recipe(method, n, act, first_last, rep)

    def _recipe(self, method, n, act, first_last, rep) -> QuantRecipe:
        ternary, asym = (method, False) if method == "fp" else METHODS[method]
        return self.recipe.replace(
            method=ternary, asymmetric=asym, group_size=n, act_bits=act, first_last=first_last,
            **{r: r in rep for r in REPAIRS},
        )

    def points(self) -> list[QuantRecipe]:
        """Every point of the grid, FP references first at each activation setting; ordered by
        activation setting so each compiled forward is reused back to back."""
        return list(self._points)


def point_key(model: str, row_or_recipe) -> tuple[str, ...]:
    """The CSV key of a point (model + the recipe's key columns, CSV-spelled). A repair column that
    a row lacks or leaves empty (written before that repair existed) reads as false."""
    key = row_or_recipe.key() if isinstance(row_or_recipe, QuantRecipe) else row_or_recipe
    cells = [fileio.format_value(key.get(c)) for c in RECIPE_KEY]
    return (model, *(("false" if c in REPAIRS and v == "" else v) for c, v in zip(RECIPE_KEY, cells)))


def accounting_columns(spec, variables, recipe: QuantRecipe,
                       act_bits: Mapping[str, tuple[int, bool]] | None = None) -> dict[str, float]:
    """Multiplications eliminated, bits per weight and the paper's speedup model for one point.

    mult_eliminated_pct and potential_speedup are for the whole network (full-precision first/last
    layers included); quantized_mult_eliminated_pct is over the ternary layers alone (the paper's
    1 - 1/N); bits_per_weight is over the ternary layers (codes + fp16 scales), model_bits_per_weight
    over every conv/dense kernel.
    act_bits: ``ActConfig.spec()`` ({layer path: (bits, signed)}); given, the binary layers (binary
    weights x 1-bit activations) are counted too: binary_ops (XNOR/AND + popcount bit operations per
    example), binary_ops_pct (of all MACs), and potential_speedup uses the binary factor for them
    (`fgq_jax.accounting`). Not given (the sweep rows): every quantized layer is in the ternary model.
    """
    layers = accounting.layer_shapes(spec.module, variables, spec.input_shape)
    quant = transforms.quantized_paths(variables["params"], recipe.rules(spec.first_layer, spec.last_layer))
    report = accounting.count_ops(layers, quant, scale_bits=16, act_bits=act_bits)
    ternary = [r for r in report.rows if r.quant.startswith("ternary")]
    t_macs = sum(r.macs for r in ternary)
    t_mults = sum(r.mults for r in ternary)
    return {
        "mult_eliminated_pct": 100.0 * report.eliminated,
        "quantized_mult_eliminated_pct": 100.0 * (1 - t_mults / t_macs) if t_macs else 0.0,
        "bits_per_weight": report.ternary_bits_per_weight if ternary else 32.0,
        "model_bits_per_weight": report.bits_per_weight,
        "potential_speedup": report.potential_speedup,
        **({} if act_bits is None else {"macs": report.macs, "binary_ops": report.binary_ops,
                                        "binary_ops_pct": 100.0 * report.binary_ops / report.macs}),
    }


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
    root = Path(out_root) if out_root else fileio.REPO_ROOT / "results"
    base = root / cfg.dataset / cfg.model / cfg.name
    return base.with_suffix(".csv"), base.with_suffix(".json")


def point_row(cfg: SweepConfig, recipe: QuantRecipe, spec, variables_fp, result, **extra) -> dict:
    """The results row of one evaluated point: its key and settings derived from the recipe, its
    accuracy (an `EvalResult`), and the accounting columns."""
    act, rep = recipe.activations, recipe.repairs
    cal = act.calibration
    return {
        "model": cfg.model,
        **recipe.key(),
        "top1": result.top1,
        "top5": result.top5,
        **accounting_columns(spec, variables_fp, recipe),
        "dataset": cfg.dataset,
        "experiment": cfg.name,
        "num_test": result.num_images,
        "num_calib": act.num_calib if act.bits else 0,
        "num_repair": rep.num_repair if rep.any else 0,
        "num_fit": rep.num_fit if rep.scale_fit else 0,
        "num_recon": rep.num_recon if rep.reconstruct else 0,
        "recon_iters": rep.recon_iters if rep.reconstruct else 0,
        "recon_batch": rep.recon_batch if rep.reconstruct else 0,
        "recon_qdrop": rep.recon_qdrop if rep.reconstruct else 0,
        "recon_unit": rep.recon_unit if rep.reconstruct else "",
        "calibration": cal.method + ("+pow2" if cal.pow2 else ""),
        "seed": recipe.seed,
        "eval_images_per_s": result.images_per_s,
        **extra,
    }


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
    mesh=None,
) -> Path:
    """Evaluate every unfinished point of `cfg` (this worker's share); returns the CSV path.

    evaluators: optional dict that receives the compiled `Evaluator` of each activation setting
    (keyed by its ActConfig), e.g. to check how often the forward was compiled.
    mesh: optional `jax.sharding.Mesh`; evaluation shards each batch over it (`fgq_jax.distributed`).
    """
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker index {worker} out of range for {num_workers} workers")
    csv_path, json_path = results_paths(cfg, out_root)
    done = {point_key(cfg.model, r) for r in fileio.read_csv(csv_path)}
    points = partition_points(cfg.points(), worker, num_workers)
    todo = [p for p in points if point_key(cfg.model, p) not in done]
    meta = results.run_metadata(
        seed=cfg.recipe.seed, experiment=dataclasses.asdict(cfg), config_file=config_file
    )

    meta_as_saved = json.loads(json.dumps(meta, default=str))  # as it reads back from the JSON

    def write_json(rows):  # under the CSV's lock: the JSON always matches the CSV
        runs = _previous_runs(json_path)
        runs = runs if meta_as_saved in runs else runs + [meta_as_saved]
        fileio.write_json(json_path, {"metadata": meta_as_saved, "runs": runs, "rows": list(rows)})

    if todo:
        spec, variables_fp = load_model(cfg.model, cfg.checkpoint)
        test_x, test_y = load_labeled(cfg.dataset, cfg.test_split, cfg.test_limit)
        calib, repair = sample_images(cfg.dataset, cfg.calib_split, cfg.recipe)
        evaluators = {} if evaluators is None else evaluators
        evaluated = {}  # network_fingerprint -> EvalResult of this run
        calibrated = {}  # shared by the points: a repaired point's first calibration is the plain one's
        bar = tqdm(todo, desc=cfg.name, unit="point", disable=not progress)
        for recipe in bar:
            t0, c0 = time.perf_counter(), time.process_time()
            bar.set_postfix_str(recipe.describe())
            q = quantize_model(spec, variables_fp, recipe, calib, repair, calibrations=calibrated)
            quant_seconds = time.perf_counter() - t0
            ev = evaluators.get(q.act_cfg)
            if ev is None:
                ev = evaluators[q.act_cfg] = Evaluator(spec.module, spec.dataset_family, q.act_cfg, mesh=mesh)
            # A point whose network is bit for bit one evaluated before (N=1 is the FP network, with
            # or without the repairs) has its accuracy already: the forward is deterministic.
            fingerprint = network_fingerprint(q.variables, q.act_cfg, q.act_steps)
            r = evaluated.get(fingerprint)
            if r is None:
                r = evaluated[fingerprint] = ev(
                    q.variables, test_x, test_y, q.act_steps, batch_size=cfg.batch_size,
                    progress=recipe.describe() if progress else False)
            extra = {}
            if cfg.integer_rounding and q.ternary_params is not None:
                r_int = ev(rounded_variables(q), test_x, test_y, q.act_steps,
                           batch_size=cfg.batch_size, progress=False)
                extra["top1_rounded_multipliers"] = r_int.top1
            row = point_row(
                cfg, recipe, spec, variables_fp, r, **extra,
                quant_seconds=quant_seconds, point_seconds=time.perf_counter() - t0,
                # CPU seconds of this process (all its threads) for the point: the cost on a busy,
                # shared machine, where wall time also counts other users' work
                point_cpu_seconds=time.process_time() - c0,
                recon_seconds=q.seconds.get("reconstruct", 0.0),
                # which run made this row: a resumed or extended sweep mixes runs (see "runs")
                git_revision=meta["git_revision"], date=meta["date"],
            )
            fileio.append_rows_locked(csv_path, [row], KEY_COLUMNS, COLUMNS, then=write_json)
    rows = fileio.read_csv(csv_path)
    if rows and not json_path.exists():
        write_json(rows)
    if plots and rows:
        from fgq_jax import plots as plots_lib

        plots_lib.plot_sweep(rows, csv_path.with_suffix(""), title=f"{cfg.model} on {cfg.dataset}")
    return csv_path


def network_fingerprint(variables, act_cfg, act_steps) -> str:
    """SHA-256 of everything an evaluation depends on besides the data: every array of
    ``variables`` and ``act_steps`` (dtype, shape, bytes, tree structure) and the ActConfig."""
    return transforms.tree_fingerprint((repr(act_cfg), variables, dict(act_steps or {})))


def rounded_variables(q) -> dict:
    """q's variables with every ternary kernel's scales rounded to int8 multipliers (repairs kept)."""
    params = jax.tree.map(
        lambda t, v: rounded_fake_quant(t) if is_ternary(t) else v,
        q.ternary_params, q.variables["params"], is_leaf=is_ternary,
    )
    return {**q.variables, "params": params}
