"""Helpers shared by the benchmark scripts: machine description, interleaved timing with medians,
markdown tables, JSON/markdown result files, and a one-pass activation-step estimate.

Benchmarks are scripts (``python -m benchmarks.<name>``), never timed tests. Each one returns a
result dict ``{"name", "title", "columns", "rows", "notes", "meta"}`` from ``run(args)``; ``main``
prints it as a markdown table and, with ``--out DIR``, writes ``DIR/<name>.json`` and ``.md``.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (jax backend, devices, CPU, load)."""
    import jax
    import numpy as np

    dev = jax.devices()
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        mem_gib = None
    info = {
        "hostname": socket.gethostname(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in dev],
        "device_kind": dev[0].device_kind,
        "gpu": _gpu_name() if jax.default_backend() == "gpu" else None,
        "cpu": _cpu_model(),
        "cpus": _usable_cpus(),
        "mem_gib": round(mem_gib, 1) if mem_gib else None,
        "loadavg_at_start": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            info["git_rev"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        pass
    return info


def machine_tag(info: Mapping[str, Any] | None = None) -> str:
    """Short file-name-safe tag: ``cpu-2c`` on this 2-core box, ``gpu-nvidia-h200`` on a GPU."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        n = (info or {}).get("cpus") or _usable_cpus()
        tag = f"cpu-{n}c"
    else:
        kind = jax.devices()[0].device_kind
        tag = f"{backend}-{kind}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in tag.lower()).strip("-")


def machine_line(info: Mapping[str, Any]) -> str:
    dev = info.get("gpu") or info.get("device_kind")
    return (f"jax {info['jax']} ({info['backend']}: {dev}), {info['cpus']} CPU(s) {info['cpu']}, "
            f"{info.get('mem_gib')} GiB RAM, load avg at start {info.get('loadavg_at_start')}")


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def block(x):
    import jax

    return jax.block_until_ready(x)


def compile_timed(fn, *args) -> tuple[Callable, float]:
    """AOT-compile a jitted ``fn`` for ``args``; returns (compiled, seconds for lower + compile)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def interleaved_medians(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Wall time of each zero-argument ``fn`` (which must block on its own result).

    Every fn first runs ``warmup`` times (untimed; ``first_s`` is the first of these), then the fns
    are timed round-robin, ``repeats`` rounds, so that load changes of a shared machine hit them
    alike. Returns ``{name: {median_s, min_s, max_s, first_s, repeats}}``.
    """
    first: dict[str, float] = {}
    for name, fn in fns.items():
        for i in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            if i == 0:
                first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
            "first_s": first[k], "repeats": len(v)}
        for k, v in times.items()
    }


# --------------------------------------------------------------------------------------------------
# activation steps for throughput runs
# --------------------------------------------------------------------------------------------------
def quick_act_steps(module, variables, x, layers: Sequence[str], bits: int = 8):
    """(ActConfig, {path: step}) from ONE unquantized forward of ``x`` (float, normalised).

    Each layer input's step is ``max|x| / qmax`` (unsigned when the sample is never negative).
    Good enough for throughput (the arithmetic does not depend on the step values); accuracy runs
    use ``fgq_jax.evaluate.calibrate_steps`` / ``fgq_jax.ptq.quantize_model`` instead, which
    calibrate layer by layer with the earlier layers already quantized.
    """
    import jax
    import jax.numpy as jnp

    from fgq_jax.activations import ActConfig
    from fgq_jax.intercept import capture_layer_io

    layers = list(layers)

    @jax.jit
    def stats(v, xb):
        cap = capture_layer_io(module, v, xb)
        return {p: (jnp.min(cap[p]), jnp.max(jnp.abs(cap[p]))) for p in layers}

    st = jax.device_get(stats(variables, x))
    cfg, steps = [], {}
    for p in layers:
        mn, amax = float(st[p][0]), float(st[p][1])
        signed = mn < 0
        qmax = (2 ** (bits - 1) - 1) if signed else (2**bits - 1)
        steps[p] = jnp.asarray(amax / qmax if amax > 0 else 1.0 / qmax, jnp.float32)
        cfg.append((p, int(bits), bool(signed)))
    return ActConfig(tuple(cfg)), steps


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.{digits - 1}f}" if a < 10 else f"{v:.1f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]],
                   headers: Mapping[str, str] | None = None) -> str:
    headers = dict(headers or {})
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def result_markdown(res: Mapping[str, Any]) -> str:
    parts = [f"### {res['title']}", "", markdown_table(res["columns"], res["rows"], res.get("headers")), ""]
    for n in res.get("notes", []):
        parts.append(f"- {n}")
    if res.get("notes"):
        parts.append("")
    return "\n".join(parts)


def _jsonable(x):
    import numpy as np

    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        return x.item()
    return x


def write_result(res: Mapping[str, Any], out_dir: str | os.PathLike | None) -> list[Path]:
    """``out_dir/<name>.json`` and ``.md`` (nothing when out_dir is None)."""
    if not out_dir:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{res['name']}.json", out / f"{res['name']}.md"
    js.write_text(json.dumps(_jsonable(dict(res)), indent=2) + "\n")
    md.write_text(result_markdown(res))
    return [js, md]


def emit(res: Mapping[str, Any], out_dir) -> None:
    print()
    print(result_markdown(res), flush=True)
    for p in write_result(res, out_dir):
        print(f"wrote {p}")


def cli_main(build_parser: Callable, run: Callable, argv=None) -> dict:
    """The benchmark CLIs' main(): parse `argv`, `run(args)`, print and write the result (--out)."""
    args = build_parser().parse_args(argv)
    res = run(args)
    emit(res, args.out)
    return res


def add_common_args(ap) -> None:
    ap.add_argument("--out", default=None, help="directory for <name>.json / <name>.md")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")


# --------------------------------------------------------------------------------------------------
# models: registry names, "package.module:attr" specs, random weights without compiling module.init
# --------------------------------------------------------------------------------------------------
def get_spec(name: str):
    """A ``fgq_jax.models.ModelSpec``: a registry name ("resnet20") or ``"package.module:attr"``
    naming a ModelSpec or a function returning one (as ``experiments.finetune`` accepts), e.g.
    ``benchmarks.common:tiny_spec`` (the smoke tests' small CNN)."""
    if ":" in name:
        import importlib

        mod_name, attr = name.split(":", 1)
        obj = getattr(importlib.import_module(mod_name), attr)
        return obj() if callable(obj) and not hasattr(obj, "module") else obj
    from fgq_jax.models import get_model

    return get_model(name)


def spec_label(spec) -> str:
    return getattr(spec, "name", None) or type(spec.module).__name__


def random_variables(spec, seed: int = 0) -> dict:
    """``{"params", "batch_stats"}`` of ``spec`` (a ModelSpec or a name) with random weights, in numpy.

    Shapes from abstract evaluation of ``module.init`` (nothing compiled): conv / dense kernels
    He-normal (std sqrt(2 / fan_in)), biases 0, BN scale 1 / bias 0 / mean 0 / var 1. Much faster than
    a jitted ``module.init`` on a loaded 2-core machine, and as good for timing and sizes.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if isinstance(spec, str):
        spec = get_spec(spec)
    x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda x: spec.module.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(s.shape), s.dtype
        if name == "kernel" and len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)).astype(dtype)
        if name in ("scale", "var"):
            return np.ones(shape, dtype)
        return np.zeros(shape, dtype)

    tree = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
    tree = jax.tree_util.tree_map_with_path(fill, tree)
    return jax.tree.map(jnp.asarray, tree)


def tiny_spec():
    """A small CNN (3 convs with BN, a dense head; 16x16x3 inputs) with the ModelSpec conventions
    ("conv_init" first, "fc" last): lets the smoke tests run every benchmark path in seconds."""
    import flax.linen as nn
    import jax.numpy as jnp

    from fgq_jax.models import ModelSpec

    class TinyNet(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            def bn(name):
                return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)

            x = nn.relu(bn("bn_init")(nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)))
            x = nn.relu(bn("bn1")(nn.Conv(16, (3, 3), strides=2, use_bias=False, name="conv1")(x)))
            x = nn.relu(bn("bn2")(nn.Conv(16, (3, 3), use_bias=False, name="conv2")(x)))
            x = jnp.mean(x, axis=(1, 2))
            return nn.Dense(self.num_classes, name="fc")(x)

    return ModelSpec(TinyNet(), "tiny", "conv_init", "fc", (16, 16, 3), 10, "cifar")
