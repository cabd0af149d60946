"""What every experiment CLI shares: ``--config`` with ``--set key=value`` overrides, ``--mesh``
(shard each batch over all devices, multi-host when the jax.distributed environment is set),
``--cpu-devices`` (one JAX device per CPU core, so evaluation keeps every core busy) and the
persistent XLA compilation cache."""
from __future__ import annotations

import argparse
import os

from fgq_jax.fileio import REPO_ROOT

COMPILATION_CACHE = REPO_ROOT / ".cache" / "jax"


def add_common_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required,
                        help="config file (experiments/configs/*.py)"
                             + ("" if config_required else "; default: the config class's defaults"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field or a recipe setting (repeatable), e.g. "
                             "--set group_size=16 --set act_bits=4")
    parser.add_argument("--mesh", action="store_true",
                        help="shard each batch over all devices (jax.sharding; multi-host when the "
                             "jax.distributed environment variables are set)")
    parser.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                        help="split the CPU into N JAX devices; evaluation gives them whole batches "
                             "in turn, with the same numbers as one device (default: one per core, "
                             "at most 8; 1 with --mesh; a count already set in XLA_FLAGS or "
                             "JAX_NUM_CPU_DEVICES is kept)")


MAX_AUTO_CPU_DEVICES = 8


def configure_cpu_devices(n: int | None, mesh: bool = False, env=None) -> int | None:
    """Set ``jax_num_cpu_devices`` before JAX starts its backends; returns the count set, or None
    when it is left alone (a count the user already forced; one device for a ``--mesh`` run, whose
    sharded programs XLA compiles differently from the single-device one; JAX already started, for
    the default count; an explicit ``n`` then raises RuntimeError).

    Why: XLA's CPU convolutions at ResNet-20's widths mostly run on one thread, so one device leaves
    the second core idle during evaluation; the `Evaluator` gives whole batches to each device in
    turn (BENCHMARKS.md, issue 15)."""
    import jax

    env = os.environ if env is None else env
    auto = n is None
    if auto:
        forced = "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
        if mesh or forced or env.get("JAX_NUM_CPU_DEVICES"):
            return None
        n = min(os.cpu_count() or 1, MAX_AUTO_CPU_DEVICES)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--cpu-devices must be an integer >= 1, got {n!r}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX already runs (the CLI called from Python): keep its devices
        if not auto:
            raise
        return None
    return n


def compilation_cache_dir() -> str:
    """Where compiled XLA programs persist: the folder a user already gave JAX
    (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), else <repo>/.cache/jax (``make clean``
    empties it)."""
    import jax

    return jax.config.jax_compilation_cache_dir or str(COMPILATION_CACHE)


def enable_compilation_cache() -> None:
    """Persist compiled XLA programs (:func:`compilation_cache_dir`): a resumed or extended run (and
    the next experiment on the same model) then skips the per-shape compilations."""
    import jax

    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup(prog: str, args, config_cls):
    """(config with overrides applied, mesh or None). A bad config file or override ends the CLI
    with its message, before any model or data is loaded."""
    from fgq_jax import distributed
    from fgq_jax.configfile import load_config, parse_overrides, replace_config

    try:
        if args.config is None:
            cfg = replace_config(config_cls(), **parse_overrides(args.overrides))
        else:
            cfg = load_config(args.config, args.overrides, config_cls)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    try:
        configure_cpu_devices(args.cpu_devices, mesh=args.mesh)
    except (ValueError, RuntimeError) as e:  # RuntimeError: JAX's backends already started
        raise SystemExit(f"{prog}: {e}") from None
    mesh = None
    if args.mesh:
        distributed.maybe_initialize_distributed()
        mesh = distributed.data_mesh()
    enable_compilation_cache()
    return cfg, mesh
