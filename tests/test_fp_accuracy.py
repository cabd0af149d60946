"""End to end: the published CIFAR ResNets and SqueezeNet 1.1, converted from PyTorch and evaluated
through the tfds builders (CIFAR-10-JPEG, ImageNet subset; Pillow decoder), reproduce the FP
accuracies of ../shared/README.md."""
import io

import numpy as np
import pytest
from PIL import Image

# torchvision first: importing it (it loads triton's libtriton) after TensorFlow, which load_arrays
# imports on a cache miss, segfaults with the pinned wheels; the other order works.
try:
    import torch
    import torchvision
except ImportError:
    torch = torchvision = None

from fgq_jax.data import default_shared_dir, load_arrays, normalize  # noqa: E402
from fgq_jax.evaluate import Evaluator  # noqa: E402
from fgq_jax.models import get_model  # noqa: E402

SHARED = default_shared_dir()
# ../shared/README.md, "decoded with Pillow" column: all 10,000 test images.
PUBLISHED = {
    "resnet20": ("resnet20-12fca82f.th", 81.03),
    "resnet32": ("resnet32-d509ac18.th", 82.56),
    "resnet44": ("resnet44-014dd654.th", 82.67),
    "resnet56": ("resnet56-4bfd9763.th", 83.20),
}


@pytest.fixture(scope="module")
def test_split():
    if not (SHARED / "data" / "cifar10-jpeg" / "test.tar.gz").exists():
        pytest.skip(f"CIFAR-10-JPEG tarballs not found under {SHARED}")
    return load_arrays("cifar10_jpeg", "test")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_converted_fp_accuracy_matches_published(name, test_split):
    from fgq_jax.convert import convert_torch_checkpoint

    file, expected = PUBLISHED[name]
    path = SHARED / "models" / "cifar-resnet" / file
    if not path.exists():
        pytest.skip(f"{path} not found")
    images, labels = test_split
    assert images.shape == (10000, 32, 32, 3)
    params, batch_stats = convert_torch_checkpoint(path, name)
    spec = get_model(name)
    result = Evaluator(spec.module, spec.dataset_family)(
        {"params": params, "batch_stats": batch_stats}, images, labels, batch_size=1000,
        progress=False,
    )
    assert result.num_images == 10000
    assert abs(result.top1 - expected) <= 0.05, (name, result.top1, expected)


# --- SqueezeNet 1.1 on the ImageNet subset ---------------------------------------------------------
# ../shared/README.md (models/imagenet-squeezenet): a PyTorch forward of the .pth on val1300 as
# published (227x227, Pillow, no resize or crop, ImageNet mean/std): 946 and 1,181 of 1,300 images.
SQUEEZENET = SHARED / "models" / "imagenet-squeezenet" / "squeezenet1_1-5d96dd9a.pth"
SQUEEZENET_CORRECT = (946, 1181)  # top-1 72.77 %, top-5 90.85 %
SUBSET = SHARED / "data" / "imagenet-subset"


@pytest.fixture(scope="module")
def val1300():
    if not (SUBSET / "val1300.tar.gz").exists():
        pytest.skip(f"ImageNet subset not found under {SUBSET}")
    return load_arrays("imagenet_subset", "val1300")


@pytest.fixture(scope="module")
def squeezenet_variables():
    if not SQUEEZENET.exists():
        pytest.skip(f"{SQUEEZENET} not found")
    pytest.importorskip("torch", reason="PyTorch is needed to read the .pth")
    from fgq_jax.convert import convert_torch_checkpoint

    params, batch_stats = convert_torch_checkpoint(SQUEEZENET, "squeezenet1_1")
    return {"params": params, "batch_stats": batch_stats}


@pytest.mark.slow
def test_converted_squeezenet_reproduces_published_accuracy_exactly(val1300, squeezenet_variables):
    """Flax path (converter, imagenet_subset builder, Evaluator): exactly the published counts."""
    images, labels = val1300
    assert images.shape == (1300, 227, 227, 3) and labels.shape == (1300,)
    spec = get_model("squeezenet1_1")
    assert spec.input_shape == images.shape[1:] and spec.dataset_family == "imagenet"
    result = Evaluator(spec.module, spec.dataset_family)(
        squeezenet_variables, images, labels, batch_size=100, progress=False
    )
    assert (result.correct1, result.correct5, result.num_images) == (*SQUEEZENET_CORRECT, 1300), result
    assert (round(result.top1, 2), round(result.top5, 2)) == (72.77, 90.85)


def test_squeezenet_flax_matches_torchvision_on_real_images(val1300, squeezenet_variables):
    """A cheap cross-check on 24 real images: the same .pth in torchvision gives the same logits."""
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    images, labels = val1300[0][:24], val1300[1][:24]
    x = normalize(images, "imagenet")  # float32 NHWC
    ref = torchvision.models.squeezenet1_1(weights=None)
    ref.load_state_dict(torch.load(SQUEEZENET, map_location="cpu", weights_only=True))
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(get_model("squeezenet1_1").module.apply(squeezenet_variables, x))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_imagenet_subset_resize_crop_is_torchvision_resize_centercrop():
    """val20 (full-size images) from the builder's reader == torchvision's Resize(256) +
    CenterCrop(227) (default bilinear, antialiased) of the Pillow-decoded image."""
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    if not (SUBSET / "val20-fullsize.tar.gz").exists():
        pytest.skip(f"ImageNet subset not found under {SUBSET}")
    from fgq_jax.data import imagenet_subset as ims
    from fgq_jax.data.imagenet_subset import reader

    x, _, ids = ims.read_manual_split(SUBSET, "val20")
    members = dict(reader.read_tar_members(SUBSET / ims.TARBALLS["val20"], "val20"))
    T = torchvision.transforms
    tv = T.Compose([T.Resize(256), T.CenterCrop(227)])
    for image, name in zip(x, ids):
        ref = np.asarray(tv(Image.open(io.BytesIO(members[name])).convert("RGB")))
        np.testing.assert_array_equal(image, ref, err_msg=name)
