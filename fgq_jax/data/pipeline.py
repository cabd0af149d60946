"""Input pipelines: tfds datasets -> cached uint8 arrays, normalisation, batching, augmentation.

TensorFlow / tensorflow-datasets are imported lazily (only when a dataset has to be prepared or read
through tfds), so the cached fast path and the array utilities cost no TensorFlow import.

The project's own builders ("cifar10_jpeg", "imagenet_subset"; ``LOCAL_BUILDERS``) read their
manual files from <shared>/<SHARED_SUBDIR> by default. Without tensorflow-datasets (e.g. a GPU machine
with only jax/numpy/Pillow), ``load_arrays`` still serves every existing array cache, and decodes
those two straight from their (sha256-checked) tarballs with the builders' own generators
(``reader.iter_examples`` of each package), so the arrays are identical to the tfds ones; other
datasets then raise ImportError.

Decoder: Pillow everywhere (CIFAR-10-JPEG and the ImageNet subset are decoded, and the subset
resized, by Pillow inside their builders; imagenet2012 JPEGs are read undecoded from tfds and
decoded by Pillow here).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from fgq_jax import fileio
from fgq_jax.data import cifar10_jpeg as _c10j
from fgq_jax.data import imagenet_subset as _ims
from fgq_jax.data.errors import DataNotFoundError


# Standard per-channel statistics (RGB, for pixels scaled to [0, 1]). The shared CIFAR ResNets
# (akamaster/pytorch_resnet_cifar10) use the ImageNet statistics too (../shared/README.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN = {"cifar": IMAGENET_MEAN, "imagenet": IMAGENET_MEAN}
STD = {"cifar": IMAGENET_STD, "imagenet": IMAGENET_STD}

IMAGENET_RESIZE = 256
IMAGENET_CROP = 224

# The project's own tfds builders: name -> package (NAME, VERSION, SHARED_SUBDIR, TARBALLS,
# register(), check_manual_dir(), read_manual_split()). Their images are final (decoded and, for
# imagenet_subset, resized/cropped inside the builder).
LOCAL_BUILDERS = {_c10j.NAME: _c10j, _ims.NAME: _ims}
# Datasets small enough to hold in memory: the whole split is cached and `limit` slices it.
_SMALL = {"cifar10_jpeg", "imagenet_subset", "cifar10", "cifar100", "mnist", "fashion_mnist"}
FAMILY = {
    "cifar10_jpeg": "cifar",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "imagenet2012": "imagenet",
    "imagenet_subset": "imagenet",
}

_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------- paths
def default_data_dir() -> Path:
    """tfds data dir (and array cache root): env FGQ_DATA_DIR or <repo>/.cache/tfds."""
    env = os.environ.get("FGQ_DATA_DIR")
    return Path(env).expanduser() if env else fileio.REPO_ROOT / ".cache" / "tfds"


def default_shared_dir() -> Path:
    """Shared read-only data root: env FGQ_SHARED_DIR or <repo>/../shared."""
    env = os.environ.get("FGQ_SHARED_DIR")
    return Path(env).expanduser() if env else fileio.REPO_ROOT.parent / "shared"


def default_manual_dir(dataset: str) -> Path | None:
    """cifar10_jpeg: <shared>/data/cifar10-jpeg; imagenet_subset: <shared>/data/imagenet-subset.

    Others: None (tfds then uses <data_dir>/downloads/manual).
    """
    name, _ = _parse(dataset)
    if name in LOCAL_BUILDERS:
        return default_shared_dir() / LOCAL_BUILDERS[name].SHARED_SUBDIR
    return None


def _parse(dataset: str) -> tuple[str, str | None]:
    """ "name" or "name:1.2.3" -> (name, version or None)."""
    name, _, version = dataset.partition(":")
    return name.strip(), (version.strip() or None)


def cache_path(dataset: str, split: str, *, data_dir=None, limit: int | None = None) -> Path:
    """Where load_arrays keeps the decoded arrays of (dataset, split)."""
    name, version = _parse(dataset)
    if version is None:
        version = LOCAL_BUILDERS[name].VERSION if name in LOCAL_BUILDERS else "default"
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", split)
    if limit is not None and name not in _SMALL:
        tag += f"_first{int(limit)}"
    return data_dir / "fgq_arrays" / name / version / f"{tag}.npz"


# ------------------------------------------------------------------------------ cached arrays
def load_arrays(
    dataset: str,
    split: str,
    *,
    data_dir=None,
    manual_dir=None,
    limit: int | None = None,
    return_ids: bool = False,
):
    """Decoded images and labels of a tfds split, cached on disk as .npz after the first read.

    Args:
      dataset: tfds name, optionally with version: "cifar10_jpeg", "imagenet_subset", "cifar10",
        "imagenet2012", "cifar10:3.0.2".
      split: tfds split ("train", "test", "validation", "val1300", or a slice such as "train[:1000]").
      data_dir: tfds data dir (default: env FGQ_DATA_DIR or <repo>/.cache/tfds); the array cache lives
        in <data_dir>/fgq_arrays/<name>/<version>/<split>.npz.
      manual_dir: the tfds manual dir (cifar10_jpeg default: <shared>/data/cifar10-jpeg;
        imagenet_subset: <shared>/data/imagenet-subset; imagenet2012: the dir holding
        ILSVRC2012_img_{train,val}.tar, default <data_dir>/downloads/manual).
      limit: keep only the first `limit` examples (small datasets cache the whole split and slice it;
        large ones read and cache only `split[:limit]`).
      return_ids: also return the example ids (member path for cifar10_jpeg / imagenet_subset, file
        name for imagenet2012).

    Returns:
      (images uint8 [N, H, W, 3], labels int32 [N]) (+ ids str [N] if return_ids), in the builder's
      deterministic order (cifar10_jpeg, imagenet_subset: sorted member paths). imagenet2012 images
      are resized (shorter side 256) and center-cropped to 224 x 224 by `imagenet_preprocess`
      (Pillow) before caching; imagenet_subset images come 227 x 227 from its builder (see
      fgq_jax.data.imagenet_subset).

    Without tensorflow-datasets: an existing cache is served as usual; on a cache miss cifar10_jpeg
    and imagenet_subset are decoded directly from their tarballs (same generator and Pillow decode
    as the builder, hence the same arrays; a warning says so; split slices: integers only), other
    datasets raise ImportError.
    """
    if limit is not None and int(limit) < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name, _ = _parse(dataset)
    path = cache_path(dataset, split, data_dir=data_dir, limit=limit)
    arrays = _read_cache(path) if path.exists() else None
    if arrays is None:
        read_limit = None if name in _SMALL else limit
        missing = tfds_unavailable()
        if missing is None:
            arrays = _load_via_tfds(
                dataset, split, data_dir=data_dir, manual_dir=manual_dir, limit=read_limit
            )
        else:
            arrays = _load_without_tfds(
                dataset, split, manual_dir=manual_dir, cache=path, reason=missing
            )
        _write_cache(
            path,
            arrays,
            meta={
                "dataset": dataset,
                "split": split,
                "limit": read_limit,
                "decoder": "pillow",
                "reader": "tfds" if missing is None else "tarball",
                "format": _CACHE_FORMAT,
            },
        )
    images, labels, ids = arrays
    if limit is not None:
        images, labels, ids = images[:limit], labels[:limit], ids[:limit]
    return (images, labels, ids) if return_ids else (images, labels)


def _read_cache(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != _CACHE_FORMAT:
                return None
            images, labels, ids = z["images"], z["labels"], z["ids"]
    except Exception as e:  # pylint: disable=broad-except  # unreadable cache: rebuild it
        import warnings  # pylint: disable=import-outside-toplevel

        warnings.warn(
            f"ignoring unreadable array cache {path} ({type(e).__name__}: {e}); rebuilding it"
        )
        return None
    return images, labels.astype(np.int32, copy=False), ids


def _write_cache(path: Path, arrays, meta: dict) -> None:
    images, labels, ids = arrays
    meta = dict(meta, created=time.strftime("%Y-%m-%dT%H:%M:%S"), num_examples=int(len(labels)))
    umask = os.umask(0)
    os.umask(umask)
    # atomic: readers see the old file or the complete new one; readable by all (a shared cache)
    with fileio.atomic_file(path, "wb", perms=0o666 & ~umask) as f:
        np.savez(f, images=images, labels=labels, ids=ids, meta=np.array(json.dumps(meta)))


def tfds_unavailable() -> str | None:
    """None if tensorflow-datasets (and tensorflow) can be imported, else the reason (one line).

    Imports tensorflow_datasets (not tensorflow itself: its presence is checked with find_spec).
    """
    try:
        importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        return f"cannot import tensorflow_datasets: {e}"
    try:
        tf_spec = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):
        tf_spec = None
    if tf_spec is None:
        return "tensorflow_datasets is installed but tensorflow is not"
    return None


def _tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            f"tensorflow-datasets is required here but cannot be imported ({e}). Install "
            "tensorflow-datasets and tensorflow(-cpu), or use an existing fgq_arrays .npz cache "
            "(load_arrays reads it without tfds; it can also decode cifar10_jpeg without tfds)."
        ) from e
    return tfds


# "train", "test", "train[:1000]", "test[-500:]", "train[100:200]" (no %, no "+", no rounding).
_INT_SLICE_SPLIT = re.compile(r"^\s*(\w+)\s*(?:\[\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\])?\s*$")


def _load_without_tfds(dataset: str, split: str, *, manual_dir, cache: Path, reason: str):
    """load_arrays' cache-miss path when tensorflow-datasets is unavailable (LOCAL_BUILDERS only)."""
    name, version = _parse(dataset)
    meta = LOCAL_BUILDERS.get(name)
    if meta is None:
        raise ImportError(
            f"load_arrays({dataset!r}, {split!r}): tensorflow-datasets is required for {name!r} "
            f"({reason}) and there is no array cache at {str(cache)!r}. Install "
            "tensorflow-datasets and tensorflow(-cpu), or copy that .npz from a machine that has "
            f"them; only {', '.join(map(repr, LOCAL_BUILDERS))} can be decoded without tfds."
        )
    if version not in (None, meta.VERSION):
        raise ValueError(
            f"{dataset!r}: only version {meta.VERSION} of {name} can be read without "
            f"tensorflow-datasets ({reason})"
        )
    m = _INT_SLICE_SPLIT.match(split)
    if m is None:
        raise ImportError(
            f"load_arrays({dataset!r}, {split!r}): this split syntax needs tensorflow-datasets "
            f"({reason}); without it only plain splits ({', '.join(sorted(meta.TARBALLS))}) and "
            "integer slices such as 'train[:1000]' are supported."
        )
    base = m.group(1)
    start, stop = (int(g) if g is not None else None for g in m.group(2, 3))
    if manual_dir is None:
        manual_dir = default_manual_dir(dataset)
    images, labels, ids = meta.read_manual_split(manual_dir, base)  # sha256-checked
    tar = Path(manual_dir) / meta.TARBALLS[base]
    warnings.warn(
        f"tensorflow-datasets unavailable ({reason}); decoded {tar} directly with Pillow "
        f"(the builder's own generator: identical pixels, labels and order), caching the arrays "
        f"at {cache}",
        stacklevel=3,
    )
    keep = slice(start, stop)
    # ids re-made from the slice so the str dtype width is the slice's own, as on the tfds path.
    return images[keep], labels[keep], np.asarray(ids[keep].tolist(), dtype=str)


