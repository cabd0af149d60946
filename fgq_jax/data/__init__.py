"""fgq_jax.data: tfds datasets as cached uint8 arrays, normalisation, batching and augmentation.

Public API (TensorFlow is imported only when a dataset has to be prepared or read through tfds):

- ``load_arrays(dataset, split, *, data_dir=None, manual_dir=None, limit=None, return_ids=False)``
  -> (images uint8 [N, H, W, 3], labels int32 [N]); datasets "cifar10_jpeg" (this package's tfds
  builder, Pillow-decoded), "cifar10", "imagenet2012" (resized 256 / center crop 224 with Pillow).
- ``normalize(images, family="cifar"|"imagenet")`` -> float32; ``MEAN`` / ``STD`` per family.
- ``batches(images, labels, batch_size, *, drop_remainder=False, pad_to_batch=True)`` -> (x, y, mask).
- ``train_batches(images, labels, batch_size, seed, epoch, *, drop_remainder=True, skip=0)``.
- ``augment_cifar(rng, images_uint8, *, padding=4)`` (random crop + flip, jax, pure).
- ``imagenet_preprocess(image, *, resize=256, crop=224, backend="pil")`` -> uint8 [224, 224, 3].
- defaults: data dir = env FGQ_DATA_DIR or <repo>/.cache/tfds; cifar10_jpeg manual dir =
  env FGQ_SHARED_DIR (or <repo>/../shared) + /data/cifar10-jpeg.
- without tensorflow-datasets: existing array caches are served; cifar10_jpeg is decoded directly
  from its tarball with the builder's own generator (identical arrays, with a warning); other
  datasets raise ImportError.

``import fgq_jax.data.cifar10_jpeg.cifar10_jpeg`` (or ``fgq_jax.data.cifar10_jpeg.register()``)
registers the "cifar10_jpeg" builder with tfds.
"""

from fgq_jax.data.errors import CorruptDataError, DataNotFoundError
from fgq_jax.data.pipeline import (
    FAMILY,
    IMAGENET_CROP,
    IMAGENET_MEAN,
    IMAGENET_RESIZE,
    IMAGENET_STD,
    MEAN,
    STD,
    apply_augment,
    augment_cifar,
    augment_params,
    batches,
    cache_path,
    center_crop,
    default_data_dir,
    default_manual_dir,
    default_shared_dir,
    epoch_permutation,
    imagenet_preprocess,
    imagenet_resize_size,
    load_arrays,
    normalize,
    num_batches,
    prepare_builder,
    train_batches,
)

__all__ = [
    "CorruptDataError", "DataNotFoundError", "FAMILY", "IMAGENET_CROP", "IMAGENET_MEAN",
    "IMAGENET_RESIZE", "IMAGENET_STD", "MEAN", "STD", "apply_augment", "augment_cifar",
    "augment_params", "batches", "cache_path", "center_crop", "default_data_dir",
    "default_manual_dir", "default_shared_dir", "epoch_permutation", "imagenet_preprocess",
    "imagenet_resize_size", "load_arrays", "normalize", "num_batches", "prepare_builder",
    "train_batches",
]
