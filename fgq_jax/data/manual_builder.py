"""The common tfds builder of the project's own manual-dir datasets (cifar10_jpeg, imagenet_subset).

A subclass names its dataset package (``META``: NAME, VERSION, IMAGE_SHAPE, manual_instructions,
check_manual_dir) and turns one split's tarball into ``(id, image uint8 [H, W, 3], label)``
examples in :meth:`ManualImageBuilder._examples` (the package reader's ``iter_examples``, also used
without tfds). This base class does the tfds part: features ``image`` (PNG: lossless, so the
pixels read back are exactly the reader's), ``label`` and ``id`` (Text), the manual-dir checks
(sha256 unless ``VERIFY_SHA256`` is False) and ``disable_shuffling`` (examples in reader order).
Imports TensorFlow (through tfds): only the builder modules import it.
"""

from __future__ import annotations

from types import ModuleType

import tensorflow_datasets as tfds

from fgq_jax.data.manual import manual_dir_of, png_bytes


class ManualImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: (image, label, id) examples from the sha256-checked tarballs of a manual dir."""

    META: ModuleType  # the dataset's package (fgq_jax.data.cifar10_jpeg, ...)
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""
    # zlib level of the stored PNGs (lossless either way; lower is faster, files a little larger).
    PNG_COMPRESS_LEVEL = 6
    # Set to False (e.g. in a subclass or a test) to skip the sha256 check of the manual files.
    VERIFY_SHA256 = True

    def _label_feature(self) -> tfds.features.ClassLabel:
        raise NotImplementedError

    def _examples(self, manual_dir: str, split: str, tar_path: str):
        """Yields (id, image uint8 [H, W, 3], label) of one split, in the order to store them."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=self.META.IMAGE_SHAPE, encoding_format="png"),
                    "label": self._label_feature(),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        manual_dir = manual_dir_of(dl_manager, self.META.NAME, self.META.manual_instructions)
        paths = self.META.check_manual_dir(manual_dir, verify_sha256=self.VERIFY_SHA256)
        return {split: self._generate_examples(manual_dir, split, path) for split, path in paths.items()}

    def _generate_examples(self, manual_dir, split, tar_path):
        for key, (name, image, label) in enumerate(self._examples(manual_dir, split, tar_path)):
            # PNG bytes of the reader's pixels; tfds stores the bytes as they are.
            image = png_bytes(image, compress_level=self.PNG_COMPRESS_LEVEL)
            yield key, {"image": image, "label": label, "id": name}
