"""Reading CIFAR-10-JPEG tarballs with Pillow alone (no TensorFlow, no tensorflow-datasets).

This is the single place where the manual tarballs are turned into examples: the tfds builder
(:mod:`fgq_jax.data.cifar10_jpeg.cifar10_jpeg`) calls :func:`iter_examples` in its
``_generate_examples``, and :func:`fgq_jax.data.load_arrays` calls :func:`read_split` directly when
tensorflow-datasets is not importable. Both paths therefore see the same members, in the same order,
decoded by the same function, i.e. identical arrays by construction (the builder stores Pillow's
pixels as lossless PNG).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from fgq_jax.data import cifar10_jpeg as _meta
from fgq_jax.data import manual
from fgq_jax.data.errors import CorruptDataError

_IMAGE_SUFFIXES = (".jpg", ".jpeg")
_LABEL_OF = {name: i for i, name in enumerate(_meta.CLASS_NAMES)}


def read_tar_members(path: str, split: str) -> list[tuple[str, bytes]]:
    """Streams a tarball; returns [(member path, JPEG bytes)] of ``<split>/<class>/<file>.jpg``,
    sorted by path.

    Raises CorruptDataError (naming the file) on a truncated/damaged archive or an unexpected layout.
    """

    def check(name: str) -> None:
        parts = name.split("/")
        if (
            len(parts) != 3
            or parts[0] != split
            or parts[1] not in _meta.CLASS_NAMES
            or not parts[2].lower().endswith(_IMAGE_SUFFIXES)
        ):
            raise CorruptDataError(
                f"cifar10_jpeg: unexpected member {name!r} in {path!r}; expected "
                f"{split}/<class>/<NNNN>.jpg with <class> one of "
                f"{', '.join(_meta.CLASS_NAMES)}."
            )

    items = manual.read_tar(path, _meta.NAME, check)
    if not items:
        raise CorruptDataError(f"cifar10_jpeg: {path!r} holds no {split}/<class>/*.jpg images")
    return items


def decode_jpeg(data: bytes, name: str = "<bytes>", path: str = "") -> np.ndarray:
    """Pillow decode (RGB) -> uint8 [32, 32, 3]; CorruptDataError naming the member if undecodable."""
    arr = manual.decode_rgb(data, _meta.NAME, name, path)
    if arr.shape != _meta.IMAGE_SHAPE:
        raise CorruptDataError(
            f"cifar10_jpeg: member {name!r} of {path!r} has shape {arr.shape}, "
            f"expected {_meta.IMAGE_SHAPE}"
        )
    return arr


def iter_examples(tar_path, split: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """Yields (id = member path, image uint8 [32, 32, 3] decoded by Pillow, label) of one tarball.

    Order: sorted member paths (``<split>/airplane/0000.jpg`` first). This is the builder's example
    generator without the tfds part (the builder only PNG-encodes the image).
    """
    path = os.fspath(tar_path)
    for name, data in read_tar_members(path, split):
        yield name, decode_jpeg(data, name, path), _LABEL_OF[name.split("/")[1]]


def read_split(tar_path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All examples of one tarball as arrays: (images uint8 [N, 32, 32, 3], labels int32 [N],
    ids str [N]), in :func:`iter_examples` order."""
    return manual.stack_examples(iter_examples(tar_path, split))