def prepare_builder(dataset: str, *, data_dir=None, manual_dir=None):
    """tfds.builder(dataset) + download_and_prepare (manual dir, never GCS); returns the builder.

    Raises DataNotFoundError (naming the expected location) when the dataset is not prepared yet and
    its manual dir is missing, CorruptDataError for damaged cifar10_jpeg / imagenet_subset files.
    """
    tfds = _tfds()
    name, _ = _parse(dataset)
    if name in LOCAL_BUILDERS:
        LOCAL_BUILDERS[name].register()
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if manual_dir is None:
        manual_dir = default_manual_dir(dataset)
    builder = tfds.builder(dataset, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        if name in LOCAL_BUILDERS:
            # Our own error (where the files were expected), before tfds' generic AssertionError.
            LOCAL_BUILDERS[name].check_manual_dir(manual_dir, verify_sha256=False)
        elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            where = (
                Path(manual_dir) if manual_dir is not None else data_dir / "downloads" / "manual"
            )
            if not where.is_dir() or not any(where.iterdir()):
                raise DataNotFoundError(
                    f"{name}: manual dir {str(where)!r} does not exist or is empty; tfds cannot "
                    f"download {name}. Put the files there (or pass manual_dir=...):\n"
                    f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
                )
        config = tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
            try_download_gcs=False,
        )
        builder.download_and_prepare(download_config=config)
    return builder


