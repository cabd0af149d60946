"""The metadata every result carries (git revision, package versions, seed, date, machine), and the
reading order of results columns. Files are written by `fgq_jax.fileio` (atomic)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from fgq_jax.fileio import REPO_ROOT

PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets",
    "tensorflow-cpu", "pillow", "torch", "qwix",
)


def act_bits_order(bits: str) -> tuple:
    """Sort key of an act_bits CSV value in reading order: "fp" first, then 8, 4, 2 bits."""
    if bits == "fp":
        return (0, 0)
    return (1, -int(bits)) if bits.isdigit() else (2, bits)


# short names of the repairs in table heads and plot legends, in the order they are written
REPAIR_ABBREV = {"equalize": "eq", "bn_reestimate": "BN", "bias_correct": "bias", "scale_fit": "fit",
                 "reconstruct": "recon", "recalibrate": "recal"}


def repairs_label(row) -> str:
    """The repairs a results row (CSV strings) was made with, e.g. "BN+bias+recon"; "" for none."""
    return "+".join(n for k, n in REPAIR_ABBREV.items() if row.get(k) == "true")


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: this repository), with a
    ``-dirty`` suffix when tracked files are modified; None outside a git checkout."""
    cwd = Path(path) if path is not None else REPO_ROOT
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def run_metadata(seed: int | None = None, **extra) -> dict[str, Any]:
    """What makes a result reproducible: code revision, versions, seed, date, machine."""
    import jax

    return {
        "git_revision": git_revision() or "unknown",
        "packages": package_versions(),
        "python": platform.python_version(),
        "seed": seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
        },
        **extra,
    }
