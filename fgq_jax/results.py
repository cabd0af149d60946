"""Result files: atomic CSV/JSON writes and the metadata every result carries.

A results file is always replaced whole (write a temporary sibling, fsync, `os.replace`), so a run
killed at any moment leaves either the previous complete file or the new complete file.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow-datasets",
    "tensorflow-cpu", "pillow", "torch", "qwix",
)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers only ever see the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_value(v: Any) -> str:
    """CSV spelling: booleans as true/false, None as empty, floats with 4 decimals."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: format_value(row.get(c)) for c in columns})
    return buf.getvalue()


def write_csv(path, rows, columns) -> None:
    atomic_write_text(path, csv_text(rows, columns))


def read_csv(path) -> list[dict[str, str]]:
    """Rows of a CSV written by `write_csv` ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def act_bits_order(bits: str) -> tuple:
    """Sort key of an act_bits CSV value in reading order: "fp" first, then 8, 4, 2 bits."""
    if bits == "fp":
        return (0, 0)
    return (1, -int(bits)) if bits.isdigit() else (2, bits)


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


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