def _load_via_tfds(dataset, split, *, data_dir, manual_dir, limit):
    tfds = _tfds()
    name, _ = _parse(dataset)
    builder = prepare_builder(dataset, data_dir=data_dir, manual_dir=manual_dir)
    read_split = split if limit is None else f"{split}[:{int(limit)}]"
    features = builder.info.features
    id_key = next((k for k in ("id", "file_name") if k in features), None)
    read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
    if FAMILY.get(name) == "imagenet" and name not in LOCAL_BUILDERS:
        # Undecoded JPEG bytes from tfds; Pillow decode + resize 256 + center crop 224 here.
        # (imagenet_subset's builder already stores final 227x227 pixels: the generic path below.)
        ds = builder.as_dataset(
            split=read_split,
            shuffle_files=False,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        images, labels, ids = [], [], []
        for ex in tfds.as_numpy(ds):
            images.append(imagenet_preprocess(ex["image"]))
            labels.append(ex["label"])
            ids.append(_text(ex[id_key]) if id_key else str(len(ids)))
        images = (
            np.stack(images) if images else np.zeros((0, IMAGENET_CROP, IMAGENET_CROP, 3), np.uint8)
        )
        return images, np.asarray(labels, np.int32), np.asarray(ids, dtype=str)
    ds = builder.as_dataset(split=read_split, shuffle_files=False, read_config=read_config)
    keys = ["image", "label"] + ([id_key] if id_key else [])
    ds = ds.map(lambda ex: {k: ex[k] for k in keys}).batch(2048)
    images, labels, ids = [], [], []
    for b in tfds.as_numpy(ds):
        images.append(b["image"])
        labels.append(b["label"])
        if id_key:
            ids.extend(_text(x) for x in b[id_key])
    if not images:
        shape = tuple(builder.info.features["image"].shape)
        return np.zeros((0,) + shape, np.uint8), np.zeros((0,), np.int32), np.zeros((0,), str)
    images = np.concatenate(images)
    if images.ndim == 3:  # grayscale datasets without channel axis
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    labels = np.concatenate(labels).astype(np.int32)
    ids = np.asarray(ids if id_key else [str(i) for i in range(len(labels))], dtype=str)
    return images.astype(np.uint8, copy=False), labels, ids


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------- preprocessing
def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, int, float, list, tuple))


