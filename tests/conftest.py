"""Shared fixtures: a tiny conv net (conv-BN-ReLU, strided conv, dense) and random images.

The tests run with the CPU split into JAX devices as the experiment CLIs split it (one per core,
`experiments.cli.configure_cpu_devices`), so evaluation takes the devices in turn here as in
`make sweep`; a count forced in XLA_FLAGS or JAX_NUM_CPU_DEVICES is kept."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.cli import configure_cpu_devices

configure_cpu_devices(None)  # before any JAX operation


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv_a")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn_a")(x)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv_b")(x)
        x = nn.relu(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(10, name="fc")(x)


@pytest.fixture(scope="module")
def tiny():
    module = TinyNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 37).astype(np.int32)
    return module, variables, images, labels




# --------------------------------------------------------------- imagenet2012, official layout
# The labels tfds gives the first validation images (its validation_labels.txt lines 1-4).
IMAGENET_VAL_LABELS = {1: 65, 2: 970, 3: 230, 4: 809}


def _jpeg(rng, hw) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(members: dict, order) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in order:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


@pytest.fixture
def fake_imagenet2012(tmp_path):
    """A tiny tfds imagenet2012 manual dir in the official layout: ILSVRC2012_img_train.tar holding
    one tar per class (n01440764.tar, n01443537.tar: classes 0 and 1) of <wnid>_<i>.JPEG, and
    ILSVRC2012_img_val.tar holding ILSVRC2012_val_00000001..04.JPEG (tfds labels validation files by
    sorted position, so a partial tar is labelled right only with the first k), members shuffled.
    Returns (manual dir, {train name: jpeg}, {val name: jpeg}, {val name: tfds label})."""
    rng = np.random.default_rng(13)
    manual = tmp_path / "imagenet_manual"
    manual.mkdir()
    train_sizes = {"n01440764": [(300, 400), (256, 256)], "n01443537": [(375, 500)]}
    train, inner = {}, {}
    for wnid, sizes in train_sizes.items():
        members = {f"{wnid}_{i}.JPEG": _jpeg(rng, hw) for i, hw in enumerate(sizes)}
        inner[f"{wnid}.tar"] = _tar_bytes(members, sorted(members))
        train.update(members)
    (manual / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(inner, sorted(inner)))
    val_sizes = {1: (333, 500), 2: (500, 375), 3: (224, 224), 4: (180, 260)}  # 4: upscaled
    val = {f"ILSVRC2012_val_{i:08d}.JPEG": _jpeg(rng, hw) for i, hw in val_sizes.items()}
    (manual / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val, rng.permutation(sorted(val))))
    labels = {f"ILSVRC2012_val_{i:08d}.JPEG": lab for i, lab in IMAGENET_VAL_LABELS.items()}
    return manual, train, val, labels
