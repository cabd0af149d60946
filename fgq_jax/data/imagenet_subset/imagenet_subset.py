"""tfds builder for the shared ImageNet subset ("imagenet_subset": val1300, val20, calib1000).

The manual dir holds ``val1300.tar.gz``, ``val20-fullsize.tar.gz``, ``calib1000.tar.gz`` and
``synsets.txt`` (sha256-checked against the published values). The tarballs are streamed (never
extracted to disk); every JPEG is decoded with **Pillow** (RGB), preprocessed per split and stored
as a lossless PNG ``Image`` feature, so the pixels read back are exactly Pillow's:

* ``val1300``: 1,300 validation images kept as published, 227x227 (no resize, no crop);
* ``val20``: 20 full-size validation images, shorter side resized to 256 with Pillow's BILINEAR
  filter (= torchvision's ``Resize(256)`` on PIL images) and centre-cropped to 227x227;
* ``calib1000``: 1,000 images, one per class, not from the validation set (already at shorter side
  256, so the resize is the identity), centre-cropped to 227x227. Labelled with their wnid's class
  index although calibration and repairs use them without labels.

Every split is uint8 [N, 227, 227, 3]; labels are 0..999 in the standard (torchvision / Caffe)
order; id = member path inside the tarball (``val1300/ILSVRC2012_val_00000347.JPEG``). Examples are
written in sorted member-path order with ``disable_shuffling=True``. The member iteration, decode
and preprocessing live in :mod:`fgq_jax.data.imagenet_subset.reader` (no TensorFlow), which
``load_arrays`` also uses directly when tensorflow-datasets is unavailable (identical arrays).
Never call an accuracy measured on these images "ImageNet accuracy": they are a small, easier subset.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from fgq_jax.data import imagenet_subset as _meta
from fgq_jax.data.imagenet_subset.reader import iter_examples
from fgq_jax.data.manual_builder import ManualImageBuilder

_CITATION = r"""
@article{russakovsky2015imagenet,
  title={{ImageNet} Large Scale Visual Recognition Challenge},
  author={Russakovsky, Olga and Deng, Jia and Su, Hao and others},
  journal={International Journal of Computer Vision},
  volume={115},
  number={3},
  pages={211--252},
  year={2015}
}
"""

_DESCRIPTION = f"""
A small subset of real ImageNet (ILSVRC2012) images for a machine without the full dataset:
val1300 (1,300 validation images as published at 227x227 by {_meta.SOURCES["val1300"]}),
val20 (20 full-size validation images from {_meta.SOURCES["val20"]}, resized to 256 and
centre-cropped to 227) and calib1000 (one image per class from {_meta.SOURCES["calib1000"]}, not
from the validation set, centre-cropped to 227). Decoded with Pillow (RGB) at preparation time and
stored losslessly (PNG). Labels 0..999 in the standard class order; id = member path in the tarball.
"""


class ImagenetSubset(ManualImageBuilder):
    """ImageNet subset: val1300 / val20 / calib1000, Pillow-decoded, 227x227."""

    name = _meta.NAME
    META = _meta
    VERSION = tfds.core.Version(_meta.VERSION)
    RELEASE_NOTES = {
        "1.0.0": (
            "Initial release: val1300 (as published, 227x227), val20 and calib1000 (resize 256 "
            "bilinear + centre crop 227); JPEGs decoded with Pillow (RGB), stored as PNG; examples "
            "in sorted member-path order (disable_shuffling)."
        ),
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _meta.manual_instructions()
    DESCRIPTION = _DESCRIPTION
    HOMEPAGE = "https://www.image-net.org/"
    CITATION = _CITATION
    # zlib level 1: 3x faster than the default 6 on these 227x227 photos for ~6 % larger files.
    PNG_COMPRESS_LEVEL = 1

    def _label_feature(self):
        return tfds.features.ClassLabel(num_classes=_meta.NUM_CLASSES)

    def _examples(self, manual_dir, split, tar_path):
        # reader.iter_examples is shared with the tfds-free path of load_arrays.
        return iter_examples(tar_path, split, os.path.join(manual_dir, _meta.SYNSETS))
