"""Manual files of the project's own tfds builders: sha256 check, tarball streaming, Pillow decode.

Shared by :mod:`fgq_jax.data.cifar10_jpeg` and :mod:`fgq_jax.data.imagenet_subset` (their tfds
builders and their tfds-free readers). No TensorFlow import. Every error names the dataset and the
offending file (and member), as :class:`DataNotFoundError` (missing) or :class:`CorruptDataError`
(present but damaged, unexpected layout, wrong sha256).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from PIL import Image

from fgq_jax.data.errors import CorruptDataError, DataNotFoundError

_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def sha256_of(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_manual_files(
    dataset: str,
    manual_dir,
    needed: Mapping[str, str],
    sha256: Mapping[str, str],
    instructions: Callable[[object], str],
    *,
    verify_sha256: bool = True,
) -> dict[str, str]:
    """Checks that ``manual_dir`` holds the files ``needed`` (and their published sha256).

    Args:
      dataset: name used in the messages, e.g. "cifar10_jpeg".
      manual_dir: the directory (None: not given).
      needed: {file name: what it is for, e.g. "split 'test'"}, checked in this order.
      sha256: {file name: published hex sha256}.
      instructions: manual_dir -> the dataset's instructions, appended to every message.
      verify_sha256: compare each file's sha256 with ``sha256`` (reads the whole file).

    Returns:
      {file name: path}.

    Raises:
      DataNotFoundError: the dir or a file is missing (the message says where it was expected).
      CorruptDataError: a file's sha256 differs from the published one.
    """
    if manual_dir is None:
        raise DataNotFoundError(f"No manual dir given for {dataset}.\n" + instructions(None))
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise DataNotFoundError(
            f"{dataset} manual dir {manual_dir!r} does not exist (expected {', '.join(needed)} in it).\n"
            + instructions(manual_dir)
        )
    paths = {}
    for fname, purpose in needed.items():
        path = os.path.join(manual_dir, fname)
        if not os.path.isfile(path):
            raise DataNotFoundError(
                f"{dataset}: {fname} for {purpose} not found; expected it at {path!r}.\n"
                + instructions(manual_dir)
            )
        if verify_sha256:
            got, want = sha256_of(path), sha256[fname]
            if got != want:
                raise CorruptDataError(
                    f"{dataset}: {path!r} is corrupt or not the published file: sha256 {got}, "
                    f"expected {want} for {fname} (in the manual dir {manual_dir!r}). "
                    f"Replace it with the original file.\n" + instructions(manual_dir)
                )
        paths[fname] = path
    return paths


def check_split_files(
    dataset: str,
    manual_dir,
    splits,
    tarballs: Mapping[str, str],
    sha256: Mapping[str, str],
    instructions: Callable[[object], str],
    *,
    extra: Mapping[str, str] | None = None,
    verify_sha256: bool = True,
) -> dict[str, str]:
    """:func:`check_manual_files` for the tarballs of ``splits`` (None: all of ``tarballs``, a
    {split: file name} map) plus the ``extra`` {file name: purpose} files; returns {split: path}.

    Raises ValueError naming the known splits for an unknown one (before looking at the disk).
    """
    splits = tuple(tarballs) if splits is None else tuple(splits)
    unknown = [s for s in splits if s not in tarballs]
    if unknown:
        raise ValueError(f"{dataset} has splits {sorted(tarballs)}, not {unknown[0]!r}")
    needed = {tarballs[s]: f"split {s!r}" for s in splits} | dict(extra or {})
    files = check_manual_files(dataset, manual_dir, needed, sha256, instructions, verify_sha256=verify_sha256)
    return {s: files[tarballs[s]] for s in splits}


def manual_dir_of(dl_manager, dataset: str, instructions: Callable[[object], str]) -> str:
    """The manual dir of a tfds download manager, without tfds' generic AssertionError when none
    was given (DataNotFoundError with the dataset's instructions instead); the builders' own checks
    then say where each file was expected."""
    manual_dir = getattr(dl_manager, "_manual_dir", None)
    if manual_dir is None:
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as e:
            raise DataNotFoundError(f"{dataset}: no manual dir.\n" + instructions(None)) from e
    return os.fspath(manual_dir)


def read_tar(path, dataset: str, check_member: Callable[[str], None]) -> list[tuple[str, bytes]]:
    """Streams a tarball (no seeking, nothing written to disk); returns [(member path, bytes)] of its
    regular files, sorted by path, with a leading ``./`` stripped and hidden files (``.*``, e.g.
    macOS ``._`` files) skipped.

    ``check_member(name)`` is called on every kept member path and raises CorruptDataError for an
    unexpected one. A missing file raises DataNotFoundError, a truncated/damaged archive
    CorruptDataError naming the file.
    """
    path = os.fspath(path)
    items = []
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name.split("/")[-1].startswith("."):
                    continue
                check_member(name)
                items.append((name, tar.extractfile(member).read()))
    except CorruptDataError:
        raise
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{dataset}: tarball {path!r} not found") from e
    except _TAR_ERRORS as e:
        raise CorruptDataError(
            f"{dataset}: cannot read {path!r} (truncated or damaged archive: "
            f"{type(e).__name__}: {e}). Replace it with the original {os.path.basename(path)}."
        ) from e
    items.sort(key=lambda item: item[0])
    return items


def decode_rgb(data: bytes, dataset: str, name: str = "<bytes>", path: str = "") -> np.ndarray:
    """Pillow decode, converted to RGB (grayscale / CMYK files too) -> uint8 [H, W, 3].

    CorruptDataError naming the member and the tarball if the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise CorruptDataError(f"{dataset}: member {name!r} of {path!r} is not a decodable image ({e})") from e


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG encoding (Pillow) of a uint8 [H, W, 3] image, as the builders store it.

    ``compress_level`` (zlib, 0-9; Pillow's default 6) trades file size for encoding time only.
    """
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def stack_examples(examples: Iterable[tuple[str, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(id, image uint8 [H, W, 3], label) examples -> (images uint8 [N, H, W, 3], labels int32 [N],
    ids str [N]), in the given order."""
    images, labels, ids = [], [], []
    for name, image, label in examples:
        images.append(image)
        labels.append(label)
        ids.append(name)
    return np.stack(images), np.asarray(labels, np.int32), np.asarray(ids, dtype=str)