def normalize(images, family: str = "cifar"):
    """uint8 (or 0..255 valued) NHWC images -> float32 ``(x / 255 - mean) / std`` per channel.

    numpy in -> numpy out; jax arrays / tracers -> jax (usable inside jit). family: "cifar" | "imagenet".
    """
    if family not in MEAN:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(MEAN)}")
    if _is_numpy(images):
        xp = np
    else:
        import jax.numpy as xp  # pylint: disable=import-outside-toplevel
    mean = xp.asarray(MEAN[family], dtype=xp.float32)
    std = xp.asarray(STD[family], dtype=xp.float32)
    x = xp.asarray(images).astype(xp.float32) / xp.float32(255.0)
    return (x - mean) / std


def imagenet_resize_size(height: int, width: int, resize: int = IMAGENET_RESIZE) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side = resize.

    torchvision's Resize(int) rule: the long side is truncated to an int.
    """
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


def imagenet_preprocess(
    image, *, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP, backend: str = "pil"
) -> np.ndarray:
    """Standard ImageNet eval geometry: shorter side -> `resize` (bilinear), center crop `crop`^2.

    image: uint8 array [H, W, 3] (or [H, W]), a PIL image, or encoded bytes (decoded with Pillow, RGB).
    backend "pil" reproduces torchvision's Resize(256) + CenterCrop(224) on PIL images exactly
    (antialiased bilinear, crop offset round((H - 224) / 2)); "tf" uses tf.image.resize(antialias=True)
    (close, not bit-identical). Returns uint8 [crop, crop, 3]; apply `normalize(..., "imagenet")` after.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    if isinstance(image, (bytes, bytearray, np.bytes_)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            image = im.convert("RGB")
    if isinstance(image, Image.Image):
        im = image.convert("RGB") if image.mode != "RGB" else image
        arr = None
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
        im = None
    h, w = arr.shape[:2] if arr is not None else (im.size[1], im.size[0])
    new_h, new_w = imagenet_resize_size(h, w, resize)
    if backend == "pil":
        if im is None:
            im = Image.fromarray(arr)
        if (new_h, new_w) != (h, w):
            im = im.resize((new_w, new_h), Image.BILINEAR)
        out = np.asarray(im)
    elif backend == "tf":
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        src = arr if arr is not None else np.asarray(im)
        if (new_h, new_w) != (h, w):
            out = tf.image.resize(src, (new_h, new_w), method="bilinear", antialias=True)
            out = np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)
        else:
            out = src
    else:
        raise ValueError(f"backend must be 'pil' or 'tf', got {backend!r}")
    return center_crop(out, crop)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision CenterCrop on [H, W, C] (zero-pads first when the image is smaller than `size`)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return np.ascontiguousarray(image[top : top + size, left : left + size])


