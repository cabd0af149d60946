"""What every experiment CLI shares: ``--config`` with ``--set key=value`` overrides, ``--mesh``
(shard each batch over all devices, multi-host when the jax.distributed environment is set), and
the persistent XLA compilation cache."""
from __future__ import annotations

import argparse

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
    mesh = None
    if args.mesh:
        distributed.maybe_initialize_distributed()
        mesh = distributed.data_mesh()
    enable_compilation_cache()
    return cfg, mesh
