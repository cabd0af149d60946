"""fgq_jax.data: tfds datasets as cached uint8 arrays, normalisation, batching and augmentation.

Public API (TensorFlow is imported only when a dataset has to be prepared or read through tfds):

- ``load_arrays(dataset, split, *, data_dir=None, manual_dir=None, limit=None, return_ids=False)``
  -> (images uint8 [N, H, W, 3], labels int32 [N]); datasets "cifar10_jpeg" (this package's tfds
  builder, Pillow-decoded), "imagenet_subset" (this package's builder of the shared real-ImageNet
  subset: splits val1300 / val20 / calib1000, all 227x227, see fgq_jax.data.imagenet_subset),
  "cifar10", "imagenet2012" (resized 256 / center crop 224 with Pillow).
- ``normalize(images, family="cifar"|"imagenet")`` -> float32; ``MEAN`` / ``STD`` per family.
- ``batches(images, labels, batch_size, *, drop_remainder=False, pad_to_batch=True)`` -> (x, y, mask).
- ``train_batches(images, labels, batch_size, seed, epoch, *, drop_remainder=True, skip=0)``.
- ``augment_cifar(rng, images_uint8, *, padding=4)`` (random crop + flip, jax, pure).
- ``imagenet_preprocess(image, *, resize=256, crop=224, backend="pil")`` -> uint8 [224, 224, 3].
- defaults: data dir = env FGQ_DATA_DIR or <repo>/.cache/tfds; manual dirs = env FGQ_SHARED_DIR
  (or <repo>/../shared) + /data/cifar10-jpeg (cifar10_jpeg) or /data/imagenet-subset
  (imagenet_subset).
- without tensorflow-datasets: existing array caches are served; cifar10_jpeg and imagenet_subset
  are decoded directly from their tarballs with the builders' own generators (identical arrays,
  with a warning); other datasets raise ImportError.

``fgq_jax.data.cifar10_jpeg.register()`` / ``fgq_jax.data.imagenet_subset.register()`` (or importing
their builder modules) register "cifar10_jpeg" / "imagenet_subset" with tfds.
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
    pixel_batch_size,
    prepare_builder,
    train_batches,
)

__all__ = [
    "CorruptDataError", "DataNotFoundError", "FAMILY", "IMAGENET_CROP", "IMAGENET_MEAN",
    "IMAGENET_RESIZE", "IMAGENET_STD", "MEAN", "STD", "apply_augment", "augment_cifar",
    "augment_params", "batches", "cache_path", "center_crop", "default_data_dir",
    "default_manual_dir", "default_shared_dir", "epoch_permutation", "imagenet_preprocess",
    "imagenet_resize_size", "load_arrays", "normalize", "num_batches", "pixel_batch_size", "prepare_builder",
    "train_batches",
]
