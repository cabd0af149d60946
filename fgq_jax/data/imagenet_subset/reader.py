"""Reading the ImageNet-subset tarballs with Pillow alone (no TensorFlow, no tensorflow-datasets).

The single place where the manual files become examples: the tfds builder
(:mod:`fgq_jax.data.imagenet_subset.imagenet_subset`) calls :func:`iter_examples` in its
``_generate_examples``, and :func:`fgq_jax.data.load_arrays` calls :func:`read_split` (through
``imagenet_subset.read_manual_split``) when tensorflow-datasets is not importable. Both paths see the
same members in the same (sorted) order, decoded and preprocessed by the same functions, i.e.
identical arrays (the builder stores the pixels as lossless PNG). The per-split preprocessing is
described in :mod:`fgq_jax.data.imagenet_subset`.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from fgq_jax.data import imagenet_subset as _meta
from fgq_jax.data import manual
from fgq_jax.data.errors import CorruptDataError, DataNotFoundError
from fgq_jax.data.pipeline import imagenet_preprocess

_IMAGE_SUFFIXES = (".jpg", ".jpeg")
LABELS_FILE = "labels.txt"


def read_synsets(path) -> tuple[str, ...]:
    """The wnids of synsets.txt in class-index order (1,000 ``<wnid> <names>`` lines).

    Raises DataNotFoundError if absent, CorruptDataError (naming the line) on a malformed file.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{_meta.NAME}: {_meta.SYNSETS} not found at {path!r}") from e
    wnids = []
    for i, line in enumerate(lines, 1):
        wnid = line.split(" ", 1)[0]
        if not (len(wnid) == 9 and wnid[0] == "n" and wnid[1:].isdigit()):
            raise CorruptDataError(f"{_meta.NAME}: {path!r} line {i} is not '<wnid> <names>': {line!r}")
        wnids.append(wnid)
    if len(wnids) != _meta.NUM_CLASSES or len(set(wnids)) != len(wnids):
        raise CorruptDataError(
            f"{_meta.NAME}: {path!r} lists {len(set(wnids))} distinct wnids in {len(wnids)} lines, "
            f"expected {_meta.NUM_CLASSES}"
        )
    return tuple(wnids)


def parse_labels(text: str, source: str) -> dict[str, int]:
    """``labels.txt`` content (``<file> <label>`` per line) -> {file name: label in 0..999}.

    ``source`` names the file in the CorruptDataError raised for a malformed line or a bad label.
    """
    labels = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= _meta.NUM_CLASSES:
            raise CorruptDataError(
                f"{_meta.NAME}: {source} line {i} is not '<file> <label 0..{_meta.NUM_CLASSES - 1}>': {line!r}"
            )
        if parts[0] in labels:
            raise CorruptDataError(f"{_meta.NAME}: {source} labels {parts[0]!r} twice")
        labels[parts[0]] = int(parts[1])
    return labels


def read_tar_members(path, split: str) -> list[tuple[str, bytes]]:
    """Streams a split's tarball; returns [(member path, bytes)] of ``<split>/<file>.JPEG`` (and
    ``<split>/labels.txt`` for val1300 / val20), sorted by path.

    Raises CorruptDataError (naming the file) on a truncated/damaged archive or an unexpected member.
    """
    path = os.fspath(path)
    allowed = f"{split}/<file>.JPEG" + (f" or {split}/{LABELS_FILE}" if split in _meta.LABELED_SPLITS else "")

    def check(name: str) -> None:
        parts = name.split("/")
        ok = len(parts) == 2 and parts[0] == split and (
            parts[1].lower().endswith(_IMAGE_SUFFIXES)
            or (parts[1] == LABELS_FILE and split in _meta.LABELED_SPLITS)
        )
        if not ok:
            raise CorruptDataError(f"{_meta.NAME}: unexpected member {name!r} in {path!r}; expected {allowed}")

    items = manual.read_tar(path, _meta.NAME, check)
    if not any(name.lower().endswith(_IMAGE_SUFFIXES) for name, _ in items):
        raise CorruptDataError(f"{_meta.NAME}: {path!r} holds no {split}/*.JPEG images")
    return items


