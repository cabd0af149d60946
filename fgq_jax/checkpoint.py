"""Save / load Flax variables (``{"params": ..., "batch_stats": ...}``) with orbax-checkpoint.

On-disk layout of a saved directory ``DIR``::

    DIR/metadata.json   # JSON: user metadata (model, source sha256, ...) + format, versions, git rev
    DIR/variables/      # orbax PyTreeCheckpointer checkpoint of the variables (numpy float arrays)

Saving is atomic (`fgq_jax.fileio.replace_dir`): a crash never leaves a half-written ``DIR``. An
existing ``DIR`` is only replaced with ``overwrite=True``, and only if it is empty or itself a
saved-variables directory. Every array's sha256 digest is stored in the metadata and checked on
load, so flipped bytes are an error naming the array, never silently different numbers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgq_jax.fileio import replace_dir
from fgq_jax.results import git_revision
from fgq_jax.transforms import path_to_str

FORMAT = "fgq-jax-variables"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit what loads it: a PyTorch file whose keys or shapes are not the
    model's (`fgq_jax.convert`), or a fine-tuning checkpoint made with another config or state
    layout (`fgq_jax.train` resume). The message says what differs.

    Attributes (listed by the converter, empty otherwise; in the checkpoint's own naming):
    ``missing`` (keys the model needs but the checkpoint lacks), ``unexpected`` (keys the model has
    no place for), ``shape_mismatches`` (``(key, checkpoint_shape, expected_shape)`` triples).
    """

    def __init__(self, message: str, missing=(), unexpected=(), shape_mismatches=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatches = list(shape_mismatches)

    def __reduce__(self):  # picklable with its attributes (e.g. across multiprocessing)
        return (type(self), (str(self), self.missing, self.unexpected, self.shape_mismatches))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that define the saved format and numerics."""
    import flax
    import orbax.checkpoint as ocp

    versions = {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__}
    versions["orbax-checkpoint"] = getattr(ocp, "__version__", "unknown")
    return versions


def array_digest(a) -> str:
    """sha256 (hex) of an array's dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def tree_digests(tree: Any) -> dict[str, str]:
    """{'/'-joined leaf path: array_digest} of every array leaf of a pytree."""
    return {path_to_str(p): array_digest(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def verify_digests(tree: Any, digests: Mapping[str, str], where: str) -> None:
    """ValueError naming `where` and the first array whose digest differs from the stored one (or
    that is missing / unexpected): the file was damaged after it was written."""
    now = tree_digests(tree)
    for key in sorted(set(now) | set(digests)):
        if now.get(key) != digests.get(key):
            what = ("is missing" if key not in now else "was not saved" if key not in digests
                    else "does not match its stored sha256 checksum")
            raise ValueError(f"{where}: array {key!r} {what}: the file is damaged (or was edited); "
                             "restore it from a good copy or write it again")


def _is_saved_dir(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _validate_variables(variables: Any) -> dict[str, dict]:
    """Check the ``{collection: nested dict of arrays}`` shape and convert leaves to numpy."""
    if not isinstance(variables, Mapping) or not variables:
        raise ValueError(f"variables must be a non-empty dict of collections, got {type(variables).__name__}")

    def to_np(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"variables leaves must be arrays, got {type(x).__name__}")
        return np.asarray(x)  # host copy: orbax then saves plain arrays without device sharding

    out = {}
    for name, tree in variables.items():
        if not isinstance(name, str) or not isinstance(tree, Mapping):
            raise ValueError(f"variables[{name!r}] must be a (possibly empty) dict of arrays")
        out[name] = jax.tree.map(to_np, dict(tree))
    return out


def save_variables(
    directory: str | os.PathLike,
    variables: Mapping[str, Mapping],
    metadata: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save ``variables`` (e.g. ``{"params": ..., "batch_stats": ...}``) and ``metadata`` to ``directory``.

    ``metadata`` must be JSON-serialisable (model name, source file sha256, ...); ``format``,
    ``collections``, ``num_params``, ``versions``, ``git_rev`` and ``created_utc`` are added (the
    latter three only if absent). Returns the absolute directory path.

    Raises FileExistsError if ``directory`` exists and ``overwrite`` is False (or it exists, is not
    empty and is not a saved-variables directory), ValueError for bad variables/metadata.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).expanduser().absolute()
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        if not directory.is_dir() or (any(directory.iterdir()) and not _is_saved_dir(directory)):
            raise FileExistsError(f"{directory} exists and is not a saved-variables directory; refusing to replace it")
    tree = _validate_variables(variables)
    meta = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_revision(),
        "versions": library_versions(),
        **dict(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "collections": sorted(tree),
        "num_params": int(sum(x.size for x in jax.tree.leaves(tree.get("params", {})))),
        "digests": tree_digests(tree),
    }
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e

    def write(tmp: Path) -> None:
        # orbax does not save empty subtrees (AlexNet has no batch_stats); "collections" restores them.
        to_save = {k: v for k, v in tree.items() if jax.tree.leaves(v)}
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(tmp / VARIABLES_DIR, to_save)
        (tmp / METADATA_FILE).write_text(meta_text + "\n")

    return replace_dir(directory, write)


def restore_numpy_tree(ckpt_path: Path):
    """Restore an orbax PyTree checkpoint with numpy leaves; a damaged one is a ValueError.

    Restoring as numpy avoids orbax's sharding guesswork (and its warnings) on a fresh process.
    """
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            item_meta = ckptr.metadata(ckpt_path)
            tree_meta = getattr(item_meta, "item_metadata", item_meta)
            tree_meta = getattr(tree_meta, "tree", tree_meta)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta)
            return ckptr.restore(ckpt_path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise ValueError(f"{ckpt_path}: could not restore the orbax checkpoint: {type(e).__name__}: {e}") from e


def read_format_metadata(
    directory: Path, filename: str, fmt: str, version: int, *, what: str, writer: str
) -> dict[str, Any]:
    """The JSON metadata `directory/filename` of a saved directory, checked to be `fmt` at a format
    version this code can read (<= `version`). `what` names the kind of directory and `writer` the
    function that writes it, for the error messages.

    Raises FileNotFoundError (no such directory) or ValueError (metadata missing, unreadable, of
    another format or of a newer version).
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"no {what} at {directory} (directory not found)")
    meta_path = directory / filename
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} is not a {what} directory: {filename} is missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: unreadable metadata: {e}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != fmt:
        raise ValueError(f"{meta_path}: not written by {writer} (format != {fmt!r})")
    if metadata.get("format_version", 0) > version:
        raise ValueError(f"{meta_path}: format version {metadata['format_version']} is newer than this code")
    return metadata


def load_variables(directory: str | os.PathLike) -> tuple[dict[str, dict], dict[str, Any]]:
    """Load what save_variables wrote: ``(variables, metadata)``.

    ``variables`` is a plain nested dict of jax arrays with the saved dtypes, e.g.
    ``{"params": {...}, "batch_stats": {...}}``, ready for ``module.apply``.
    Raises FileNotFoundError (no such directory) or ValueError (not a saved-variables directory,
    unreadable metadata or checkpoint).
    """
    directory = Path(directory).expanduser().absolute()
    metadata = read_format_metadata(
        directory, METADATA_FILE, FORMAT, FORMAT_VERSION,
        what="saved variables", writer="fgq_jax.checkpoint.save_variables",
    )
    ckpt_path = directory / VARIABLES_DIR
    if not ckpt_path.is_dir():
        raise ValueError(f"{directory}: {VARIABLES_DIR}/ is missing (incomplete or damaged save)")
    restored = restore_numpy_tree(ckpt_path)
    if "digests" in metadata:  # saves from before checksums have none
        verify_digests(dict(restored), metadata["digests"], str(ckpt_path))
    variables = {k: jax.tree.map(jnp.asarray, dict(v)) for k, v in dict(restored).items()}
    for name in metadata.get("collections", []):
        variables.setdefault(name, {})
    return variables, metadata
