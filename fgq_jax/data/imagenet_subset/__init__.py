"""A small real-ImageNet subset as a tensorflow-datasets builder ("imagenet_subset").

Light on purpose (no TensorFlow import): this file holds the facts about the manual files. The
builder lives in :mod:`fgq_jax.data.imagenet_subset.imagenet_subset` (importing it, or calling
:func:`register`, registers ``"imagenet_subset"`` with tfds); the tarball reading, Pillow decode and
per-split preprocessing live in :mod:`fgq_jax.data.imagenet_subset.reader` (no TensorFlow).

Splits (every one is uint8 [N, 227, 227, 3] RGB, decoded with Pillow):

========== ===== ============================================================ ======================
split      N     source images                                                preprocessing
========== ===== ============================================================ ======================
val1300    1300  ILSVRC2012 validation images, 227x227 as published           none (kept as is)
val20      20    ILSVRC2012 validation images, original sizes                 resize 256 + crop 227
calib1000  1000  one image per class, not from the validation set, shorter    resize 256 (identity:
                 side already 256                                             already 256) + crop 227
========== ===== ============================================================ ======================

"resize 256 + crop 227" = :func:`fgq_jax.data.imagenet_preprocess` with ``resize=256, crop=227``:
shorter side to 256 with Pillow's ``Image.BILINEAR`` filter (antialiased on downscaling, i.e.
exactly torchvision's ``Resize(256)`` with its default ``InterpolationMode.BILINEAR`` on a PIL
image; the long side truncated to an int as torchvision does), then the centre 227x227 crop with
torchvision's ``CenterCrop`` offsets ``round((H - 227) / 2)``. 227 rather than the usual 224 so that
the three splits share one shape with val1300, whose images were published already cropped to 227
(SqueezeNet's original input size).

Labels: class indices 0..999 in the standard (torchvision / Caffe, = sorted wnid) order. val1300
and val20 take them from the ``labels.txt`` in their tarball; calib1000 images are labelled with the
index of the wnid their file name starts with (``n01440764_tench.JPEG`` -> line 0 of synsets.txt),
so that they carry a correct label although calibration and repairs use them without labels.
"""

from __future__ import annotations

NAME = "imagenet_subset"
VERSION = "1.0.0"
# Default manual dir, relative to the shared root (fgq_jax.data.default_shared_dir()).
SHARED_SUBDIR = "data/imagenet-subset"

# split -> tarball; every tarball holds one top-level folder named like the split.
TARBALLS = {
    "val1300": "val1300.tar.gz",
    "val20": "val20-fullsize.tar.gz",
    "calib1000": "calib1000.tar.gz",
}
SYNSETS = "synsets.txt"  # the 1,000 "<wnid> <names>" lines in class-index order (all splits need it)
# sha256 of the manual files (../shared/README.md).
SHA256 = {
    "val1300.tar.gz": "c8fd20c82499158cda814002790ab8d231e09cdfc6d5c56111f67db21df5f5dc",
    "val20-fullsize.tar.gz": "1ac2859de9c7e428cf9681e39ea64af2920bdf7c6bd45021b7448ac1072b65e8",
    "calib1000.tar.gz": "b0c16e9fab7397b9bf3858a131f509a7da7160acc703f2b8a009e1ab8e3b7ea6",
    "synsets.txt": "acf75ef0abe89694b19056e0796401068b459c457baa30335f240c7692857355",
}
NUM_EXAMPLES = {"val1300": 1300, "val20": 20, "calib1000": 1000}
NUM_CLASSES = 1000
LABELED_SPLITS = ("val1300", "val20")  # labels from <split>/labels.txt; calib1000: from the file name
RESIZE = 256
IMAGE_SIZE = 227
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# split -> resize the shorter side to RESIZE and centre-crop IMAGE_SIZE (False: already 227x227).
RESIZE_AND_CROP = {"val1300": False, "val20": True, "calib1000": True}

SOURCES = {
    "val1300": "VeriSilicon/acuity-dataset",
    "val20": "airockchip/rknn_model_zoo",
    "calib1000": "EliSchwartz/imagenet-sample-images",
}


def register():
    """Imports the builder module so that tfds knows ``"imagenet_subset"``; returns the builder class."""
    from fgq_jax.data.imagenet_subset import imagenet_subset  # pylint: disable=import-outside-toplevel

    return imagenet_subset.ImagenetSubset


def __getattr__(name):  # lazy access to the builder class without importing TF at package import
    if name in ("ImagenetSubset", "Builder"):
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def manual_instructions(manual_dir=None) -> str:
    """Human-readable instructions for filling the manual dir (also the builder's instructions)."""
    where = f"\n\nExpected location: {manual_dir}" if manual_dir is not None else ""
    files = "\n".join(f"  {name}  sha256 {SHA256[name]}" for name in (*TARBALLS.values(), SYNSETS))
    return (
        "The ImageNet subset cannot be downloaded by tfds. Place these four files in the manual dir:\n"
        f"{files}\n"
        "val1300.tar.gz holds val1300/ILSVRC2012_val_XXXXXXXX.JPEG (1,300 validation images, 227x227)\n"
        "and val1300/labels.txt; val20-fullsize.tar.gz holds val20/*.JPEG (20 full-size validation\n"
        "images) and val20/labels.txt (lines '<file> <label>'); calib1000.tar.gz holds\n"
        "calib1000/<wnid>_<name>.JPEG (one image per class); synsets.txt the 1,000 '<wnid> <names>'\n"
        "lines in class-index order. The images come from the public GitHub repositories "
        f"{', '.join(SOURCES.values())}\n"
        "(inside this workplace the files are in ../shared/data/imagenet-subset/). Pass the directory\n"
        "as tfds.download.DownloadConfig(manual_dir=...) or, with fgq_jax.data.load_arrays, as\n"
        "manual_dir= or through the environment variable FGQ_SHARED_DIR (the shared root; files in\n"
        f"$FGQ_SHARED_DIR/{SHARED_SUBDIR})." + where
    )


def check_manual_dir(manual_dir, splits=None, *, verify_sha256=True) -> dict:
    """Checks that the manual dir holds the splits' tarballs and synsets.txt (and their sha256).

    Returns {split: tarball path}; synsets.txt is ``os.path.join(manual_dir, SYNSETS)``.

    Raises:
      DataNotFoundError: the dir or a file is missing (the message says where it was expected).
      CorruptDataError: a file's sha256 differs from the published one.
      ValueError: an unknown split.
    """
    from fgq_jax.data.manual import check_split_files  # pylint: disable=import-outside-toplevel

    return check_split_files(
        NAME, manual_dir, splits, TARBALLS, SHA256, manual_instructions,
        extra={SYNSETS: "the class order (all splits)"},
        verify_sha256=verify_sha256,
    )


def read_manual_split(manual_dir, split: str):
    """One split straight from the (sha256-checked) manual dir, without tfds: (images uint8
    [N, 227, 227, 3], labels int32 [N], ids str [N]), exactly the builder's examples."""
    import os  # pylint: disable=import-outside-toplevel

    from fgq_jax.data.imagenet_subset import reader  # pylint: disable=import-outside-toplevel

    tar = check_manual_dir(manual_dir, splits=(split,))[split]
    return reader.read_split(tar, split, os.path.join(os.fspath(manual_dir), SYNSETS))