def preprocess(image: np.ndarray, split: str, name: str = "<image>", path: str = "") -> np.ndarray:
    """A decoded RGB image -> the split's uint8 [227, 227, 3] (see the package docstring).

    val1300: kept as published (must already be 227x227, else CorruptDataError naming the member);
    val20 / calib1000: shorter side resized to 256 (Pillow BILINEAR, as torchvision's Resize) and
    centre-cropped to 227.
    """
    if _meta.RESIZE_AND_CROP[split]:
        return imagenet_preprocess(image, resize=_meta.RESIZE, crop=_meta.IMAGE_SIZE)
    if image.shape != _meta.IMAGE_SHAPE:
        raise CorruptDataError(
            f"{_meta.NAME}: member {name!r} of {path!r} has shape {image.shape}, expected "
            f"{_meta.IMAGE_SHAPE} (split {split!r} is used as published, without resizing)"
        )
    return image


def _labels_of(items, split: str, path: str, synsets_path) -> dict[str, int]:
    """{member path: label} for every image member of a split."""
    images = [name for name, _ in items if name.lower().endswith(_IMAGE_SUFFIXES)]
    if split not in _meta.LABELED_SPLITS:  # calib1000/<wnid>_<name>.JPEG
        index = {wnid: i for i, wnid in enumerate(read_synsets(synsets_path))}
        out = {}
        for name in images:
            wnid = name.split("/")[1].split("_", 1)[0]
            if wnid not in index:
                raise CorruptDataError(
                    f"{_meta.NAME}: member {name!r} of {path!r} does not start with a wnid of "
                    f"{_meta.SYNSETS} (expected {split}/<wnid>_<name>.JPEG)"
                )
            out[name] = index[wnid]
        return out
    labels_member = f"{split}/{LABELS_FILE}"
    text = dict(items).get(labels_member)
    if text is None:
        raise CorruptDataError(f"{_meta.NAME}: {path!r} has no {labels_member}")
    labels = parse_labels(text.decode("utf-8"), f"{labels_member} of {path!r}")
    files = {name.split("/")[1]: name for name in images}
    unlabeled = sorted(set(files) - set(labels))
    orphans = sorted(set(labels) - set(files))
    if unlabeled or orphans:
        raise CorruptDataError(
            f"{_meta.NAME}: {labels_member} of {path!r} does not match the images: "
            f"{len(unlabeled)} image(s) without a label {unlabeled[:5]}, "
            f"{len(orphans)} label(s) without an image {orphans[:5]}"
        )
    return {name: labels[file] for file, name in files.items()}


def iter_examples(tar_path, split: str, synsets_path) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yields (id = member path, image uint8 [227, 227, 3], label) of one split's tarball.

    Order: sorted member paths. ``synsets_path``: synsets.txt (labels of calib1000). This is the
    builder's example generator without the tfds part (the builder only PNG-encodes the image).
    """
    if split not in _meta.TARBALLS:
        raise ValueError(f"{_meta.NAME} has splits {sorted(_meta.TARBALLS)}, not {split!r}")
    path = os.fspath(tar_path)
    items = read_tar_members(path, split)
    labels = _labels_of(items, split, path, synsets_path)
    for name, data in items:
        if name in labels:
            image = manual.decode_rgb(data, _meta.NAME, name, path)
            yield name, preprocess(image, split, name, path), labels[name]


def read_split(tar_path, split: str, synsets_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All examples of one split as arrays: (images uint8 [N, 227, 227, 3], labels int32 [N],
    ids str [N]), in :func:`iter_examples` order."""
    return manual.stack_examples(iter_examples(tar_path, split, synsets_path))