# ------------------------------------------------------------------------------------ batching
# Label-free passes (calibration, repairs) batch by pixels, not images: their default image counts
# (250-500) suit 32x32 CIFAR images; a 227x227 batch of 500 would need gigabytes per activation.
MAX_BATCH_PIXELS = 512 * 32 * 32


def pixel_batch_size(image_shape, max_images: int) -> int:
    """Images per batch: at most `max_images`, and at most MAX_BATCH_PIXELS pixels (>= 1 image).
    image_shape: (H, W, C) or (H, W)."""
    h, w = image_shape[:2]
    return max(1, min(int(max_images), MAX_BATCH_PIXELS // (int(h) * int(w))))


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    images, labels, batch_size: int, *, drop_remainder: bool = False, pad_to_batch: bool = True
) -> Iterator[tuple]:
    """Yields (images, labels, mask) in order; every batch has `batch_size` rows when pad_to_batch.

    The tail batch is zero-padded (label 0) and `mask` (bool [batch_size]) marks the real rows, so a
    jitted eval step sees one shape only. drop_remainder=True drops the tail instead.
    Works on numpy arrays (host) or jax arrays (padding with jnp).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} labels")
    if _is_numpy(images) and _is_numpy(labels):
        xp = np
    else:
        import jax.numpy as xp  # pylint: disable=import-outside-toplevel
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        k = len(y)
        if k < batch_size:
            if drop_remainder:
                return
            if pad_to_batch:
                x = xp.concatenate([x, xp.zeros((batch_size - k,) + tuple(x.shape[1:]), x.dtype)])
                y = xp.concatenate([y, xp.zeros((batch_size - k,) + tuple(y.shape[1:]), y.dtype)])
        mask = np.arange(len(y)) < k
        yield x, y, mask


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one training epoch: a permutation of range(n) fixed by (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_batches(
    images,
    labels,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    drop_remainder: bool = True,
    skip: int = 0,
) -> Iterator[tuple]:
    """Shuffled (images, labels) batches of one epoch; the order depends only on (seed, epoch, n).

    drop_remainder (default) keeps every batch at `batch_size` rows (one jit shape). `skip` starts at
    batch `skip`, so a run resumed mid-epoch sees exactly the batches it had not seen yet.
    """
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} labels")
    perm = epoch_permutation(n, seed, epoch)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(int(skip) * batch_size, stop, batch_size):
        idx = perm[start : start + batch_size]
        yield images[idx], labels[idx]


# -------------------------------------------------------------------------------- augmentation
def augment_params(rng, n: int, *, padding: int = 4):
    """Random (offsets int32 [n, 2] in [0, 2*padding], flips bool [n]) for `apply_augment`."""
    import jax  # pylint: disable=import-outside-toplevel

    k_crop, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * padding + 1, dtype=np.int32)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    return offsets, flips


def apply_augment(images, offsets, flips, *, padding: int = 4):
    """Zero-pad by `padding`, crop back to H x W at `offsets` (top, left), then mirror where `flips`."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    images = jnp.asarray(images)
    _, h, w, c = images.shape
    p = padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets
    )
    return jnp.where(flips[:, None, None, None], crop[:, :, ::-1, :], crop)


def augment_cifar(rng, images, *, padding: int = 4):
    """Standard CIFAR training augmentation on device: random crop with `padding` zero pixels on each
    side + random horizontal flip (p = 0.5), per image. Pure (same rng -> same output), jit-able,
    dtype-preserving (apply before `normalize`, so the padding is black as in torchvision)."""
    offsets, flips = augment_params(rng, images.shape[0], padding=padding)
    return apply_augment(images, offsets, flips, padding=padding)
