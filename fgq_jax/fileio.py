"""Files that are never half-written: atomic file and directory writes, and results CSVs.

The one owner of these contracts (results, checkpoints, exports, caches and fine-tuning logs all use
it):

* a file is replaced whole: written to a temporary sibling, fsynced, then ``os.replace``-d, so a
  reader (or a run killed at any moment) sees the old complete file or the new complete file;
* a directory is written under a temporary sibling name and swapped in by ``rename``;
* a results CSV row is appended under an exclusive ``fcntl.flock``, so several workers (processes,
  or hosts on a filesystem whose locks work) merge their rows without loss or duplicates.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "REPO_ROOT",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "replace_dir",
    "format_value",
    "csv_text",
    "write_csv",
    "read_csv",
    "MergedRows",
    "append_rows_locked",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", perms: int = 0o644):
    """``with atomic_file(path) as f: ...`` writes ``f`` to a temporary sibling and replaces ``path``
    with it (fsynced) only when the block ends without an exception; otherwise ``path`` is untouched.
    perms: the file's permission bits (``mkstemp`` would leave 0600; results are meant to be read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, perms)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers only ever see the old or the new complete file."""
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def replace_dir(final: str | os.PathLike, write: Callable[[Path], Any], *, overwrite: bool = True) -> Path:
    """Write a directory with ``write(tmp)`` (``tmp`` exists and is empty), then swap it in for
    ``final``: a crash leaves the old or the new directory, never a half-written one.

    overwrite=False: FileExistsError if ``final`` exists (also when it appears during the write).
    Returns ``final`` as an absolute path.
    """
    final = Path(final).expanduser().absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists; refusing to overwrite it")
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / "d")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------------------------------
# results CSVs
# --------------------------------------------------------------------------------------------------
def format_value(v: Any) -> str:
    """CSV spelling: booleans as true/false, None as empty, floats with 4 decimals."""
    if isinstance(v, np.generic) or (hasattr(v, "shape") and getattr(v, "shape", None) == ()):
        v = np.asarray(v).item()
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


def _read_table(path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, complete rows) of a CSV; ([], []) when missing or empty. A row with fewer or more
    cells than the header (a torn write, a hand edit) is skipped with a warning naming its line."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = []
            for r in reader:
                if None in r or None in r.values():
                    cells = sum(v is not None for k, v in r.items() if k is not None)
                    cells += len(r.get(None) or [])
                    warnings.warn(f"{path}:{reader.line_num}: row with {cells} cells for "
                                  f"{len(header)} columns skipped (torn or hand-edited line)")
                    continue
                rows.append(r)
            return header, rows
    except FileNotFoundError:
        return [], []
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start}: the file is damaged; restore "
                         "it (or delete it to recompute its rows)") from None


def read_csv(path) -> list[dict[str, str]]:
    """All complete rows of a CSV as dicts of strings ([] when the file is missing or empty); torn
    rows are skipped with a warning (see `_read_table`)."""
    return _read_table(path)[1]


class MergedRows(list):
    """All rows of the CSV after an ``append_rows_locked`` (dicts of strings, file order), with
    ``written``: how many of the given rows were new and appended."""

    written: int = 0


def append_rows_locked(
    csv_path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    key_columns: Sequence[str],
    columns: Sequence[str] | None = None,
    then: Callable[[MergedRows], Any] | None = None,
) -> MergedRows:
    """Add ``rows`` to ``csv_path`` unless a row with the same key is already there.

    Safe with many concurrent writers: everything happens under an exclusive ``fcntl.flock`` on
    ``<csv_path>.lock``. Values are written as :func:`format_value` spells them; the key of a row is
    the tuple of its ``key_columns`` cells, and duplicates within ``rows`` are dropped too.
    ``columns`` fixes the header order of a new file (columns a row has beyond them are appended,
    never dropped). The whole file is rewritten atomically (:func:`atomic_write_text`) with the
    union header, so a crash leaves the old or the new complete file.

    Returns every row of the file after the append (a consistent snapshot taken under the lock, as
    dicts of strings) as a ``MergedRows`` list whose ``.written`` is the number of rows appended.
    then: called with that snapshot while the lock is still held (e.g. to write a JSON twin that
    always matches the CSV, whichever worker writes last).
    """
    csv_path = Path(csv_path)
    key_columns = list(key_columns)
    if not key_columns:
        raise ValueError("key_columns must name at least one column")
    for r in rows:
        missing = [k for k in key_columns if k not in r]
        if missing:
            raise ValueError(f"row lacks key columns {missing}: {dict(r)}")
    new = [{k: format_value(v) for k, v in r.items()} for r in rows]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{csv_path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            existing_header, existing = _read_table(csv_path)  # a torn row is dropped here
            seen = {tuple(r.get(k) or "" for k in key_columns) for r in existing}
            todo = []
            for r in new:
                key = tuple(r.get(k, "") for k in key_columns)
                if key not in seen:
                    seen.add(key)
                    todo.append(r)
            result = MergedRows(existing)
            result.written = len(todo)
            if todo:
                header = list(existing_header) or list(columns or [])
                for r in todo:
                    header += [k for k in r if k not in header]
                result[:] = [{k: r.get(k, "") for k in header} for r in existing + todo]
                atomic_write_text(csv_path, csv_text(result, header))
            if then is not None:
                then(result)
            return result
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
